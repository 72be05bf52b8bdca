"""GPT-2 and OPT families: logits == transformers, KV cache == full forward, HF round trip, remat.

Tolerances (fp32 on CPU): JAX vs torch logits <= 1e-4 max abs at real positions (logits are O(1); the
differences are summation-order noise, ~1e-6 in practice); JAX vs JAX (cache, remat) <= 1e-5.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_model

from itersft_jax.models import common, get_family

VOCAB = 320
ATOL_HF = 1e-4
ATOL_JAX = 1e-5

CASES = {
    "gpt2-default": ("gpt2", {}),
    "gpt2-inner-relu-layeridx-upcast": ("gpt2", {"n_inner": 96, "activation_function": "relu",
                                                     "scale_attn_by_inverse_layer_idx": True,
                                                     "reorder_and_upcast_attn": True}),
    "gpt2-unscaled": ("gpt2", {"scale_attn_weights": False}),
    "gpt2-untied-gelu-eps": ("gpt2", {"tie_word_embeddings": False, "activation_function": "gelu",
                                          "layer_norm_epsilon": 1e-3}),
    "opt-pre-ln": ("opt", {}),
    "opt-350m-like": ("opt", {"do_layer_norm_before": False, "word_embed_proj_dim": 32}),
    "opt-nobias-noaffine": ("opt", {"enable_bias": False, "layer_norm_elementwise_affine": False,
                                        "activation_function": "gelu_new"}),
    "opt-untied-no-final-ln": ("opt", {"tie_word_embeddings": False, "_remove_final_layer_norm": True}),
}


@functools.cache
def hf_model(case: str):
    """A tiny random HF model whose every parameter (norm scales and biases included) is perturbed,
    so a mis-mapped or ignored tensor cannot hide behind HF's ones/zeros initialization."""
    import torch

    model_type, overrides = CASES[case]
    model = tiny_model(model_type, VOCAB, seed=0, **overrides)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def load(model: nnx.Module, params: dict) -> nnx.Module:
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def jax_model(case: str, **kw):
    hf = hf_model(case)
    family = get_family(hf.config.model_type)
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    return load(family.CausalLM(hf.config, **kw), family.params_from_hf(tensors, hf.config))


def batch(lengths, total: int, *, left: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (len(lengths), total)).astype(np.int32)
    mask = np.zeros((len(lengths), total), np.int32)
    for row, n in enumerate(lengths):
        if left:
            mask[row, total - n:] = 1
        else:
            mask[row, :n] = 1
    return np.where(mask == 1, ids, 0), mask


def jax_logits(model, ids, mask):
    positions = common.positions_from_mask(jnp.asarray(mask))
    logits, cache = model(jnp.asarray(ids), positions, jnp.asarray(mask))
    assert cache is None
    return np.asarray(logits)


def hf_logits(case, ids, mask, position_ids=None):
    import torch

    kw = {} if position_ids is None else {"position_ids": torch.tensor(np.asarray(position_ids))}
    with torch.no_grad():
        return hf_model(case)(torch.tensor(ids).long(), attention_mask=torch.tensor(mask), **kw).logits.numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_right_padded(case):
    ids, mask = batch([12, 9, 4], 12, left=False)
    ours, ref = jax_logits(jax_model(case), ids, mask), hf_logits(case, ids, mask)
    real = mask.astype(bool)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref)[real].max() <= ATOL_HF


@pytest.mark.parametrize("case", ["gpt2-inner-relu-layeridx-upcast", "opt-350m-like", "opt-pre-ln"])
def test_kv_cache_prefill_and_decode_equal_full_forward_left_padded(case):
    model = jax_model(case)
    ids, mask = batch([10, 7, 3], 10, left=True, seed=1)
    full = jax_logits(model, ids, mask)
    real = mask.astype(bool)

    # Left padding with positions from the mask is also what HF computes (GPT-2 needs them passed).
    positions = common.positions_from_mask(jnp.asarray(mask))
    ref = hf_logits(case, ids, mask, positions if case.startswith("gpt2") else None)
    assert np.abs(full - ref)[real].max() <= ATOL_HF

    prefill, total = 6, ids.shape[1]
    cache = model.init_cache(ids.shape[0], total, jnp.float32)
    mask_S = jnp.asarray(mask)  # key slots beyond the query are masked causally
    logits, cache = model(jnp.asarray(ids[:, :prefill]), positions[:, :prefill], mask_S, cache)
    steps = [np.asarray(logits)]
    for t in range(prefill, total):
        logits, cache = model(jnp.asarray(ids[:, t:t + 1]), positions[:, t:t + 1], mask_S, cache)
        steps.append(np.asarray(logits))
    assert int(cache.index) == total
    cached = np.concatenate(steps, axis=1)
    assert np.abs(cached - full)[real].max() <= ATOL_JAX


@pytest.mark.parametrize("case", ["gpt2-default", "gpt2-untied-gelu-eps", "opt-350m-like",
                                  "opt-nobias-noaffine", "opt-untied-no-final-ln"])
def test_params_round_trip_and_hf_directory_loads(case, tmp_path):
    import safetensors.numpy
    import transformers

    hf = hf_model(case)
    family = get_family(hf.config.model_type)

    # A freshly initialized JAX model: params_from_hf(params_to_hf(p)) rebuilds exactly its state tree.
    fresh = family.CausalLM(hf.config, rngs=nnx.Rngs(3))
    p = nnx.to_pure_dict(nnx.state(fresh, nnx.Param))
    back = family.params_from_hf(family.params_to_hf(p, hf.config), hf.config)
    assert jax.tree.structure(back) == jax.tree.structure(p)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), p, back)

    # The names are exactly what save_pretrained writes (tied lm_head omitted, like HF).
    model = jax_model(case)
    tensors = family.params_to_hf(nnx.to_pure_dict(nnx.state(model, nnx.Param)), hf.config)
    hf.save_pretrained(tmp_path / "hf")
    saved = safetensors.numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(tensors) == sorted(saved)
    for name, array in saved.items():
        np.testing.assert_array_equal(tensors[name], array, err_msg=name)

    # A directory written without weights.py loads in transformers with the same logits.
    out = tmp_path / "ours"
    out.mkdir()
    safetensors.numpy.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf.config.save_pretrained(out)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, mask = batch([8, 5], 8, left=False, seed=2)
    import torch

    with torch.no_grad():
        ref = loaded.eval()(torch.tensor(ids).long(), attention_mask=torch.tensor(mask)).logits.numpy()
    assert np.abs(jax_logits(model, ids, mask) - ref)[mask.astype(bool)].max() <= ATOL_HF


def test_params_from_hf_accepts_prefixless_checkpoints_and_ignores_buffers():
    for case, strip in [("gpt2-default", "transformer."), ("opt-pre-ln", "model.")]:
        hf = hf_model(case)
        family = get_family(hf.config.model_type)
        tensors = {k.removeprefix(strip): v.numpy() for k, v in hf.state_dict().items()
                   if k != "lm_head.weight"}
        if case.startswith("gpt2"):  # the original "gpt2" checkpoint's causal-mask buffers
            tensors["h.0.attn.bias"] = np.ones((1, 1, 4, 4), np.float32)
            tensors["h.0.attn.masked_bias"] = np.float32(-1e4)
        ref = family.params_from_hf({k: v.numpy() for k, v in hf.state_dict().items()}, hf.config)
        got = family.params_from_hf(tensors, hf.config)
        jax.tree.map(np.testing.assert_array_equal, ref, got)


@pytest.mark.parametrize("case", ["gpt2-default", "opt-pre-ln"])
def test_params_from_hf_rejects_bad_checkpoints(case):
    hf = hf_model(case)
    family = get_family(hf.config.model_type)
    tensors = {k: v.numpy() for k, v in hf.state_dict().items()}
    name = next(k for k in tensors if k.endswith(("layers.1.fc1.weight", "h.1.mlp.c_fc.weight")))
    with pytest.raises(ValueError, match="shape"):
        family.params_from_hf({**tensors, name: tensors[name][:, :-1]}, hf.config)
    with pytest.raises(ValueError, match="lacks"):
        family.params_from_hf({k: v for k, v in tensors.items() if k != name}, hf.config)
    with pytest.raises(ValueError, match="unexpected"):
        family.params_from_hf({**tensors, "something.else": tensors[name]}, hf.config)


@pytest.mark.parametrize("case", ["gpt2-default", "opt-350m-like"])
def test_remat_equals_no_remat(case):
    ids, mask = batch([8, 5], 8, left=False, seed=3)
    positions = common.positions_from_mask(jnp.asarray(mask))
    weights = jnp.asarray(mask, jnp.float32)

    def loss(model):
        logits, _ = model(jnp.asarray(ids), positions, jnp.asarray(mask))
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], axis=-1)[..., 0]
        return (nll * weights[:, 1:]).sum() / weights[:, 1:].sum()

    results = []
    for remat in (False, True):
        model = jax_model(case, remat=remat)
        value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        results.append((value, nnx.to_pure_dict(grads)))
    (v0, g0), (v1, g1) = results
    np.testing.assert_allclose(v1, v0, atol=ATOL_JAX)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL_JAX), g1, g0)


def test_activations_match_transformers():
    import torch
    from transformers.activations import ACT2FN

    from itersft_jax.models.common import ACTIVATIONS

    x = np.linspace(-12, 12, 2001, dtype=np.float32)
    for name, fn in ACTIVATIONS.items():
        ref = ACT2FN[name](torch.tensor(x)).numpy()
        np.testing.assert_allclose(np.asarray(fn(jnp.asarray(x))), ref, atol=1e-5, err_msg=name)


def test_bf16_compute_returns_bf16_logits_close_to_fp32():
    model32 = jax_model("opt-350m-like")
    model16 = jax_model("opt-350m-like", dtype=jnp.bfloat16)
    ids, mask = batch([8, 5], 8, left=False, seed=4)
    positions = common.positions_from_mask(jnp.asarray(mask))
    logits16, _ = model16(jnp.asarray(ids), positions, jnp.asarray(mask))
    assert logits16.dtype == jnp.bfloat16
    assert nnx.state(model16, nnx.Param)["embed_tokens"]["embedding"][...].dtype == jnp.float32
    diff = np.abs(np.asarray(logits16, np.float32) - jax_logits(model32, ids, mask))[mask.astype(bool)]
    assert diff.max() < 0.1  # bf16 has ~3 significant digits; logits are O(1)
