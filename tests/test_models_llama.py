"""The JAX Llama family (llama, mistral, qwen2, qwen3) against transformers' PyTorch models.

Tolerances: logits parity vs torch (fp32, eager attention) and KV-cache decode vs full forward are
max |diff| <= 1e-4 at real (non-pad) positions; both implementations compute in fp32, so a larger
difference is a real numerical bug, not noise. remat vs no remat: the same computation, rearranged by XLA:
logits <= 1e-6, gradients (of a summed loss, entries up to ~10) within 1e-5 abs + 1e-5 rel.
"""

from __future__ import annotations

import copy
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import tiny_config, tiny_model

from itersft_jax import weights
from itersft_jax.models import llama
from itersft_jax.models.common import positions_from_mask

VOCAB = 320
ATOL = 1e-4

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
QWEN_SLIDING = {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}

# (model_type, config overrides, overrides that remove the feature: its effect must exceed 1e-3,
#  which proves the case tests the feature and not just the default path)
CASES = {
    "llama-untied": ("llama", {}, None),
    "llama-tied": ("llama", {"tie_word_embeddings": True}, None),
    "llama-rope-llama3": ("llama", {"rope_scaling": LLAMA3}, {"rope_scaling": None}),
    "llama-rope-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
                          {"rope_scaling": None}),
    # dynamic NTK only changes anything past max_position_embeddings: 16 < sequence 24
    "llama-rope-dynamic": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0},
                                     "max_position_embeddings": 16}, {"rope_scaling": None}),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}, None),
    "llama-head_dim-gelu": ("llama", {"head_dim": 32, "hidden_act": "gelu_pytorch_tanh",
                                      "rope_theta": 500000.0}, None),
    "mistral-window8": ("mistral", {"sliding_window": 8}, {"sliding_window": None}),
    "qwen2": ("qwen2", {}, None),
    "qwen2-window8": ("qwen2", QWEN_SLIDING, {"use_sliding_window": False}),
    "qwen3": ("qwen3", {}, None),
    "qwen3-tied-window8": ("qwen3", {**QWEN_SLIDING, "tie_word_embeddings": True},
                           {"use_sliding_window": False}),
}


def random_torch_model(model_type, **overrides):
    """A tiny HF model whose biases and norm weights are random too (HF initializes them to 0 and 1)."""
    model = tiny_model(model_type, VOCAB, **copy.deepcopy(overrides))  # HF edits rope dicts in place
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
    return model


def padded_batch(lengths, total, side="right", seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (len(lengths), total))
    slots = np.arange(total)[None]
    lens = np.asarray(lengths)[:, None]
    mask = slots < lens if side == "right" else slots >= total - lens
    ids = np.where(mask, ids, 0)
    positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
    return ids, mask.astype(np.int64), positions


def torch_logits(model, ids, mask, positions):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.numpy()


def jax_logits(model, ids, mask, positions, cache=None):
    return model(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask), cache)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case):
    model_type, overrides, without_feature = CASES[case]
    torch_model = random_torch_model(model_type, **overrides)
    model, _ = weights.load_model(torch_model)
    ids, mask, positions = padded_batch([24, 17, 9], 24, side="right")
    real = mask.astype(bool)

    expected = torch_logits(torch_model, ids, mask, positions)
    got, cache = jax_logits(model, ids, mask, positions)
    assert cache is None and got.dtype == jnp.float32
    assert np.abs(np.asarray(got) - expected)[real].max() <= ATOL

    if without_feature is not None:
        plain = llama.CausalLM(tiny_config(model_type, VOCAB,
                                               **copy.deepcopy({**overrides, **without_feature})))
        nnx.update(plain, nnx.state(model, nnx.Param))
        plain_logits, _ = jax_logits(plain, ids, mask, positions)
        assert np.abs(np.asarray(plain_logits) - expected)[real].max() > 1e-3, "feature had no effect"


@pytest.mark.parametrize("case", ["llama-untied", "mistral-window8", "qwen3-tied-window8"])
def test_kv_cache_decode_matches_full_forward(case):
    """Prefill 12 slots, then decode one token at a time, on a left-padded batch (one row is all padding
    during the prefill). The cache is longer than the sequence, as in generation."""
    model_type, overrides, _ = CASES[case]
    model, _ = weights.load_model(random_torch_model(model_type, **overrides))
    total, prefill, cache_len = 20, 12, 24
    ids, mask, positions = padded_batch([20, 13, 6], total, side="left")
    full, _ = jax_logits(model, ids, mask, positions)

    cache_mask = np.concatenate([mask, np.ones((3, cache_len - total), np.int64)], axis=1)
    cache = model.init_cache(3, cache_len, jnp.float32)
    step = nnx.jit(lambda m, i, p, a, c: m(i, p, a, c))
    logits, cache = step(model, ids[:, :prefill], positions[:, :prefill], cache_mask, cache)
    pieces = [logits]
    for t in range(prefill, total):
        logits, cache = step(model, ids[:, t:t + 1], positions[:, t:t + 1], cache_mask, cache)
        pieces.append(logits)
    assert int(cache.index) == total
    decoded = np.concatenate([np.asarray(p) for p in pieces], axis=1)
    real = mask.astype(bool)
    assert np.abs(decoded - np.asarray(full))[real].max() <= ATOL


def test_remat_gives_identical_logits_and_gradients():
    torch_model = random_torch_model("llama")
    plain, _ = weights.load_model(torch_model)
    remat, _ = weights.load_model(torch_model, remat=True)
    ids, mask, positions = padded_batch([16, 11], 16)

    def loss(model):
        logits, _ = jax_logits(model, ids, mask, positions)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -(jnp.take_along_axis(logp[:, :-1], jnp.asarray(ids)[:, 1:, None], -1)[..., 0]
                 * mask[:, 1:]).sum(), logits

    def primitives(model):
        graphdef, state = nnx.split(model)
        fwd = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids, positions, mask)[0])(state)
        return [eqn.primitive.name for eqn in fwd.jaxpr.eqns]

    def checkpoints(model):  # jax.checkpoint's primitive: "remat2" today, "checkpoint" in some versions
        return sum(name.startswith(("remat", "checkpoint")) for name in primitives(model))

    assert checkpoints(remat) == 2 and checkpoints(plain) == 0  # one per layer

    grad_fn = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
    (loss_a, logits_a), grads_a = grad_fn(plain)
    (loss_b, logits_b), grads_b = grad_fn(remat)
    np.testing.assert_allclose(np.asarray(logits_a), np.asarray(logits_b), atol=1e-6, rtol=0)
    np.testing.assert_allclose(float(loss_a), float(loss_b), atol=1e-6, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5),
                 nnx.to_pure_dict(grads_a), nnx.to_pure_dict(grads_b))


def test_bf16_compute_and_params():
    """bf16 compute on fp32 params, and bf16 params: logits in bf16, close to fp32 (|diff| <= 0.1 on logits
    of magnitude ~1; bf16 has 8 mantissa bits)."""
    torch_model = random_torch_model("qwen3")
    ids, mask, positions = padded_batch([16, 10], 16)
    ref = torch_logits(torch_model, ids, mask, positions)
    for param_dtype in (jnp.float32, jnp.bfloat16):
        model, _ = weights.load_model(torch_model, dtype=jnp.bfloat16, param_dtype=param_dtype)
        assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(param_dtype)}
        logits, _ = jax_logits(model, ids, mask, positions)
        assert logits.dtype == jnp.bfloat16
        assert np.abs(np.asarray(logits, np.float32) - ref)[mask.astype(bool)].max() <= 0.1


def test_param_names_mirror_hf_and_drive_decay_mask():
    config = tiny_config("qwen3", VOCAB, attention_bias=True)
    model = llama.CausalLM(config)
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    paths = {".".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}
    assert paths["model.layers.1.self_attn.q_norm.weight"].shape == (16,)
    assert paths["model.layers.0.self_attn.o_proj.bias"].shape == (64,)
    for path, leaf in paths.items():
        if leaf.ndim == 1:  # every vector is a bias or a norm scale: the optimizer must not decay it
            assert path.endswith(".bias") or "norm" in path, path

    tensors = weights.state_dict_to_numpy(random_torch_model("qwen3", attention_bias=True))
    back = llama.params_to_hf(llama.params_from_hf(tensors, config), config)
    assert back.keys() == tensors.keys()
    for name in tensors:
        np.testing.assert_array_equal(back[name], tensors[name])


def test_rope_parameters_read_both_config_styles():
    new_style = tiny_config("llama", VOCAB, rope_scaling=dict(LLAMA3), rope_theta=500000.0)
    assert llama.rope_parameters(new_style) == {**LLAMA3, "rope_theta": 500000.0}
    legacy = types.SimpleNamespace(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=1e6)
    assert llama.rope_parameters(legacy) == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
    assert llama.rope_parameters(types.SimpleNamespace()) == {"rope_type": "default", "rope_theta": 10000.0}


def test_unsupported_settings_fail_clearly():
    config = tiny_config("llama", VOCAB, rope_scaling={"rope_type": "proportional", "factor": 2.0})
    with pytest.raises(ValueError, match="proportional.*backend='torch'"):
        llama.CausalLM(config)
    config = copy.deepcopy(tiny_config("llama", VOCAB))
    config.hidden_act = "no_such_activation"
    with pytest.raises(ValueError, match="hidden_act"):
        llama.CausalLM(config)
    tensors = weights.state_dict_to_numpy(random_torch_model("llama"))
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"][:8]
    with pytest.raises(ValueError, match="q_proj.weight: checkpoint shape"):
        llama.params_from_hf(tensors, tiny_config("llama", VOCAB))
