"""The sparse MoE block's parts (issue 29): the grouped matmul, the load-balancing loss, an update split over
micro-batches, checkpoints in both layouts, LoRA on a MoE model, refusals. (Logits, generation, saving and one
step() against transformers / the torch engine per family: ``test_families.py``; expert parallelism:
``test_moe_sharding.py``.)

Tolerances (fp32): the CPU's blocked grouped matmul against ``jax.lax.ragged_dot`` and against a dense loop over
the experts, values and gradients 1e-5; the load-balancing loss against transformers' ``aux_loss`` 1e-6; one update
packed into one or several micro-batches, loss / aux loss 1e-6 and parameters after an SGD step 1e-6 relative per
tensor (Adam would amplify the float noise of near-zero gradients, see test_families); a saved
adapter's logits in peft against the JAX model 1e-4.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer
from itersft_jax.io import weights
from itersft_jax.models import get_family, moe
from itersft_jax.models.attention.masks import positions_from_mask
from tests.support.offline import make_tokenizer, perturbed_tiny_model, save_tiny_model

VOCAB = 320
TEXTS = ["The quick brown fox jumps over the lazy dog.", "hello world", "def add(a, b):\n    return a + b",
         "12 + 30 = 42.", "Rejection sampling keeps only the verified completions.", "JAX and PyTorch"]


def _routing(n=40, e=6, k=2, d=16, f=24, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(keys[0], (n, d))
    probs = jax.nn.softmax(jax.random.normal(keys[1], (n, e)))
    weights_NK, ids_NK = jax.lax.top_k(probs, k)
    keep = jnp.broadcast_to((jnp.arange(n) % 7 != 3)[:, None], (n, k))  # some padding tokens
    w = [0.3 * jax.random.normal(keys[i], shape) for i, shape in zip((2, 3, 4), ((e, d, f), (e, d, f), (e, f, d)))]
    return x, ids_NK, weights_NK, keep, w


def _dense_reference(x, ids, weights_NK, keep, gate, up, down):
    """Every expert on every token, then the top-k mix: E times the work, obviously right."""
    h = jax.nn.silu(jnp.einsum("nd,edf->enf", x, gate)) * jnp.einsum("nd,edf->enf", x, up)
    y_END = jnp.einsum("enf,efd->end", h, down)
    mix_NE = jnp.sum(jax.nn.one_hot(ids, gate.shape[0]) * (weights_NK * keep)[..., None], axis=1)
    return jnp.einsum("end,ne->nd", y_END, mix_NE)


@pytest.mark.parametrize("blocked", [True, False])
def test_grouped_matmul_equals_every_expert_on_every_token(blocked):
    x, ids, w_NK, keep, experts = _routing()

    def loss(fn, x, w_NK, *experts):
        return jnp.sum(jnp.sin(fn(x, ids, w_NK, keep, *experts)))

    ours = functools.partial(moe.expert_mlp, act="silu", blocked=blocked)
    got, want = (jax.value_and_grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3, 4))(x, w_NK, *experts)
                 for fn in (ours, _dense_reference))
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # padding copies reach no expert: their tokens' outputs are exactly zero
    y = ours(x, ids, w_NK, keep, *experts)
    assert float(jnp.abs(y[~keep[:, 0]]).max()) == 0.0


def test_dispatch_pads_each_expert_to_whole_blocks():
    ids = jnp.array([[0, 2], [2, 1], [0, 2], [1, 0]])
    keep = jnp.array([[True, True], [True, True], [False, False], [True, True]])
    dest, source, counts, block_expert, rows = moe.dispatch(ids, keep, num_experts=3, block=2)
    assert counts.tolist() == [2, 2, 2] and rows == (8 // 2 + 3) * 2
    assert block_expert.tolist()[:3] == [0, 1, 2] and set(block_expert.tolist()[3:]) == {3}  # empty blocks
    assert dest.reshape(4, 2)[2].tolist() == [rows, rows]  # dropped copies go nowhere
    assert source.tolist()[:6] == [0, 3, 1, 3, 0, 1]


@pytest.mark.parametrize("model_type,overrides", [("mixtral", {}), ("qwen2_moe", {"decoder_sparse_step": 2})])
def test_load_balancing_loss_matches_transformers(model_type, overrides):
    # Right-padded rows: transformers' attention-mask weighting (padding carries no weight); qwen2_moe with a dense
    # layer: only the sparse layers' routers count.
    hf = perturbed_tiny_model(model_type, VOCAB, output_router_logits=True, **overrides)
    model = weights.load_model(hf)[0]
    lengths = [24, 17, 9]
    mask = (np.arange(24)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    ids = np.where(mask, np.random.default_rng(0).integers(3, VOCAB, (3, 24)), 0)
    pos = np.asarray(positions_from_mask(jnp.asarray(mask)))
    with torch.no_grad():
        expected = float(hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                            position_ids=torch.tensor(pos)).aux_loss)
    _, stats = moe.collect_router_stats(model, lambda m: m.hidden_states(jnp.asarray(ids), jnp.asarray(pos),
                                                                         jnp.asarray(mask))[0])
    assert abs(float(moe.load_balancing_loss(stats)) - expected) <= 1e-6
    assert float(stats.tokens) == sum(lengths) * sum(model.spec.moe.sparse)


def test_an_update_split_over_micro_batches_is_the_same_update(tmp_path):
    """The same update packed into one micro-batch and into three (the load-balancing loss then needs the first,
    counting pass): loss, aux loss and the new parameters agree."""
    from itersft_jax.core.packing import pack_update
    from itersft_jax.shared.data import prepare_examples

    tokenizer = make_tokenizer()
    model_dir = save_tiny_model(tmp_path / "m", "qwen2_moe", tokenizer, output_router_logits=True,
                                router_aux_loss_coef=0.5)
    examples = prepare_examples(texts=TEXTS, tokenizer=tokenizer, max_length=None, truncation_mode="keep_end",
                                vocab_size=VOCAB)
    results = []
    for rows, micro in ((6, 1), (1, 6)):
        trainer = IterativeSFTTrainer(model_dir, args=IterativeSFTConfig(
            output_dir=str(tmp_path / f"t{rows}"), learning_rate=1e-1, optim="sgd", report_to="none",
            disable_tqdm=True, gradient_checkpointing=False), processing_class=tokenizer)
        batch, used = pack_update([examples], row_length=32, rows=rows, num_micro_batches=micro)
        assert used == 1 if micro == 1 else used >= 3
        state, metrics = trainer.train_step(trainer.train_state, {k: jnp.asarray(v) for k, v in batch.items()})
        results.append((jax.device_get(metrics), jax.device_get(nnx.to_pure_dict(state.params))))
    (one, params_one), (three, params_three) = results
    assert abs(one["loss"] - three["loss"]) <= 1e-6 and abs(one["aux_loss"] - three["aux_loss"]) <= 1e-6
    assert one["aux_loss"] > 1.0
    for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_three)):
        assert np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(a)


@pytest.mark.parametrize("model_type", ["mixtral", "olmoe"])
def test_fused_and_per_expert_checkpoints_read_alike(model_type, tmp_path):
    # transformers 5 in memory: mlp.experts.gate_up_proj [E, 2F, D]; save_pretrained: one tensor per expert.
    hf = perturbed_tiny_model(model_type, VOCAB)
    family = get_family(model_type)
    fused = weights.state_dict_to_numpy(hf)
    assert any(name.endswith("experts.gate_up_proj") for name in fused)
    hf.save_pretrained(tmp_path)
    per_expert = weights.read_safetensors(tmp_path)
    assert not any("gate_up_proj" in name for name in per_expert)
    a, b = family.params_from_hf(fused, hf.config), family.params_from_hf(per_expert, hf.config)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    assert family.params_to_hf(a, hf.config).keys() == per_expert.keys()  # written as save_pretrained writes


def test_refusals_name_the_setting():
    from itersft_jax.models import lora

    with pytest.raises(ValueError, match="router_jitter_noise"):
        get_family("mixtral").CausalLM(perturbed_tiny_model("mixtral", VOCAB, router_jitter_noise=0.1).config)
    config = perturbed_tiny_model("mixtral", VOCAB).config
    qwen = perturbed_tiny_model("qwen2_moe", VOCAB).config
    for cfg, targets in ((config, ["w1"]), (config, ["q_proj", "gate"]), (qwen, ["q_proj", "gate_proj"]),
                         (config, "model.layers.0.block_sparse_moe.experts.*"), (qwen, "all-linear")):
        with pytest.raises(ValueError, match="experts"):
            lora.resolve_targets(cfg, targets)
    assert sorted(lora.resolve_targets(config, ["q_proj"])) == ["model.layers.0.self_attn.q_proj",
                                                                "model.layers.1.self_attn.q_proj"]


def test_lora_on_a_moe_adapts_attention_and_the_shared_expert_gate(tmp_path):
    """Attention and the shared expert's gate of a Qwen2-MoE; a step trains; the saved adapter in peft gives the JAX
    model's logits. (MLP names such as gate_proj also name the experts, which PEFT then adapts: refused above.)"""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer()
    base_dir = save_tiny_model(tmp_path / "base", "qwen2_moe", tokenizer, decoder_sparse_step=2)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["q_proj", "v_proj", "o_proj", "shared_expert_gate"])
    trainer = IterativeSFTTrainer(base_dir, args=IterativeSFTConfig(
        output_dir=str(tmp_path / "out"), learning_rate=1e-2, report_to="none", disable_tqdm=True,
        gradient_checkpointing=False), processing_class=tokenizer, peft_config=config)
    kinds = sorted({name.split(".")[-1] for name in trainer.adapters.targets})
    assert kinds == ["o_proj", "q_proj", "shared_expert_gate", "v_proj"]
    assert not any(".experts." in name or name.endswith("mlp.gate") for name in trainer.adapters.targets)
    assert np.isfinite(trainer.step(texts=TEXTS)["loss"])
    saved = trainer.save_model(str(tmp_path / "adapter"))
    ids = np.asarray([tokenizer("hello world, the quick brown fox").input_ids])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), saved).eval()
    with torch.no_grad():
        got = peft_model(torch.tensor(ids)).logits.numpy()
    mask = np.ones_like(ids)
    expected = np.asarray(trainer.model(ids, positions_from_mask(mask), mask)[0])
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_low_level_passes_add_the_load_balancing_loss_alike(tmp_path):
    """forward_backward and forward (cross_entropy, token-weighted) on a Mixtral with the load-balancing loss on: the
    summed loss equals the torch engine's (1e-5) and exceeds the plain cross-entropy by coef * aux; the pass's data
    spans two micro-batches on the torch engine (its first, counting pass)."""
    from itersft_jax.shared.datum import make_data

    tokenizer = make_tokenizer()
    model_dir = save_tiny_model(tmp_path / "m", "mixtral", tokenizer, output_router_logits=True,
                                router_aux_loss_coef=0.5)
    prompts = tokenizer(TEXTS[:3]).input_ids
    completions = tokenizer([" four.", " 42.", " b"], add_special_tokens=False).input_ids
    data = make_data(prompts, completions)
    sums = {}
    for backend in ("jax", "torch"):
        trainer = IterativeSFTTrainer(model_dir, args=IterativeSFTConfig(
            output_dir=str(tmp_path / backend), backend=backend, per_device_train_batch_size=2, report_to="none",
            disable_tqdm=True, gradient_checkpointing=False), processing_class=tokenizer)
        sums[backend] = (trainer.forward(data).metrics["loss:sum"], trainer.forward_backward(data).metrics["loss:sum"])
        ce = sum(-float(np.sum(lp[-len(c):])) for lp, c in zip(trainer.compute_logprobs(
            [np.concatenate([p, c]) for p, c in zip(prompts, completions)]), completions))
        assert 0.5 * 1.5 < sums[backend][0] - ce < 0.5 * 4  # coef * aux; aux ~ k = 2 when the routing is balanced
    assert abs(sums["jax"][0] - sums["jax"][1]) <= 1e-5
    np.testing.assert_allclose(sums["jax"], sums["torch"], atol=1e-5)
