"""Rotary position embeddings as transformers' ``modeling_rope_utils`` computes them, for every RoPE family.

Types: ``default``, ``linear``, ``dynamic`` (NTK), ``llama3``, ``yarn`` and ``longrope``, each with HF's
``attention_factor`` (yarn's mscale, longrope's sqrt(1 + ln(s) / ln(L))) multiplying cos and sin; a
``partial_rotary_factor`` rotates only the first ``rotary_dim`` dims of each head (Phi-3, GPT-NeoX); an
``interleaved`` rope pairs neighbouring dims (GPT-J's ``rotate_every_two``) instead of the two halves
(``rotate_half``). Inverse frequencies of the static types are computed once on the host in fp32, as HF's init
functions do; ``cos``/``sin`` in fp32, cast to the compute dtype.

Two types depend on the sequence, decided per call from ``seq_len = max(positions) + 1`` over the batch, as HF's
``dynamic_rope_update`` does per forward:

* ``dynamic``: the base grows once ``seq_len`` passes ``max_position_embeddings``. HF's module also *remembers* the
  largest length it has seen and keeps that base for later, shorter calls still past the trained length; every
  call here is computed afresh (equal to HF on a freshly loaded model, and on any call not preceded by a longer one).
* ``longrope``: the long factors when ``seq_len > original_max_position_embeddings``, the short ones otherwise.

With a KV cache (generation) both are decided per call too: the prompt's keys are rotated with the prompt's
choice, each new token with its own length's; keys already in the cache are never re-rotated. That is what HF's
Llama/Qwen/Mistral generation does. HF's Phi-3 ``generate`` instead drops its cache once, at the step where the
sequence first passes ``original_max_position_embeddings``, and recomputes the prefix with the long factors; our
generation does not, so its tokens can differ from HF's Phi-3 after that step (prompts already longer than that
use the long factors throughout, identically).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


@dataclasses.dataclass(frozen=True)
class Rope:
    """One RoPE variant read from an HF config (hashable: it is static model data)."""

    rope_type: str
    theta: float
    rotary_dim: int              # head_dim * partial_rotary_factor: HF rotates these first dims of each head
    params: tuple                # sorted (key, value) pairs of the type's parameters (lists as tuples)
    max_position_embeddings: int
    interleaved: bool = False    # GPT-J's layout: dims (2i, 2i + 1) rotate together, not (i, i + R/2)

    def get(self, key: str, default=None):
        return dict(self.params).get(key, default)


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """The RoPE settings of an HF config as one flat dict with ``rope_type`` and ``rope_theta``.

    transformers 5 keeps them in ``config.rope_parameters`` (nested by layer type for Gemma 3); older configs in
    ``rope_scaling`` (with ``type`` or ``rope_type``) plus a top-level ``rope_theta``. Both are read.
    """
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    layer_types = set(getattr(config, "layer_types", None) or ())
    nested = bool(params) and bool(set(params) & layer_types)
    if nested and layer_type is None:
        raise ValueError("this family does not support per-layer-type rope_parameters; use backend='torch'.")
    params = dict((params.get(layer_type) or {}) if nested else params)
    params["rope_type"] = params.get("rope_type", params.pop("type", None)) or "default"
    params.pop("type", None)
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(config, "rope_theta", None) or 10000.0
    return params


def rope_from_config(config, head_dim: int, *, layer_type: str | None = None, partial: bool = False) -> Rope:
    """The ``Rope`` of ``config`` (of one layer type's entry when given); ``partial``: the family applies HF's
    ``partial_rotary_factor`` (others refuse it, as their HF code ignores it)."""
    params = rope_parameters(config, layer_type)
    rope_type = params.pop("rope_type")
    theta = float(params.pop("rope_theta"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported by the JAX backend (supported: "
                         f"{', '.join(ROPE_TYPES)}); use backend='torch'.")
    factor = float(params.pop("partial_rotary_factor", None) or getattr(config, "partial_rotary_factor", 1.0) or 1.0)
    if factor != 1.0 and not partial:
        raise ValueError(f"partial_rotary_factor={factor} is not supported by the JAX {config.model_type} family.")
    max_len = int(config.max_position_embeddings)
    if rope_type in ("llama3", "yarn", "longrope") and params.get("original_max_position_embeddings") is None:
        params["original_max_position_embeddings"] = getattr(config, "original_max_position_embeddings", max_len)
    items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items() if v is not None))
    return Rope(rope_type, theta, int(head_dim * factor), items, max_len)


# ----------------------------------------------------------------------------- inverse frequencies (host, fp32)


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def _llama3(rope: Rope, inv_freq: np.ndarray) -> np.ndarray:
    factor, low, high = rope.get("factor"), rope.get("low_freq_factor"), rope.get("high_freq_factor")
    old_len = rope.get("original_max_position_embeddings")
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: Rope) -> tuple[np.ndarray, float]:
    dim, base = rope.rotary_dim, rope.theta
    old_len = rope.get("original_max_position_embeddings")
    factor = rope.get("factor") or rope.max_position_embeddings / old_len
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _mscale(factor, mscale) / _mscale(factor, mscale_all_dim)
        else:
            attention_factor = _mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos_freqs = (np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))).astype(np.float32)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (np.float32(factor) * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def _longrope(rope: Rope) -> tuple[np.ndarray, np.ndarray, float]:
    """(short inv_freq, long inv_freq, attention factor)."""
    dim, old_len = rope.rotary_dim, rope.get("original_max_position_embeddings")
    factor = rope.get("factor") or rope.max_position_embeddings / old_len
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    shape = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    powers = np.float32(rope.theta) ** shape
    short, long = (1.0 / (np.asarray(rope.get(k), np.float32) * powers) for k in ("short_factor", "long_factor"))
    return short.astype(np.float32), long.astype(np.float32), float(attention_factor)


def inv_freq_and_factor(rope: Rope) -> tuple[np.ndarray, float]:
    """Inverse frequencies ``[rotary_dim // 2]`` and attention factor of a type that does not depend on the call
    (for ``dynamic``/``longrope``: their values at short lengths)."""
    if rope.rope_type == "yarn":
        return _yarn(rope)
    if rope.rope_type == "longrope":
        short, _, attention_factor = _longrope(rope)
        return short, attention_factor
    inv_freq = _base_inv_freq(rope.theta, rope.rotary_dim)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / np.float32(rope.get("factor"))
    elif rope.rope_type == "llama3":
        inv_freq = _llama3(rope, inv_freq)
    return inv_freq, 1.0


# ----------------------------------------------------------------------------- per call


def cos_sin(rope: Rope, positions_BT: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """``cos``/``sin`` ``[B, T, rotary_dim]`` for HF's rotate-half RoPE (fp32, times the attention factor, cast to
    ``dtype``); for an ``interleaved`` rope each frequency appears twice in a row (``repeat_interleave``), the layout
    ``apply_rope(..., interleaved=True)`` reads. ``dynamic`` and ``longrope`` read ``seq_len = max(positions) + 1``
    (see the module docstring)."""
    seq_len = jnp.max(positions_BT) + 1
    if rope.rope_type == "dynamic":
        dim, max_len, factor = rope.rotary_dim, rope.max_position_embeddings, rope.get("factor")
        length = jnp.maximum(seq_len, max_len).astype(jnp.float32)
        base = rope.theta * ((factor * length / max_len) - (factor - 1)) ** (dim / (dim - 2))
        inv_freq, attention_factor = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)), 1.0
    elif rope.rope_type == "longrope":
        short, long, attention_factor = _longrope(rope)
        inv_freq = jnp.where(seq_len > rope.get("original_max_position_embeddings"), long, short)
    else:
        inv_freq, attention_factor = inv_freq_and_factor(rope)
    freqs_BTF = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    if rope.interleaved:
        emb_BTR = jnp.repeat(freqs_BTF, 2, axis=-1)
    else:
        emb_BTR = jnp.concatenate([freqs_BTF, freqs_BTF], axis=-1)
    return (jnp.cos(emb_BTR) * attention_factor).astype(dtype), (jnp.sin(emb_BTR) * attention_factor).astype(dtype)


def apply_rope(x_BTNH: jax.Array, cos_BTR: jax.Array, sin_BTR: jax.Array, interleaved: bool = False) -> jax.Array:
    """Rotate-half RoPE on the first ``R`` dims of every head; the rest pass through (partial rotary).
    ``interleaved``: GPT-J's ``rotate_every_two``, each pair ``(x[2i], x[2i + 1])`` rotated by frequency ``i``."""
    r = cos_BTR.shape[-1]
    x_rot, x_pass = x_BTNH[..., :r], x_BTNH[..., r:]
    if interleaved:
        rotated = jnp.stack([-x_rot[..., 1::2], x_rot[..., 0::2]], axis=-1).reshape(x_rot.shape)
    else:
        rotated = jnp.concatenate([-x_rot[..., r // 2:], x_rot[..., :r // 2]], axis=-1)
    out = x_rot * cos_BTR[:, :, None, :] + rotated * sin_BTR[:, :, None, :]
    return out if r == x_BTNH.shape[-1] else jnp.concatenate([out, x_pass], axis=-1)
