"""Every JAX model family and its options against transformers' PyTorch models, through one parametrised module.

Adding a family = its file, one registry line in ``models/__init__.py`` and its cases in ``CASES`` below (a
default config in ``offline.tiny_config``; the subsets ``GENERATE``, ``SAVE`` and ``PARITY`` pick what those
slower checks run on).

Tolerances (fp32, CPU):
* logits vs transformers (eager attention), right-padded rows and packed rows: max |diff| <= 1e-4 at real
  positions. Both compute in fp32, so a larger difference is a bug, not noise (seen: ~5e-7; GPT-Neo, whose q.k
  is unscaled, on std-0.1 weights: 2e-6, as far as transformers' own fp32 logits are from its fp64 ones).
* "the option matters": the same weights under the config without the option differ from transformers by
  > 1e-3, so the case exercises the option and not only the default path.
* greedy generation: token-identical to ``transformers`` ``generate``.
* save -> ``AutoModelForCausalLM`` reload: logits <= 1e-4, tensors bit-exact.
* cross-backend ``step()``: per-update loss |jax - torch| <= 1e-4, per-tensor relative parameter difference
  <= 1e-4, greedy next tokens identical.
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer
from itersft_jax.io import weights
from itersft_jax.models import get_family
from itersft_jax.models.attention.masks import positions_from_mask, positions_from_segments
from itersft_jax.sampler.engine import sample_ids
from itersft_jax.shared.flow import StepStats
from tests.support.offline import perturbed_tiny_model, tiny_config

VOCAB = 320
ATOL = 1e-4

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
QWEN_SLIDING = {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}
# longrope's per-frequency factors (head_dim 16: 8 of them); original length 16 < the 24-token batch below, so
# the padded batch takes the long factors and the packed one (samples <= 9 tokens) the short ones.
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [2.0 + 0.5 * i for i in range(8)], "original_max_position_embeddings": 16}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
GEMMA3_ROPES = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}

# case: (model_type, config overrides, overrides that remove the option under test — None: nothing to remove)
CASES = {
    "llama-untied": ("llama", {}, None),
    "llama-tied": ("llama", {"tie_word_embeddings": True}, None),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}, None),
    "llama-head_dim-gelu": ("llama", {"head_dim": 32, "hidden_act": "gelu_pytorch_tanh", "rope_theta": 500000.0},
                            None),
    "llama-rope-llama3": ("llama", {"rope_scaling": LLAMA3}, {"rope_scaling": None}),
    "llama-rope-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, {"rope_scaling": None}),
    # dynamic NTK only changes anything past max_position_embeddings: 16 < sequence 24
    "llama-rope-dynamic": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0},
                                     "max_position_embeddings": 16}, {"rope_scaling": None}),
    "llama-rope-yarn": ("llama", {"rope_scaling": YARN, "max_position_embeddings": 64}, {"rope_scaling": None}),
    "llama-rope-longrope": ("llama", {"rope_scaling": LONGROPE}, {"rope_scaling": None}),
    "mistral-window8": ("mistral", {"sliding_window": 8}, {"sliding_window": None}),
    "qwen2": ("qwen2", {}, None),
    "qwen2-window8": ("qwen2", QWEN_SLIDING, {"use_sliding_window": False}),
    "qwen2-rope-yarn-mscale": ("qwen2", {"rope_scaling": {**YARN, "mscale": 2.0, "mscale_all_dim": 1.0,
                                                          "beta_fast": 16}}, {"rope_scaling": None}),
    "qwen3": ("qwen3", {}, None),
    "qwen3-tied-window8": ("qwen3", {**QWEN_SLIDING, "tie_word_embeddings": True}, {"use_sliding_window": False}),
    "qwen3-rope-longrope": ("qwen3", {"rope_scaling": LONGROPE}, {"rope_scaling": None}),
    "gpt2-default": ("gpt2", {}, None),
    "gpt2-inner-relu-layeridx-upcast": ("gpt2", {"n_inner": 96, "activation_function": "relu",
                                                 "scale_attn_by_inverse_layer_idx": True,
                                                 "reorder_and_upcast_attn": True}, None),
    "gpt2-unscaled": ("gpt2", {"scale_attn_weights": False}, None),
    "gpt2-untied-gelu-eps": ("gpt2", {"tie_word_embeddings": False, "activation_function": "gelu",
                                      "layer_norm_epsilon": 1e-3}, None),
    "opt-pre-ln": ("opt", {}, None),
    "opt-350m-like": ("opt", {"do_layer_norm_before": False, "word_embed_proj_dim": 32}, None),
    "opt-nobias-noaffine": ("opt", {"enable_bias": False, "layer_norm_elementwise_affine": False,
                                    "activation_function": "gelu_new"}, None),
    "opt-untied-no-final-ln": ("opt", {"tie_word_embeddings": False, "_remove_final_layer_norm": True}, None),
    "gemma": ("gemma", {}, None),
    "gemma-untied-bias": ("gemma", {"attention_bias": True, "tie_word_embeddings": False}, None),
    "gemma2-softcaps": ("gemma2", {}, {"attn_logit_softcapping": None, "final_logit_softcapping": None}),
    "gemma2-window4": ("gemma2", {"sliding_window": 4}, {"layer_types": ["full_attention"] * 2}),
    "gemma3": ("gemma3_text", {}, None),
    "gemma3-global-rope-linear-softcap": ("gemma3_text", {"rope_parameters": GEMMA3_ROPES,
                                                          "final_logit_softcapping": 3.0},
                                          {"rope_parameters": None, "final_logit_softcapping": None}),
    "phi3": ("phi3", {}, None),
    "phi3-partial-window8": ("phi3", {"partial_rotary_factor": 0.5, "sliding_window": 8},
                             {"partial_rotary_factor": 1.0, "sliding_window": None}),
    # Phi-3 keeps original_max_position_embeddings on the config, not in the rope dict
    "phi3-longrope": ("phi3", {"rope_scaling": {k: v for k, v in LONGROPE.items() if not k.startswith("original")},
                               "original_max_position_embeddings": 16}, {"rope_scaling": None}),
    # OLMo 2: post-norms and q/k RMSNorm over the whole projection in every case (no config turns them off)
    "olmo2": ("olmo2", {}, None),
    "olmo2-bias-tied": ("olmo2", {"attention_bias": True, "tie_word_embeddings": True}, None),
    # SmolLM3's default on 2 layers has no NoPE layer (every 4th); then one, then one with a window (as HF's
    # default layer_types does: the NoPE layers slide)
    "smollm3": ("smollm3", {}, None),
    "smollm3-nope": ("smollm3", {"no_rope_layers": [1, 0]}, {"no_rope_layers": [1, 1]}),
    "smollm3-nope-window8-untied-bias": ("smollm3", {"no_rope_layers": [0, 1], "use_sliding_window": True,
                                                     "sliding_window": 8, "tie_word_embeddings": False,
                                                     "attention_bias": True, "mlp_bias": True},
                                         {"use_sliding_window": False}),
    # GPT-Neo: a global and a local layer (the default's window, 256, is wider than the rows), no q.k scaling
    "gpt_neo": ("gpt_neo", {}, None),
    "gpt_neo-local8": ("gpt_neo", {"window_size": 8}, {"window_size": 256}),
    "gpt_neo-local4-untied-inner-relu": ("gpt_neo", {"attention_types": [[["local"], 2]], "window_size": 4,
                                                     "tie_word_embeddings": False, "intermediate_size": 96,
                                                     "activation_function": "relu"}, {"window_size": 256}),
    # Pythia's shape (parallel residual, rotary on 4 of 16 dims); without: rotary on every dim
    "gpt_neox": ("gpt_neox", {}, {"rotary_pct": 1.0}),
    "gpt_neox-sequential-tied-nobias": ("gpt_neox", {"use_parallel_residual": False, "attention_bias": False,
                                                     "tie_word_embeddings": True}, {"use_parallel_residual": True}),
    "gpt_neox-rope-linear": ("gpt_neox", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}, "rotary_pct": 0.5},
                             {"rope_scaling": None}),
    "gptj": ("gptj", {}, None),  # interleaved rotary on the whole 16-dim head
    "gptj-rotary8-tied": ("gptj", {"rotary_dim": 8, "tie_word_embeddings": True, "activation_function": "gelu"},
                          {"rotary_dim": 16}),
    # Mixture of experts (4 experts, 2 per token): Mixtral always renormalises the top-k probabilities; Qwen/OLMoE
    # only with norm_topk_prob. Sparse/dense layer patterns change the parameters, so they have no "without" case.
    "mixtral": ("mixtral", {}, None),
    "mixtral-window8": ("mixtral", {"sliding_window": 8}, {"sliding_window": None}),
    "qwen2_moe-shared-expert": ("qwen2_moe", {}, None),
    "qwen2_moe-norm_topk-window8": ("qwen2_moe", {"norm_topk_prob": True, **QWEN_SLIDING},
                                    {"norm_topk_prob": False, "use_sliding_window": False}),
    "qwen2_moe-sparse-step2": ("qwen2_moe", {"decoder_sparse_step": 2}, None),
    "qwen3_moe": ("qwen3_moe", {}, None),
    "qwen3_moe-norm_topk-mlp-only": ("qwen3_moe", {"norm_topk_prob": True, "mlp_only_layers": [0]}, None),
    "olmoe": ("olmoe", {}, None),
    "olmoe-clip-norm_topk": ("olmoe", {"clip_qkv": 0.5, "norm_topk_prob": True},
                             {"clip_qkv": None, "norm_topk_prob": False}),
}
# one case per family (phi3's covers longrope); decode-path quirks: windows, softcaps, NoPE, local layers, rotary dims
GENERATE = ["llama-rope-dynamic", "qwen3-tied-window8", "gpt2-default", "opt-350m-like",
            "gemma2-softcaps", "gemma3-global-rope-linear-softcap", "phi3-longrope", "olmo2-bias-tied",
            "smollm3-nope-window8-untied-bias", "gpt_neo-local8", "gpt_neox", "gptj-rotary8-tied", "mixtral-window8",
            "qwen2_moe-norm_topk-window8", "qwen3_moe", "olmoe-clip-norm_topk"]
# one case per new family (the one with the most options): a save round trip tests the checkpoint table
SAVE = ["llama-untied", "qwen3-tied-window8", "gpt2-default", "gpt2-untied-gelu-eps", "opt-350m-like",
        "opt-nobias-noaffine", "opt-untied-no-final-ln", "gemma-untied-bias", "gemma2-softcaps", "gemma3",
        "phi3-partial-window8", "olmo2-bias-tied", "smollm3-nope-window8-untied-bias",
        "gpt_neo-local4-untied-inner-relu", "gpt_neox-sequential-tied-nobias", "gptj-rotary8-tied", "mixtral",
        "qwen2_moe-sparse-step2", "qwen3_moe-norm_topk-mlp-only", "olmoe"]
# offline.tiny_config defaults
# (qwen2 and phi3 are Llama's blocks with biases / fused projections: their mapping is SAVE's round trip, their
# gradients autodiff of the logits LOGITS checks)
PARITY = ["llama", "gpt2", "opt", "gemma2", "gemma3_text", "olmo2", "smollm3", "gpt_neo", "gpt_neox", "gptj"]


@functools.cache
def hf_model(case: str):
    model_type, overrides, _ = CASES[case]
    return perturbed_tiny_model(model_type, VOCAB, **overrides)


@functools.cache
def jax_model(case: str):
    return weights.load_model(hf_model(case))[0]


def right_padded(lengths, seed=0):
    rng = np.random.default_rng(seed)
    total = max(lengths)
    mask = (np.arange(total)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    ids = np.where(mask, rng.integers(3, VOCAB, (len(lengths), total)), 0)
    return ids, mask, np.asarray(positions_from_mask(jnp.asarray(mask)))


def hf_logits(model, ids, mask, positions):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.numpy()


def jax_logits(model, ids, mask, positions):
    logits, cache = model(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask))
    assert cache is None and logits.dtype == jnp.float32
    return np.asarray(logits)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case):
    hf, model = hf_model(case), jax_model(case)
    ids, mask, positions = right_padded([24, 17, 9])
    real = mask.astype(bool)
    expected = hf_logits(hf, ids, mask, positions)
    assert np.abs(jax_logits(model, ids, mask, positions) - expected)[real].max() <= ATOL

    # Packed rows (segment ids, positions restarting per sample) == transformers on the same samples padded.
    lengths = [5, 9, 7]
    ids3, mask3, positions3 = right_padded(lengths, seed=1)
    expected3 = hf_logits(hf, ids3, mask3, positions3)
    row_a, row_b = np.concatenate([ids3[0, :5], ids3[2, :7], [0, 0]]), np.concatenate([ids3[1, :9], [0] * 5])
    seg = np.array([[1] * 5 + [2] * 7 + [0, 0], [1] * 9 + [0] * 5])
    packed = jax_logits(model, np.stack([row_a, row_b]), seg, np.asarray(positions_from_segments(jnp.asarray(seg))))
    for got, (sample, n) in [(packed[0, :5], (0, 5)), (packed[0, 5:12], (2, 7)), (packed[1, :9], (1, 9))]:
        assert np.abs(got - expected3[sample, :n]).max() <= ATOL

    model_type, overrides, without = CASES[case]
    if without is not None:
        plain = get_family(model_type).CausalLM(tiny_config(model_type, VOCAB,
                                                            **copy.deepcopy({**overrides, **without})))
        nnx.update(plain, nnx.state(model, nnx.Param))
        assert np.abs(jax_logits(plain, ids, mask, positions) - expected)[real].max() > 1e-3, "option had no effect"


def hf_greedy(model, rows, max_new_tokens, eos):
    """transformers' greedy generate on left-padded rows, each cut after its first EOS."""
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             min_new_tokens=0, eos_token_id=eos, pad_token_id=0, num_beams=1, temperature=None,
                             top_k=None, top_p=None)
    new = out[:, width:].tolist()
    return [row[:row.index(eos) + 1] if eos in row else row for row in new]


@pytest.mark.parametrize("case", GENERATE)
def test_greedy_generate_matches_transformers(case):
    """Prompts 4-10 tokens + 12 new: past the 8-token windows, and across the 16-token thresholds of dynamic and
    longrope (HF's Llama crosses with its cache kept; Phi-3 gets prompts past 16, see ``rope.py``)."""
    rng = np.random.default_rng(2)
    lengths = [20, 18, 17] if case == "phi3-longrope" else [10, 7, 4]
    rows = [rng.integers(3, VOCAB, n).tolist() for n in lengths]
    graphdef, params = nnx.split(jax_model(case), nnx.Param)
    ours = sample_ids(graphdef, params, rows, max_new_tokens=12, eos_token_id=2, pad_token_id=0).sequences
    assert ours == hf_greedy(hf_model(case), rows, 12, eos=2)


@pytest.mark.parametrize("case", SAVE)
def test_save_reloads_in_transformers(case, tmp_path):
    import safetensors.numpy
    from transformers import AutoModelForCausalLM

    hf, model = hf_model(case), jax_model(case)
    family = get_family(hf.config.model_type)
    # A freshly initialised JAX model: params_from_hf(params_to_hf(p)) rebuilds exactly its state tree.
    fresh = nnx.to_pure_dict(nnx.state(family.CausalLM(hf.config, rngs=nnx.Rngs(3)), nnx.Param))
    back = family.params_from_hf(family.params_to_hf(fresh, hf.config), hf.config)
    assert jax.tree.structure(back) == jax.tree.structure(fresh)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), fresh, back)

    out = weights.save_pretrained(model, hf.config, tmp_path / "ours")
    hf.save_pretrained(tmp_path / "hf")
    theirs = safetensors.numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
    saved = weights.read_safetensors(out)
    assert sorted(saved) == sorted(theirs)  # the names save_pretrained writes (a tied head omitted, like HF)
    for name, array in theirs.items():
        np.testing.assert_array_equal(saved[name], array, err_msg=name)

    loaded, info = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, mask, positions = right_padded([12, 7], seed=3)
    ours = jax_logits(model, ids, mask, positions)
    assert np.abs(hf_logits(loaded.float().eval(), ids, mask, positions) - ours)[mask.astype(bool)].max() <= ATOL


# ----------------------------------------------------------------------------- cross-backend step() parity

CALLS = [
    dict(texts=["The quick brown fox jumps over the lazy dog.", "hello world", "a b c d e f",
                "Generate with the model, filter the samples"]),
    "ids_with_labels",
    dict(prompts=["12 + 30 =", "7 * 6 =", "Question: what is two plus two?"],
         completions=[" 42", " 42", " Answer: four."]),
    dict(texts=["JAX and PyTorch compute the same loss", "Rejection sampling keeps only the verified",
                "def add(a, b):", "abcdefghijklmnopqrstuvwxyz", "0123456789"]),
    dict(prompts=["Generate with the model,"], completions=[" filter the samples, then step on what survived."]),
]
HELD_OUT = ["The quick brown", "12 + 30", "Iterative supervised"]
STAT_KEYS = set(StepStats.KEYS)


def _run(model_dir, tokenizer, tmp_path, backend):
    args = IterativeSFTConfig(
        output_dir=str(tmp_path / backend), backend=backend, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_grad_norm=0.5, warmup_steps=2, weight_decay=0.1, learning_rate=3e-3,
        lr_scheduler_type="linear", max_steps=20, logging_steps=1, gradient_checkpointing=False, seed=11,
        report_to="none", disable_tqdm=True)
    trainer = IterativeSFTTrainer(model_dir, args=args, processing_class=tokenizer)
    for call in CALLS:
        if call == "ids_with_labels":
            ids = tokenizer(["Question: what is two plus two? Answer: four.", "def add(a, b): return a + b"]).input_ids
            call = dict(input_ids=ids, labels=[[-100] * 6 + x[6:] for x in ids])
        stats = trainer.step(**call)
        assert set(stats) == STAT_KEYS, backend  # one step() contract: the same statistics on both engines
    return trainer, [e["loss"] for e in trainer.state.log_history if "loss" in e]


def _greedy_next(trainer, tokenizer, jax_side):
    out = []
    for text in HELD_OUT:
        ids = np.asarray([tokenizer(text).input_ids])
        if jax_side:
            logits, _ = trainer.model(ids, positions_from_mask(np.ones_like(ids)), np.ones_like(ids))
            out.append(int(np.asarray(logits)[0, -1].argmax()))
        else:
            with torch.no_grad():
                out.append(int(trainer.model(input_ids=torch.as_tensor(ids)).logits[0, -1].argmax()))
    return out


def _split_key_bias(name, value, ref, num_heads=None):
    """Separate attention key-bias entries (zero gradient in exact arithmetic) from the rest."""
    if name.endswith("k_proj.bias"):
        return value[:0], ref[:0], (value, ref)
    if name.endswith("c_attn.bias"):  # GPT-2's fused q|k|v bias
        d = value.shape[0] // 3
        keep = np.r_[0:d, 2 * d:3 * d]
        return value[keep], ref[keep], (value[d:2 * d], ref[d:2 * d])
    if name.endswith("query_key_value.bias"):  # GPT-NeoX's fused bias, per head: [q_h | k_h | v_h]
        part = np.broadcast_to(np.arange(3)[None, :, None], (num_heads, 3, value.shape[0] // (3 * num_heads)))
        is_key = part.reshape(-1) == 1
        return value[~is_key], ref[~is_key], (value[is_key], ref[is_key])
    return value, ref, None


@pytest.mark.parametrize("model_type", PARITY)
def test_jax_and_torch_backends_agree(model_type, tiny_model_dir, tokenizer, tmp_path):
    model_dir = tiny_model_dir(model_type)
    jax_trainer, jax_losses = _run(model_dir, tokenizer, tmp_path, "jax")
    torch_trainer, torch_losses = _run(model_dir, tokenizer, tmp_path, "torch")

    assert jax_trainer.state.global_step == torch_trainer.state.global_step == len(jax_losses)
    assert len(jax_losses) == len(torch_losses) >= 5
    np.testing.assert_allclose(jax_losses, torch_losses, atol=1e-4, rtol=0)

    family = get_family(jax_trainer.config.model_type)
    jax_params = family.params_to_hf(jax.device_get(nnx.to_pure_dict(jax_trainer.params)), jax_trainer.config)
    torch_params = {k: v.detach().float().numpy() for k, v in torch_trainer.model.state_dict().items()}
    assert jax_params, "no parameters mapped"
    if "embed_out.weight" in jax_params:  # GPT-NeoX: the module is lm_head, save_pretrained writes embed_out
        torch_params["embed_out.weight"] = torch_params.pop("lm_head.weight")
    for name, value in jax_params.items():
        value, ref, key_bias = _split_key_bias(name, value, torch_params[name],
                                               getattr(jax_trainer.config, "num_attention_heads", None))
        if value.size:
            rel = np.linalg.norm(value - ref) / max(np.linalg.norm(ref), 1e-12)
            assert rel <= 1e-4, f"{name}: relative difference {rel:.2e}"
        if key_bias is not None:
            # The loss's gradient w.r.t. a key bias is exactly 0 (it adds the same q.b_k to every logit of a
            # softmax row); both engines see float noise (~1e-11) that Adam scales to ~lr * g / eps per
            # update. Those entries are held to an absolute bound instead: <= 1e-4 after all updates.
            diff = np.abs(key_bias[0] - key_bias[1]).max()
            assert diff <= 1e-4, f"{name} (key bias): absolute difference {diff:.2e}"

    torch_trainer.model.eval()
    assert _greedy_next(jax_trainer, tokenizer, True) == _greedy_next(torch_trainer, tokenizer, False)


# ----------------------------------------------------------------------------- MoE: one step() on both engines

# The load-balancing loss is on where a case sets output_router_logits (coefficient 0.1 so that it moves the update).
MOE_STEP = {
    "mixtral-aux": ("mixtral", {"output_router_logits": True, "router_aux_loss_coef": 0.1}),
    "qwen2_moe-aux-sparse-step2": ("qwen2_moe", {"output_router_logits": True, "router_aux_loss_coef": 0.1,
                                                 "decoder_sparse_step": 2}),
    "qwen3_moe-aux-norm_topk": ("qwen3_moe", {"output_router_logits": True, "router_aux_loss_coef": 0.1,
                                              "norm_topk_prob": True}),
    "olmoe-no-aux": ("olmoe", {}),
}


@pytest.mark.parametrize("case", list(MOE_STEP))
def test_moe_step_matches_torch(case, tiny_model_dir, tokenizer, tmp_path):
    """One step() (one update of two micro-batches on the torch engine: its load-balancing loss is the update's,
    counted in a first pass) equals the torch engine's: loss (mean CE + coef * aux) and aux_loss within 1e-5, the
    gradient norm within 1e-5 relative, every parameter within 1e-5 relative (per tensor). Plain SGD: Adam's first
    step is ``lr * g / (|g| + eps)``, which turns float noise on entries with ``|g| ~ eps`` into differences of up
    to ``lr`` (seen: 3e-5 relative on unused expert rows), whatever the implementation."""
    model_type, overrides = MOE_STEP[case]
    model_dir = tiny_model_dir(model_type, **overrides)
    texts = CALLS[0]["texts"]
    trainers, stats = {}, {}
    for backend in ("jax", "torch"):
        args = IterativeSFTConfig(output_dir=str(tmp_path / backend), backend=backend, per_device_train_batch_size=2,
                                  gradient_accumulation_steps=2, learning_rate=3e-2, optim="sgd", seed=11,
                                  gradient_checkpointing=False, report_to="none", disable_tqdm=True)
        trainers[backend] = IterativeSFTTrainer(model_dir, args=args, processing_class=tokenizer)
        stats[backend] = trainers[backend].step(texts=texts)
    assert stats["jax"]["updates"] == stats["torch"]["updates"] == 1
    assert abs(stats["jax"]["loss"] - stats["torch"]["loss"]) <= 1e-5
    assert abs(stats["jax"]["grad_norm"] / stats["torch"]["grad_norm"] - 1) <= 1e-5
    balanced = overrides.get("output_router_logits", False)
    assert ("aux_loss" in stats["jax"]) == ("aux_loss" in stats["torch"]) == balanced
    if "aux_loss" in stats["jax"]:
        assert stats["jax"]["aux_loss"] > 1.0  # E * sum_e f_e P_e: about k = 2 (top-2) when balanced
        assert abs(stats["jax"]["aux_loss"] - stats["torch"]["aux_loss"]) <= 1e-5

    jax_trainer = trainers["jax"]
    family = get_family(jax_trainer.config.model_type)
    ours = family.params_to_hf(jax.device_get(nnx.to_pure_dict(jax_trainer.params)), jax_trainer.config)
    # transformers 5 keeps the experts fused in memory: read its state dict through the same table
    theirs = family.params_to_hf(family.params_from_hf(weights.state_dict_to_numpy(trainers["torch"].model),
                                                       jax_trainer.config), jax_trainer.config)
    for name, value in ours.items():
        rel = np.linalg.norm(value - theirs[name]) / max(np.linalg.norm(theirs[name]), 1e-12)
        assert rel <= 1e-5, f"{name}: relative difference {rel:.2e}"
