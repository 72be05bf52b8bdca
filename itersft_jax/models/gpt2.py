"""GPT-2 (HF ``model_type`` ``gpt2``) as a Flax NNX causal LM.

Matches ``transformers.GPT2LMHeadModel``: learned absolute positions (``wpe``), pre-LayerNorm blocks,
fused ``c_attn`` projection, LM head tied to ``wte`` (unless ``tie_word_embeddings=False``).
HF's ``Conv1D`` stores weights as ``[in, out]`` — already the layout of ``nnx.Linear.kernel``, so GPT-2
weights convert without a transpose (only an untied ``lm_head``, an ``nn.Linear``, is transposed).

The module also holds the pieces OPT reuses: HF activation names, the per-layer loop with optional remat
and KV cache, and the table-driven HF <-> params conversion.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .common import (
    KVCache,
    LMHead,
    dense,
    grouped_attention,
    head_logits,
    make_attention_mask,
    run_layers,
    update_layer_cache,
)

MODEL_TYPES = ("gpt2",)

# ---------------------------------------------------------------------------------------------------------
# Shared with opt.py


def _gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


# transformers.activations.ACT2CLS names -> the same function in JAX. ``gelu`` is the exact (erf) GELU;
# ``gelu_new``/``gelu_pytorch_tanh``/``gelu_fast``/``gelu_accurate`` are the tanh approximation.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": _gelu_exact,
    "gelu_python": _gelu_exact,
    "gelu_10": lambda x: jnp.clip(_gelu_exact(x), -10.0, 10.0),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "relu6": jax.nn.relu6,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "hardswish": jax.nn.hard_swish,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation_function {name!r} is not supported; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def attend(q_BTNH, k_BTNH, v_BTNH, mask_BTS, kv, index, *, scale: float):
    """Self-attention of this call's queries, through the layer's cache slice when there is one."""
    if kv is None:
        k_BNSH, v_BNSH = k_BTNH.transpose(0, 2, 1, 3), v_BTNH.transpose(0, 2, 1, 3)
    else:
        kv = k_BNSH, v_BNSH = update_layer_cache(kv[0], kv[1], k_BTNH, v_BTNH, index)
    return grouped_attention(q_BTNH, k_BNSH.astype(q_BTNH.dtype), v_BNSH.astype(q_BTNH.dtype), mask_BTS,
                             scale=scale), kv


class HFTensor(NamedTuple):
    """Where one HF state-dict tensor lives in the params tree."""

    path: tuple            # key path into nnx.state(model, nnx.Param) as a pure dict
    shape: tuple[int, ...]  # the HF (torch) shape
    transpose: bool         # nn.Linear [out, in] <-> nnx.Linear kernel [in, out]


def convert_from_hf(tensors, layout: dict[str, HFTensor], canonical: Callable[[str], str],
                    ignorable: Callable[[str], bool], family: str) -> dict:
    found = {}
    for name, array in tensors.items():
        key = canonical(name)
        if key in layout:
            found[key] = array
        elif not ignorable(key):
            raise KeyError(f"unexpected {family} tensor {name!r}")
    missing = sorted(set(layout) - set(found))
    if missing:
        raise KeyError(f"{family} checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
    params: dict = {}
    for key, spec in layout.items():
        array = np.asarray(found[key])
        if array.shape != spec.shape:
            raise ValueError(f"{family} tensor {key!r} has shape {array.shape}, expected {spec.shape}")
        node = params
        for part in spec.path[:-1]:
            node = node.setdefault(part, {})
        node[spec.path[-1]] = array.T if spec.transpose else array
    return params


def convert_to_hf(params, layout: dict[str, HFTensor]) -> dict[str, np.ndarray]:
    out = {}
    for key, spec in layout.items():
        node = params
        for part in spec.path:
            node = node[part]
        array = np.asarray(node)
        out[key] = np.ascontiguousarray(array.T if spec.transpose else array)
        assert out[key].shape == spec.shape, (key, out[key].shape, spec.shape)
    return out


# ---------------------------------------------------------------------------------------------------------
# GPT-2


class Attention(nnx.Module):
    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        # HF folds both flags into one scale applied to q.k (reorder_and_upcast_attn only changes where
        # the scale is applied and forces fp32 logits, which dot_product_attention always uses).
        scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.scale = scale
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        std = config.initializer_range
        self.c_attn = nnx.Linear(d, 3 * d, kernel_init=nnx.initializers.normal(std), **kw)
        self.c_proj = nnx.Linear(d, d, kernel_init=nnx.initializers.normal(
            std / math.sqrt(2 * config.num_hidden_layers)), **kw)

    def __call__(self, x_BTD, mask_BTS, kv, index):
        b, t, _ = x_BTD.shape
        q_BTD, k_BTD, v_BTD = jnp.split(dense(self.c_attn, x_BTD), 3, axis=-1)
        shape = (b, t, self.num_heads, self.head_dim)
        out_BTNH, kv = attend(q_BTD.reshape(shape), k_BTD.reshape(shape), v_BTD.reshape(shape),
                              mask_BTS, kv, index, scale=self.scale)
        return dense(self.c_proj, out_BTNH.reshape(b, t, -1)), kv


class MLP(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        inner = config.n_inner if config.n_inner is not None else 4 * d
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        std = config.initializer_range
        self.c_fc = nnx.Linear(d, inner, kernel_init=nnx.initializers.normal(std), **kw)
        self.c_proj = nnx.Linear(inner, d, kernel_init=nnx.initializers.normal(
            std / math.sqrt(2 * config.num_hidden_layers)), **kw)
        self.act = config.activation_function
        activation(self.act)  # fail at construction on an unknown name

    def __call__(self, x_BTD):
        return dense(self.c_proj, activation(self.act)(dense(self.c_fc, x_BTD)))


class Block(nnx.Module):
    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.layer_norm_epsilon
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.ln_1 = nnx.LayerNorm(d, epsilon=eps, use_fast_variance=False, **kw)
        self.attn = Attention(config, layer_idx, **kw)
        self.ln_2 = nnx.LayerNorm(d, epsilon=eps, use_fast_variance=False, **kw)
        self.mlp = MLP(config, **kw)

    def __call__(self, x_BTD, kv, mask_BTS, index):
        attn_BTD, kv = self.attn(self.ln_1(x_BTD), mask_BTS, kv, index)
        x_BTD = x_BTD + attn_BTD
        return x_BTD + self.mlp(self.ln_2(x_BTD)), kv


class CausalLM(nnx.Module):
    """``GPT2LMHeadModel`` in NNX. Parameter paths: ``wte``, ``wpe``, ``h[i]``, ``ln_f`` (, ``lm_head``)."""

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
                 rngs: nnx.Rngs | None = None):
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-2 with add_cross_attention is not supported by the JAX backend")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        d = config.hidden_size
        embed_init = nnx.initializers.normal(config.initializer_range)
        self.dtype = dtype
        self.remat = remat
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        self.wte = nnx.Embed(config.vocab_size, d, embedding_init=embed_init, **kw)
        self.wpe = nnx.Embed(config.max_position_embeddings, d, embedding_init=embed_init, **kw)
        self.h = nnx.List([Block(config, i, **kw) for i in range(self.num_layers)])
        self.ln_f = nnx.LayerNorm(d, epsilon=config.layer_norm_epsilon, use_fast_variance=False, **kw)
        self.lm_head = None if self.tied else nnx.Linear(
            d, config.vocab_size, use_bias=False, kernel_init=embed_init, **kw)

    def hidden_states(self, input_ids_BT, positions_BT, attention_mask_BS, cache: KVCache | None = None):
        """The final-normed hidden states ``[B, T, D]`` (the LM head's input) and the advanced cache."""
        x_BTD = self.wte(input_ids_BT) + self.wpe(positions_BT)
        offset = 0 if cache is None else cache.index
        mask_BTS = make_attention_mask(attention_mask_BS, input_ids_BT.shape[1], offset)
        x_BTD, cache = run_layers(self.h, x_BTD, cache, mask_BTS, None if cache is None else cache.index,
                                  remat=self.remat)
        return self.ln_f(x_BTD), cache

    def head(self) -> LMHead:
        """The output projection as data (see ``common.LMHead``)."""
        if self.tied:
            return LMHead(self.wte.embedding[...], True, None, self.dtype)
        return LMHead(self.lm_head.kernel[...], False, None, self.dtype)

    def __call__(self, input_ids_BT, positions_BT, attention_mask_BS, cache: KVCache | None = None,
                 last_only: bool = False):
        h_BTD, cache = self.hidden_states(input_ids_BT, positions_BT, attention_mask_BS, cache)
        if last_only:  # generation's prefill needs only the next-token logits
            h_BTD = h_BTD[:, -1:]
        return head_logits(self.head(), h_BTD), cache

    def init_cache(self, batch: int, length: int, dtype=None) -> KVCache:
        return KVCache.zeros(self.num_layers, batch, length, self.num_heads, self.head_dim,
                             dtype if dtype is not None else self.dtype)


def _layout(config) -> dict[str, HFTensor]:
    d, v = config.hidden_size, config.vocab_size
    inner = config.n_inner if config.n_inner is not None else 4 * d
    layout = {
        "transformer.wte.weight": HFTensor(("wte", "embedding"), (v, d), False),
        "transformer.wpe.weight": HFTensor(("wpe", "embedding"), (config.max_position_embeddings, d), False),
        "transformer.ln_f.weight": HFTensor(("ln_f", "scale"), (d,), False),
        "transformer.ln_f.bias": HFTensor(("ln_f", "bias"), (d,), False),
    }
    # Conv1D weights are [in, out], like nnx.Linear kernels: no transpose.
    per_layer = {
        "ln_1.weight": (("ln_1", "scale"), (d,)),
        "ln_1.bias": (("ln_1", "bias"), (d,)),
        "attn.c_attn.weight": (("attn", "c_attn", "kernel"), (d, 3 * d)),
        "attn.c_attn.bias": (("attn", "c_attn", "bias"), (3 * d,)),
        "attn.c_proj.weight": (("attn", "c_proj", "kernel"), (d, d)),
        "attn.c_proj.bias": (("attn", "c_proj", "bias"), (d,)),
        "ln_2.weight": (("ln_2", "scale"), (d,)),
        "ln_2.bias": (("ln_2", "bias"), (d,)),
        "mlp.c_fc.weight": (("mlp", "c_fc", "kernel"), (d, inner)),
        "mlp.c_fc.bias": (("mlp", "c_fc", "bias"), (inner,)),
        "mlp.c_proj.weight": (("mlp", "c_proj", "kernel"), (inner, d)),
        "mlp.c_proj.bias": (("mlp", "c_proj", "bias"), (d,)),
    }
    for i in range(config.num_hidden_layers):
        for name, (path, shape) in per_layer.items():
            layout[f"transformer.h.{i}.{name}"] = HFTensor(("h", i, *path), shape, False)
    if not getattr(config, "tie_word_embeddings", True):
        layout["lm_head.weight"] = HFTensor(("lm_head", "kernel"), (v, d), True)
    return layout


def _canonical(name: str) -> str:
    # GPT2Model checkpoints (e.g. the original "gpt2") have no "transformer." prefix.
    if name.startswith(("transformer.", "lm_head.")):
        return name
    return "transformer." + name


def _ignorable(key: str, config) -> bool:
    # Old checkpoints carry the causal-mask buffers; a tied checkpoint may still list lm_head.weight.
    if key.endswith((".attn.bias", ".attn.masked_bias")):
        return True
    return key == "lm_head.weight" and getattr(config, "tie_word_embeddings", True)


def params_from_hf(tensors: dict[str, np.ndarray], config) -> dict:
    """HF GPT-2 state dict (with or without the ``transformer.`` prefix) -> pure params dict."""
    return convert_from_hf(tensors, _layout(config), _canonical, lambda k: _ignorable(k, config), "GPT-2")


def params_to_hf(params, config) -> dict[str, np.ndarray]:
    """Pure params dict -> the tensors ``GPT2LMHeadModel.save_pretrained`` writes (tied head omitted)."""
    return convert_to_hf(params, _layout(config))
