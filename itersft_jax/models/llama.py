"""Llama-family causal LMs in Flax NNX: Llama 2/3 (rope scaling), Mistral, Qwen2, Qwen3.

The four HF families share one architecture — pre-norm decoder, RMSNorm, RoPE, grouped-query attention,
gated MLP — and differ only in a few switches, collected in ``_Spec``:

* llama: ``attention_bias`` on q/k/v/o, ``mlp_bias``;
* mistral: no biases, one ``sliding_window`` for every layer (``None``: none);
* qwen2: bias on q/k/v (never o), sliding window on the layers ``layer_types`` marks ``sliding_attention``;
* qwen3: ``attention_bias`` on q/k/v/o, RMSNorm on each query/key head (``q_norm``/``k_norm``), windows
  as qwen2.

Parameter paths mirror HF names (``model.layers[i].self_attn.q_proj.kernel`` is
``model.layers.{i}.self_attn.q_proj.weight`` transposed), which keeps ``params_from_hf`` a table.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from itersft_jax.models.common import (
    KVCache,
    LMHead,
    dense,
    grouped_attention,
    head_logits,
    make_attention_mask,
    run_layers,
    update_layer_cache,
)

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}

# Buffers some older checkpoints saved next to the weights; recomputed here, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What this code needs from an HF config, read once and validated."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    act: str
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    windows: tuple  # per layer: int or None
    rope: tuple  # (rope_type, theta, sorted items of the remaining rope parameters)
    max_position_embeddings: int
    initializer_range: float


def rope_parameters(config) -> dict:
    """The RoPE settings of an HF config as one flat dict with ``rope_type`` and ``rope_theta``.

    transformers 5 keeps them in ``config.rope_parameters``; older configs in ``rope_scaling`` (with
    ``type`` or ``rope_type``) plus a top-level ``rope_theta``. Both are read.
    """
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = dict(params)
    layer_types = set(getattr(config, "layer_types", None) or ())
    if params and set(params) & layer_types:
        raise ValueError("per-layer-type rope_parameters are not supported by the JAX Llama family; "
                         "use backend='torch'.")
    params["rope_type"] = params.get("rope_type", params.pop("type", None)) or "default"
    params.pop("type", None)
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(config, "rope_theta", None) or 10000.0
    return params


def _spec(config) -> _Spec:
    model_type = config.model_type
    if model_type not in MODEL_TYPES:
        raise ValueError(f"llama.py serves {MODEL_TYPES}, not {model_type!r}")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    act = config.hidden_act
    if act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} is not supported; supported: {sorted(_ACTIVATIONS)}")

    n = config.num_hidden_layers
    if model_type == "mistral":
        windows = (getattr(config, "sliding_window", None),) * n
    elif model_type in ("qwen2", "qwen3"):
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * n
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"layer_types {sorted(unknown)} are not supported; use backend='torch'.")
        windows = tuple(window if kind == "sliding_attention" else None for kind in layer_types[:n])
    else:
        windows = (None,) * n

    rope = rope_parameters(config)
    rope_type = rope.pop("rope_type")
    theta = float(rope.pop("rope_theta"))
    if rope_type not in ("default", "linear", "dynamic", "llama3"):
        raise ValueError(f"rope_type {rope_type!r} is not supported by the JAX backend (supported: default, "
                         "linear, dynamic, llama3); use backend='torch'.")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported by the JAX Llama family.")
    if rope_type == "llama3":
        rope.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    rope_keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    rope_items = tuple(sorted((k, float(v)) for k, v in rope.items() if k in rope_keys))

    attention_bias = bool(getattr(config, "attention_bias", False))
    return _Spec(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_layers=n, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, rms_norm_eps=float(config.rms_norm_eps), act=act,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=attention_bias if model_type in ("llama", "qwen3") else model_type == "qwen2",
        o_bias=attention_bias if model_type in ("llama", "qwen3") else False,
        mlp_bias=bool(getattr(config, "mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type == "qwen3",
        windows=windows,
        rope=(rope_type, theta, rope_items),
        max_position_embeddings=int(config.max_position_embeddings),
        initializer_range=float(getattr(config, "initializer_range", 0.02)),
    )


# ----------------------------------------------------------------------------- RoPE


def _inv_freq(spec: _Spec) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` (fp32), as HF's rope init functions compute them."""
    rope_type, theta, items = spec.rope
    rope = dict(items)
    dim = spec.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if rope_type == "linear":
        inv_freq = inv_freq / np.float32(rope["factor"])
    elif rope_type == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(spec: _Spec, positions_BT: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """``cos``/``sin`` ``[B, T, head_dim]`` for HF's rotate-half RoPE, computed in fp32, cast to ``dtype``."""
    rope_type, theta, items = spec.rope
    if rope_type == "dynamic":
        # HF's dynamic NTK: the base grows with the longest position of the call beyond the trained length.
        rope = dict(items)
        dim, max_len, factor = spec.head_dim, spec.max_position_embeddings, rope["factor"]
        seq_len = jnp.maximum(jnp.max(positions_BT) + 1, max_len).astype(jnp.float32)
        base = theta * ((factor * seq_len / max_len) - (factor - 1)) ** (dim / (dim - 2))
        exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
        inv_freq = 1.0 / (base ** exponents)
    else:
        inv_freq = jnp.asarray(_inv_freq(spec))
    freqs_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    emb_BTH = jnp.concatenate([freqs_BTF, freqs_BTF], axis=-1)
    return jnp.cos(emb_BTH).astype(dtype), jnp.sin(emb_BTH).astype(dtype)


def _apply_rope(x_BTNH, cos_BTH, sin_BTH):
    half = x_BTNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    return x_BTNH * cos_BTH[:, :, None, :] + rotated * sin_BTH[:, :, None, :]


# ----------------------------------------------------------------------------- modules


class RMSNorm(nnx.Module):
    """HF's RMSNorm: normalize in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * normed.astype(self.dtype)


def _linear(spec: _Spec, d_in: int, d_out: int, bias: bool, dtype, param_dtype, rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.initializers.normal(spec.initializer_range), rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, spec: _Spec, window: int | None, *, dtype, param_dtype, rngs):
        d, n, k, h = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_proj = _linear(spec, d, n * h, spec.qkv_bias, dtype, param_dtype, rngs)
        self.k_proj = _linear(spec, d, k * h, spec.qkv_bias, dtype, param_dtype, rngs)
        self.v_proj = _linear(spec, d, k * h, spec.qkv_bias, dtype, param_dtype, rngs)
        self.o_proj = _linear(spec, n * h, d, spec.o_bias, dtype, param_dtype, rngs)
        if spec.qk_norm:
            self.q_norm = RMSNorm(h, spec.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.k_norm = RMSNorm(h, spec.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.qk_norm = spec.qk_norm
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        self.window = window

    def __call__(self, x_BTD, kv, cos_BTH, sin_BTH, attention_mask_BS, cache_index):
        b, t, _ = x_BTD.shape
        q_BTNH = dense(self.q_proj, x_BTD).reshape(b, t, self.num_heads, self.head_dim)
        k_BTKH = dense(self.k_proj, x_BTD).reshape(b, t, self.num_kv_heads, self.head_dim)
        v_BTKH = dense(self.v_proj, x_BTD).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
        q_BTNH = _apply_rope(q_BTNH, cos_BTH, sin_BTH)
        k_BTKH = _apply_rope(k_BTKH, cos_BTH, sin_BTH)
        if kv is None:
            keys_BKSH, values_BKSH, offset = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3), 0
        else:
            kv = update_layer_cache(kv[0], kv[1], k_BTKH, v_BTKH, cache_index)
            (keys_BKSH, values_BKSH), offset = kv, cache_index
        mask_BTS = make_attention_mask(attention_mask_BS, t, offset, self.window)
        out_BTNH = grouped_attention(q_BTNH, keys_BKSH.astype(q_BTNH.dtype), values_BKSH.astype(q_BTNH.dtype),
                                     mask_BTS, scale=self.head_dim ** -0.5)
        return dense(self.o_proj, out_BTNH.reshape(b, t, -1)), kv


class MLP(nnx.Module):
    def __init__(self, spec: _Spec, *, dtype, param_dtype, rngs):
        d, f = spec.hidden_size, spec.intermediate_size
        self.gate_proj = _linear(spec, d, f, spec.mlp_bias, dtype, param_dtype, rngs)
        self.up_proj = _linear(spec, d, f, spec.mlp_bias, dtype, param_dtype, rngs)
        self.down_proj = _linear(spec, f, d, spec.mlp_bias, dtype, param_dtype, rngs)
        self.act = spec.act

    def __call__(self, x_BTD):
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        out_ND = dense(self.down_proj, _ACTIVATIONS[self.act](dense(self.gate_proj, x_ND)) * dense(self.up_proj, x_ND))
        return out_ND.reshape(x_BTD.shape)


class DecoderLayer(nnx.Module):
    def __init__(self, spec: _Spec, layer_idx: int, *, dtype, param_dtype, rngs):
        self.self_attn = Attention(spec, spec.windows[layer_idx], dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)
        self.mlp = MLP(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype=dtype,
                                       param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype=dtype,
                                                param_dtype=param_dtype)

    def __call__(self, h_BTD, kv, cos_BTH, sin_BTH, attention_mask_BS, cache_index):
        attn_BTD, kv = self.self_attn(self.input_layernorm(h_BTD), kv, cos_BTH, sin_BTH,
                                      attention_mask_BS, cache_index)
        h_BTD = h_BTD + attn_BTD
        return h_BTD + self.mlp(self.post_attention_layernorm(h_BTD)), kv


class Model(nnx.Module):
    """HF's ``model`` submodule: embeddings, decoder layers, final norm."""

    def __init__(self, spec: _Spec, *, dtype, param_dtype, rngs):
        self.embed_tokens = nnx.Embed(spec.vocab_size, spec.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      embedding_init=nnx.initializers.normal(spec.initializer_range),
                                      rngs=rngs)
        self.layers = nnx.List([DecoderLayer(spec, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for i in range(spec.num_layers)])
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)


class CausalLM(nnx.Module):
    """Llama/Mistral/Qwen2/Qwen3 causal LM; see ``models/__init__.py`` for the calling convention."""

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.spec = _spec(config)
        self.dtype = dtype
        self.remat = remat
        self.model = Model(self.spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if not self.spec.tie_word_embeddings:
            self.lm_head = _linear(self.spec, self.spec.hidden_size, self.spec.vocab_size, False, dtype,
                                   param_dtype, rngs)

    def init_cache(self, batch: int, length: int, dtype=None) -> KVCache:
        spec = self.spec
        return KVCache.zeros(spec.num_layers, batch, length, spec.num_kv_heads, spec.head_dim,
                             dtype if dtype is not None else self.dtype)

    def hidden_states(self, input_ids_BT, positions_BT, attention_mask_BS, cache: KVCache | None = None):
        """The final-normed hidden states ``[B, T, D]`` (the LM head's input) and the advanced cache."""
        h_BTD = self.model.embed_tokens(input_ids_BT)
        cos_BTH, sin_BTH = rope_cos_sin(self.spec, positions_BT, self.dtype)
        index = None if cache is None else cache.index
        h_BTD, cache = run_layers(self.model.layers, h_BTD, cache, cos_BTH, sin_BTH, attention_mask_BS, index,
                                  remat=self.remat)
        return self.model.norm(h_BTD), cache

    def head(self) -> LMHead:
        """The output projection as data (see ``common.LMHead``)."""
        if self.spec.tie_word_embeddings:
            return LMHead(self.model.embed_tokens.embedding[...], True, None, self.dtype)
        return LMHead(self.lm_head.kernel[...], False, None, self.dtype)

    def __call__(self, input_ids_BT, positions_BT, attention_mask_BS, cache: KVCache | None = None,
                 last_only: bool = False):
        h_BTD, cache = self.hidden_states(input_ids_BT, positions_BT, attention_mask_BS, cache)
        if last_only:  # generation's prefill needs only the next-token logits
            h_BTD = h_BTD[:, -1:]
        return head_logits(self.head(), h_BTD), cache


# ----------------------------------------------------------------------------- HF names


def _name_table(config) -> list[tuple[str, tuple, bool, tuple]]:
    """``(hf_name, path in the param dict, transposed, hf_shape)`` for every parameter."""
    spec = _spec(config)
    d, f, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    nh, kh = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    rows = [("model.embed_tokens.weight", ("model", "embed_tokens", "embedding"), False, (v, d))]
    for i in range(spec.num_layers):
        hf, path = f"model.layers.{i}.", ("model", "layers", i)

        def linear(sub, name, d_in, d_out, bias, hf=hf, path=path):
            rows.append((f"{hf}{sub}.{name}.weight", (*path, sub, name, "kernel"), True, (d_out, d_in)))
            if bias:
                rows.append((f"{hf}{sub}.{name}.bias", (*path, sub, name, "bias"), False, (d_out,)))

        linear("self_attn", "q_proj", d, nh, spec.qkv_bias)
        linear("self_attn", "k_proj", d, kh, spec.qkv_bias)
        linear("self_attn", "v_proj", d, kh, spec.qkv_bias)
        linear("self_attn", "o_proj", nh, d, spec.o_bias)
        if spec.qk_norm:
            for name in ("q_norm", "k_norm"):
                rows.append((f"{hf}self_attn.{name}.weight", (*path, "self_attn", name, "weight"), False,
                             (spec.head_dim,)))
        linear("mlp", "gate_proj", d, f, spec.mlp_bias)
        linear("mlp", "up_proj", d, f, spec.mlp_bias)
        linear("mlp", "down_proj", f, d, spec.mlp_bias)
        for name in ("input_layernorm", "post_attention_layernorm"):
            rows.append((f"{hf}{name}.weight", (*path, name, "weight"), False, (d,)))
    rows.append(("model.norm.weight", ("model", "norm", "weight"), False, (d,)))
    if not spec.tie_word_embeddings:
        rows.append(("lm_head.weight", ("lm_head", "kernel"), True, (v, d)))
    return rows


def params_from_hf(tensors: dict[str, np.ndarray], config) -> dict:
    """HF state-dict names -> the nested pure dict of ``nnx.state(model, nnx.Param)`` (checkpoint dtype)."""
    table = _name_table(config)
    missing = [name for name, *_ in table if name not in tensors]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} {config.model_type} weights, e.g. {missing[:5]}")
    known = {name for name, *_ in table}
    if getattr(config, "tie_word_embeddings", False):
        known.add("lm_head.weight")  # in-memory state dicts list the tied head; it is the embedding
    unexpected = [n for n in tensors if n not in known and not n.endswith(_IGNORED_SUFFIXES)]
    if unexpected:
        raise ValueError(f"checkpoint has {len(unexpected)} weights the JAX {config.model_type} model does "
                         f"not use, e.g. {unexpected[:5]}; use backend='torch' for this checkpoint.")
    params: dict = {}
    for name, path, transposed, shape in table:
        array = tensors[name]
        if tuple(array.shape) != shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(array.shape)}, config expects {shape}")
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = array.T if transposed else array
    return params


def params_to_hf(params: dict, config) -> dict[str, np.ndarray]:
    """The inverse of ``params_from_hf``: numpy arrays under HF names (a tied head is not written)."""
    out = {}
    for name, path, transposed, shape in _name_table(config):
        node = params
        for key in path:
            node = node[key]
        array = np.asarray(jax.device_get(node))
        array = np.ascontiguousarray(array.T) if transposed else array
        if array.shape != shape:
            raise ValueError(f"{name}: parameter shape {array.shape}, config expects {shape}")
        out[name] = array
    return out
