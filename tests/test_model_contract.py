"""The model contract every family shares (``models/base.py``, ``layers.py``, ``attention/``, ``mapping.py``,
``rope.py``): weight-mapping errors, activations, parameter naming, RoPE config reading, remat policies, attention
implementations and the soft-capped attention's gradients, NEFTune, the GPU/TPU matmul path, bf16 compute, and
cached decoding.

Tolerances: fp32 vs transformers <= 1e-4 (as in ``test_families``); remat vs no remat, fp32, values and
gradients <= 1e-6 (the same computation, rescheduled); the XLA attention's custom VJP vs autodiff of a plain
implementation <= 1e-5; bf16 compute vs fp32 transformers <= 0.1 on O(1) logits (bf16 keeps ~3 digits); the plain
bf16 matmul path vs the CPU-tuned one: values equal, gradients within bf16 rounding of the cotangent (1e-2 rel.).
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from itersft_jax.io import weights
from itersft_jax.models import get_family, layers, supported_model_types
from itersft_jax.models.attention import attention, attention_context, resolve_attention_implementation
from itersft_jax.models.attention.masks import make_attention_mask, positions_from_mask, positions_from_segments
from itersft_jax.models.layers import ACTIVATIONS, LMHead, dense, head_logits, neftune_noise
from itersft_jax.models.rope import rope_parameters
from tests.support.offline import perturbed_tiny_model, tiny_config, tiny_model

VOCAB = 320


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


# ----------------------------------------------------------------------------- weights, names, configs


def test_checkpoints_without_the_canonical_prefix_and_with_buffers_load():
    for model_type, strip in [("gpt2", "transformer."), ("opt", "model.")]:
        hf = tiny_model(model_type, VOCAB)
        family = get_family(model_type)
        full = weights.state_dict_to_numpy(hf)
        tensors = {k.removeprefix(strip): v for k, v in full.items() if k != "lm_head.weight"}
        if model_type == "gpt2":  # the original "gpt2" checkpoint's causal-mask buffers
            tensors["h.0.attn.bias"] = np.ones((1, 1, 4, 4), np.float32)
            tensors["h.0.attn.masked_bias"] = np.float32(-1e4)
        jax.tree.map(np.testing.assert_array_equal, family.params_from_hf(full, hf.config),
                     family.params_from_hf(tensors, hf.config))


def test_gpt_neox_and_gptj_checkpoint_names():
    """GPT-NeoX's head is ``embed_out`` in files and ``lm_head`` in memory; a ``GPTNeoXModel`` checkpoint lacks the
    ``gpt_neox.`` prefix; old Pythia and GPT-J files carry causal-mask and rotary buffers: all load the same."""
    hf = tiny_model("gpt_neox", VOCAB)
    family, in_memory = get_family("gpt_neox"), weights.state_dict_to_numpy(hf)
    assert "lm_head.weight" in in_memory and "embed_out.weight" not in in_memory
    saved = family.params_to_hf(family.params_from_hf(in_memory, hf.config), hf.config)
    assert "embed_out.weight" in saved and "lm_head.weight" not in saved
    old = {k.removeprefix("gpt_neox."): v for k, v in saved.items()}
    old.update({"layers.0.attention.bias": np.ones((1, 1, 4, 4), bool), "layers.0.attention.masked_bias":
                np.float32(-1e9), "layers.0.attention.rotary_emb.inv_freq": np.ones(2, np.float32)})
    jax.tree.map(np.testing.assert_array_equal, family.params_from_hf(in_memory, hf.config),
                 family.params_from_hf(old, hf.config))
    hf = tiny_model("gptj", VOCAB)
    family, tensors = get_family("gptj"), weights.state_dict_to_numpy(hf)
    buffers = {"transformer.h.0.attn.bias": np.ones((1, 1, 4, 4), bool), "transformer.h.0.attn.masked_bias":
               np.float32(-1e9)}
    jax.tree.map(np.testing.assert_array_equal, family.params_from_hf(tensors, hf.config),
                 family.params_from_hf({**tensors, **buffers}, hf.config))


def test_gptj_rotary_dim_that_cannot_run_is_refused():
    family = get_family("gptj")
    for rotary_dim in (18, 7):
        with pytest.raises(ValueError, match=f"rotary_dim={rotary_dim} must be even and at most the head size 16"):
            family.CausalLM(tiny_config("gptj", VOCAB, rotary_dim=rotary_dim))


@pytest.mark.parametrize("model_type,name", [("llama", "model.layers.1.mlp.up_proj.weight"),
                                             ("gpt2", "transformer.h.1.mlp.c_fc.weight"),
                                             ("opt", "model.decoder.layers.1.fc1.weight"),
                                             ("phi3", "model.layers.1.self_attn.qkv_proj.weight")])
def test_bad_checkpoints_raise_value_errors_naming_the_tensor(model_type, name):
    hf = tiny_model(model_type, VOCAB)
    family, tensors = get_family(model_type), weights.state_dict_to_numpy(hf)
    with pytest.raises(ValueError, match=f"{name}: checkpoint shape"):
        family.params_from_hf({**tensors, name: tensors[name][:-1]}, hf.config)
    with pytest.raises(ValueError, match=f"lacks 1 tensors.*{name}"):
        family.params_from_hf({k: v for k, v in tensors.items() if k != name}, hf.config)
    with pytest.raises(ValueError, match="unexpected.*something.else"):
        family.params_from_hf({**tensors, "something.else": tensors[name]}, hf.config)


def test_activations_match_transformers():
    from transformers.activations import ACT2FN

    x = np.linspace(-12, 12, 2001, dtype=np.float32)
    for name, fn in ACTIVATIONS.items():
        ref = ACT2FN[name](torch.tensor(x)).numpy()
        np.testing.assert_allclose(np.asarray(fn(jnp.asarray(x))), ref, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("model_type", supported_model_types())
def test_param_names_drive_the_decay_mask(model_type):
    """Every vector parameter is a bias or a norm scale by name: the optimizer's weight-decay mask reads names."""
    model = nnx.eval_shape(lambda: get_family(model_type).CausalLM(tiny_config(model_type, VOCAB)))
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    for path, leaf in flat:
        names = [str(getattr(k, "key", k)) for k in path]
        if leaf.ndim == 1:
            assert names[-1] == "bias" or any("norm" in n or n.startswith("ln") for n in names), names


@pytest.mark.parametrize("model_type", supported_model_types())
def test_sharding_rules_and_lora_names_cover_every_family(model_type):
    """Every parameter is named by a rule of the sharding table (none left to the fallback), and the LoRA target
    names (read from the family's checkpoint table) are the torch model's linear modules, the names PEFT uses."""
    from transformers.pytorch_utils import Conv1D

    from itersft_jax.models.lora import linear_modules
    from itersft_jax.parallel.sharding import logical_axes, path_name

    config = tiny_config(model_type, VOCAB)
    model = nnx.eval_shape(lambda: get_family(model_type).CausalLM(config))
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    unnamed = sorted({path_name(path) for path, leaf in flat if logical_axes(path_name(path), leaf.ndim) is None})
    assert not unnamed, f"no rule of parallel/sharding.PARAM_RULES names {unnamed}"
    torch_linear = {name for name, module in tiny_model(model_type, VOCAB).named_modules()
                    if isinstance(module, (torch.nn.Linear, Conv1D))}
    assert set(linear_modules(config)) - {"lm_head"} == torch_linear - {"lm_head"}  # a tied head has no table row


def test_rope_parameters_read_both_config_styles():
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 16}
    new_style = tiny_config("llama", VOCAB, rope_scaling=dict(llama3), rope_theta=500000.0)
    assert rope_parameters(new_style) == {**llama3, "rope_theta": 500000.0}
    legacy = types.SimpleNamespace(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=1e6)
    assert rope_parameters(legacy) == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
    assert rope_parameters(types.SimpleNamespace()) == {"rope_type": "default", "rope_theta": 10000.0}
    gemma3 = tiny_config("gemma3_text", VOCAB)  # nested by layer type; rope_local_base_freq -> sliding layers
    assert rope_parameters(gemma3, "sliding_attention")["rope_theta"] == 10000.0
    assert rope_parameters(gemma3, "full_attention")["rope_theta"] == 1e6


def test_unsupported_settings_fail_clearly():
    family = get_family("llama")
    config = tiny_config("llama", VOCAB, rope_scaling={"rope_type": "proportional", "factor": 2.0})
    with pytest.raises(ValueError, match="proportional.*backend='torch'"):
        family.CausalLM(config)
    with pytest.raises(ValueError, match="partial_rotary_factor"):  # HF's Llama ignores it: refuse, never guess
        family.CausalLM(tiny_config("llama", VOCAB, partial_rotary_factor=0.5))
    config = tiny_config("llama", VOCAB)
    config.hidden_act = "no_such_activation"
    with pytest.raises(ValueError, match="hidden_act"):
        family.CausalLM(config)
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        get_family("gemma3_text").CausalLM(tiny_config("gemma3_text", VOCAB, use_bidirectional_attention=True))



def test_olmo2_smollm3_gpt_neo_refuse_what_they_cannot_run():
    smollm3 = get_family("smollm3")
    config = tiny_config("smollm3", VOCAB)
    config.no_rope_layers = [1]  # transformers' config refuses it at construction, not when edited
    with pytest.raises(ValueError, match="no_rope_layers has 1 entries.*num_hidden_layers=2"):
        smollm3.CausalLM(config)
    config = tiny_config("smollm3", VOCAB, layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(ValueError, match="sliding_attention.*sliding_window is None"):  # transformers: at forward
        smollm3.CausalLM(config)
    config = tiny_config("gpt_neo", VOCAB)
    config.attention_layers = ["global", "sparse"]
    with pytest.raises(ValueError, match="attention_layers.*sparse"):
        get_family("gpt_neo").CausalLM(config)
    config.attention_layers = ["global"]
    with pytest.raises(ValueError, match="attention_layers has 1 entries.*num_layers=2"):
        get_family("gpt_neo").CausalLM(config)


def test_olmo2_rmsnorm_scales_in_fp32_like_transformers():
    """OLMo 2's RMSNorm multiplies the fp32 normed value by the weight and casts after; Llama's casts first. In bf16
    the switch gives transformers' ``Olmo2RMSNorm`` bit for bit (without it, ~25% of the values differ)."""
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    from itersft_jax.models.decoder import RMSNorm

    rng = np.random.default_rng(0)
    x = 3 * rng.normal(size=(64, 256)).astype(np.float32)
    w = (1 + 0.5 * rng.normal(size=(256,))).astype(np.float32)
    theirs = Olmo2RMSNorm(256, 1e-6).to(torch.bfloat16)
    with torch.no_grad():
        theirs.weight.copy_(torch.tensor(w))
        expected = theirs(torch.tensor(x).to(torch.bfloat16)).float().numpy()
    ours = RMSNorm(256, 1e-6, gemma=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scale_fp32=True)
    ours.weight[...] = jnp.asarray(w, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(ours(jnp.asarray(x, jnp.bfloat16)).astype(jnp.float32)), expected)


# ----------------------------------------------------------------------------- remat


def _loss_and_grads(model, ids, mask, positions):
    def loss(model):
        logits, _ = model(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        nll = -jnp.take_along_axis(logp[:, :-1], jnp.asarray(ids)[:, 1:, None], -1)[..., 0]
        return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum(), logits

    (value, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    return value, logits, nnx.to_pure_dict(grads)


@pytest.fixture(scope="module")
def llama_hf():
    return perturbed_tiny_model("llama", VOCAB)


@pytest.mark.parametrize("policy", ["full", "dots", "offload"])
def test_remat_policies_equal_no_remat(policy, llama_hf):
    ids, mask, positions = right_padded([16, 11])
    plain = weights.load_model(llama_hf)[0]
    remat = weights.load_model(llama_hf, remat=True, gradient_checkpointing_kwargs={"policy": policy,
                                                                                     "use_reentrant": False})[0]
    assert remat.remat == policy and plain.remat is None
    reference, got = _loss_and_grads(plain, ids, mask, positions), _loss_and_grads(remat, ids, mask, positions)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=0)


def test_remat_policies_keep_what_they_say(llama_hf):
    """What the backward pass keeps from the forward: everything without remat, matmul outputs with "dots",
    only layer inputs (and what lies outside the layers) with "full"."""
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    ids, mask, positions = right_padded([16, 11])
    counts = {}
    for policy in (False, "dots", "full"):
        graphdef, state = nnx.split(weights.load_model(llama_hf, remat=policy)[0])
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # one line per residual
            print_saved_residuals(lambda s, g=graphdef: jnp.sum(nnx.merge(g, s)(ids, positions, mask)[0]), state)
        counts[policy] = len(printed.getvalue().splitlines())
    assert counts[False] > counts["dots"] > counts["full"], counts


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_kwargs` is deprecated")  # TRL's name, still honoured
def test_trainer_passes_the_remat_policy(tiny_model_dir, tmp_path):
    from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer

    args = IterativeSFTConfig(output_dir=str(tmp_path), report_to="none", gradient_checkpointing=True,
                              gradient_checkpointing_kwargs={"policy": "dots"})
    assert IterativeSFTTrainer(tiny_model_dir("gpt2"), args=args).model.remat == "dots"


def test_remat_settings_are_checked():
    with pytest.raises(ValueError, match="gradient_checkpointing_kwargs.*polcy"):
        weights.remat_setting(True, {"polcy": "dots"})
    with pytest.raises(ValueError, match="remat must be"):
        get_family("gpt2").CausalLM(tiny_config("gpt2", VOCAB), remat="everything")
    assert weights.remat_setting(False, {"policy": "dots"}) is False  # no remat: the policy does not apply
    assert weights.remat_setting("offload", {"policy": "dots"}) == "offload"


# ----------------------------------------------------------------------------- attention


def test_attention_implementation_resolution():
    kw = {"dtype": jnp.float32, "head_dim": 16, "window": None, "softcap": None}
    for requested in (None, "auto", "xla", "eager", "sdpa"):
        assert resolve_attention_implementation(requested, **kw) == "xla"  # CPU, short rows
    assert resolve_attention_implementation("auto", seq_len=8192, **kw) == "xla_chunked"  # long rows
    assert resolve_attention_implementation("flash_attention_2", **kw) == "xla_chunked"  # never xla
    with pytest.raises(ValueError, match="attn_implementation='pallas'"):
        resolve_attention_implementation("pallas", **kw)
    with pytest.raises(TypeError, match="attn_implementation"):
        resolve_attention_implementation(3, **kw)


@pytest.mark.parametrize("model_type", ["qwen2", "gemma2"])
def test_kernel_path_equals_the_xla_path(model_type, tiny_model_dir):
    """The model's forward through attention.flash.flash_attention (xla_chunked, the kernel that runs on CPUs) equals
    the materializing path on packed rows with sliding windows (and Gemma 2's soft-cap): logits and gradients,
    fp32: logits 1e-5, each parameter's gradient 1e-5 relative (norm)."""
    overrides = {"qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=0),
                 "gemma2": dict(sliding_window=5)}[model_type]
    path = tiny_model_dir(model_type, **overrides)
    models = {impl: weights.load_model(path, attn_implementation=impl)[0] for impl in ("xla", "xla_chunked")}
    rng = np.random.default_rng(0)
    ids_BT = jnp.asarray(rng.integers(3, 300, (2, 24)), jnp.int32)
    seg_BT = jnp.asarray([[1] * 9 + [2] * 11 + [0] * 4, [1] * 24], jnp.int32)
    pos_BT = positions_from_segments(seg_BT)

    def loss(params, graphdef):
        logits = nnx.merge(graphdef, params)(ids_BT, pos_BT, seg_BT)[0]
        return jnp.sum(jnp.where(seg_BT[..., None] > 0, logits, 0.0) ** 2), logits

    results = {}
    for impl, model in models.items():
        graphdef, params = nnx.split(model, nnx.Param)
        results[impl] = jax.value_and_grad(loss, has_aux=True)(params, graphdef)
    (_, logits_x), grads_x = results["xla"]
    (_, logits_k), grads_k = results["xla_chunked"]
    real = np.asarray(seg_BT) > 0
    np.testing.assert_allclose(np.asarray(logits_k)[real], np.asarray(logits_x)[real], atol=1e-5, rtol=1e-5)
    for (path, gx), gk in zip(jax.tree_util.tree_leaves_with_path(grads_x), jax.tree.leaves(grads_k)):
        gx, gk = np.asarray(gx), np.asarray(gk)
        rel = np.linalg.norm(gk - gx) / max(np.linalg.norm(gx), 1e-12)
        assert rel <= 1e-5, f"{jax.tree_util.keystr(path)}: relative gradient difference {rel:.2e}"


def test_attn_implementation_reaches_the_model(tiny_model_dir):
    model, config = weights.load_model(tiny_model_dir("gpt2"), model_init_kwargs={"attn_implementation": "eager"})
    assert model.attn_implementation == "xla" and config.model_type == "gpt2"
    assert weights.load_model(tiny_model_dir("gpt2"), attn_implementation="xla")[0].attn_implementation == "xla"


def test_xla_attention_with_softcap_and_window_matches_autodiff_of_the_plain_formula():
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (2, 7, 4, 8))
    k, v = jax.random.normal(keys[1], (2, 7, 2, 8)), jax.random.normal(keys[2], (2, 7, 2, 8))
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 0], [1] * 7])  # a packed row with padding, and a full row
    w = jax.random.normal(keys[3], (2, 7, 4, 8)) * (seg != 0)[:, :, None, None]  # padding queries carry no loss
    scale, window, softcap = 0.7, 3, 1.5

    def ours(q, k, v):
        ctx = attention_context(seg, 7, None, "xla")
        out, _ = attention(q, k, v, None, ctx, scale=scale, window=window, softcap=softcap)
        return jnp.sum(out * w)

    def plain(q, k, v):
        k_n, v_n = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)  # query head n uses kv head n // 2
        logits = softcap * jnp.tanh(jnp.einsum("btnh,bsnh->bnts", q, k_n) * scale / softcap)
        mask = make_attention_mask(seg, 7, window=window)[:, None]
        probs = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1)
        return jnp.sum(jnp.einsum("bnts,bsnh->btnh", probs, v_n) * w)

    np.testing.assert_allclose(float(ours(q, k, v)), float(plain(q, k, v)), atol=1e-5, rtol=0)
    for a, b in zip(jax.grad(ours, argnums=(0, 1, 2))(q, k, v), jax.grad(plain, argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_cached_decode_equals_full_forward_with_windows_and_softcaps():
    """Prefill 9 slots into an empty cache, then decode one token at a time, on a left-padded batch (one row is
    all padding during the prefill); sliding window 4 < prefill, soft-capped logits (Gemma 2)."""
    model = weights.load_model(perturbed_tiny_model("gemma2", VOCAB, sliding_window=4))[0]
    total, prefill, cache_len = 16, 9, 20
    rng = np.random.default_rng(0)
    mask = (np.arange(total)[None] >= total - np.array([[16], [11], [5]])).astype(np.int32)
    ids = np.where(mask, rng.integers(3, VOCAB, (3, total)), 0)
    positions = positions_from_mask(jnp.asarray(mask))
    full = np.asarray(model(jnp.asarray(ids), positions, jnp.asarray(mask))[0])

    cache_mask = np.concatenate([mask, np.ones((3, cache_len - total), np.int32)], axis=1)
    step = nnx.jit(lambda m, i, p, a, c: m(i, p, a, c))
    logits, cache = step(model, ids[:, :prefill], positions[:, :prefill], cache_mask, model.init_cache(3, cache_len))
    pieces = [np.asarray(logits)]
    for t in range(prefill, total):
        logits, cache = step(model, ids[:, t:t + 1], positions[:, t:t + 1], cache_mask, cache)
        pieces.append(np.asarray(logits))
    assert int(cache.index) == total and not cache.empty
    np.testing.assert_array_less(np.abs(np.concatenate(pieces, axis=1) - full)[mask.astype(bool)], 1e-4)


# ----------------------------------------------------------------------------- NEFTune


@pytest.mark.parametrize("model_type,overrides", [("gemma", {}),  # the scaled embedding module
                                                  ("opt", {"word_embed_proj_dim": 32})])  # before project_in
def test_neftune_noise_lands_where_transformers_hook_adds_it(model_type, overrides):
    hf = perturbed_tiny_model(model_type, VOCAB, **overrides)
    model = weights.load_model(hf)[0]
    ids, mask, positions = right_padded([12, 7])
    alpha, key = 5.0, jax.random.key(3)
    width = hf.get_input_embeddings().weight.shape[1]
    noise = np.asarray(neftune_noise((alpha, key), jnp.zeros((2, 12, width)), jnp.asarray(mask)))
    handle = hf.get_input_embeddings().register_forward_hook(lambda module, args, out: out + torch.tensor(noise))
    try:
        expected = hf_logits(hf, ids, mask, positions)
    finally:
        handle.remove()
    real = mask.astype(bool)
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask), neftune=(alpha, key))[0])
    assert np.abs(got - expected)[real].max() <= 1e-4
    clean = np.asarray(model(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask))[0])
    assert np.abs(clean - expected)[real].max() > 1e-3


def test_neftune_noise_is_scaled_per_sample_and_zero_on_padding():
    seg = jnp.array([[1, 1, 1, 2, 2, 0, 0, 0], [1] * 8])
    alpha, dim = 5.0, 64
    noise = np.asarray(neftune_noise((alpha, jax.random.key(0)), jnp.zeros((2, 8, dim)), seg))
    assert not noise[0, 5:].any()
    for row, cols, length in [(0, slice(0, 3), 3), (0, slice(3, 5), 2), (1, slice(0, 8), 8)]:
        bound = alpha / np.sqrt(length * dim)  # HF's alpha / sqrt(L * D), L the sample's own length
        assert 0.9 * bound < np.abs(noise[row, cols]).max() <= bound
    embeds = jnp.ones((1, 2, 3))
    assert neftune_noise(None, embeds, seg[:1, :2]) is embeds  # None: no noise


# ----------------------------------------------------------------------------- matmul paths and bf16


def test_plain_dot_path_equals_the_cpu_tuned_path(monkeypatch):
    """The GPU/TPU path (plain dot, fp32 accumulation, XLA's autodiff) computes what the CPU's custom VJP does,
    for dense layers and for the LM head."""
    layer = nnx.Linear(16, 12, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    x = jax.random.normal(jax.random.key(1), (2, 3, 16))
    head_w = jax.random.normal(jax.random.key(2), (30, 16))

    def dense_loss(state, x):
        return jnp.sum(jnp.sin(dense(nnx.merge(graphdef, state), x).astype(jnp.float32)))

    def head_loss(head_w, x):
        return jnp.sum(jnp.sin(head_logits(LMHead(head_w, True, 2.0, jnp.bfloat16), x)
                               .astype(jnp.float32)))

    def both():
        return [jax.value_and_grad(dense_loss, argnums=(0, 1))(state, x),
                jax.value_and_grad(head_loss, argnums=(0, 1))(head_w, x)]

    monkeypatch.setattr(layers, "cpu_tuned_matmuls", lambda: True)  # forced both ways: the test runs on any backend
    tuned = both()
    monkeypatch.setattr(layers, "cpu_tuned_matmuls", lambda: False)
    for (value_a, grads_a), (value_b, grads_b) in zip(tuned, both()):
        assert float(value_a) == float(value_b)
        for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
            scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
            assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) <= 1e-2 * scale


@pytest.mark.parametrize("model_type", ["qwen3", "opt", "gemma2"])
def test_bf16_compute_and_params(model_type):
    hf = perturbed_tiny_model(model_type, VOCAB)
    ids, mask, positions = right_padded([16, 10])
    ref = hf_logits(hf, ids, mask, positions)
    for param_dtype in (jnp.float32, jnp.bfloat16):
        model = weights.load_model(hf, dtype=jnp.bfloat16, param_dtype=param_dtype)[0]
        assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(param_dtype)}
        logits = model(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask))[0]
        assert logits.dtype == jnp.bfloat16
        assert np.abs(np.asarray(logits, np.float32) - ref)[mask.astype(bool)].max() <= 0.1
