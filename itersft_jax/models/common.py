"""Pieces every model family shares: the KV cache, the attention mask and dot-product attention.

Conventions (all families follow them, see ``models/__init__.py``):

* ``input_ids_BT`` int32, ``positions_BT`` int32 (from the attention mask, see ``positions_from_mask``),
  ``attention_mask_BS`` int/bool over the *key* slots: ``S == T`` without a cache, ``S`` = cache length
  with one. 1 marks a real token, 0 padding.
* Without a cache, query ``t`` sits in slot ``t``; with one, in slot ``cache.index + t``. A query may
  attend a key slot at or before its own slot that the mask marks real (and, for sliding-window
  attention, less than ``window`` slots behind it).
* Softmax and attention logits are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer keys and values, ``[B, S, K, H]`` each, and the number of slots already written."""

    k: list[jax.Array]
    v: list[jax.Array]
    index: jax.Array  # int32 scalar

    @classmethod
    def zeros(cls, num_layers: int, batch: int, length: int, num_kv_heads: int, head_dim: int,
              dtype=jnp.float32) -> KVCache:
        shape = (batch, length, num_kv_heads, head_dim)
        return cls(k=[jnp.zeros(shape, dtype) for _ in range(num_layers)],
                   v=[jnp.zeros(shape, dtype) for _ in range(num_layers)],
                   index=jnp.zeros((), jnp.int32))


def dense(layer, x_NI: jax.Array) -> jax.Array:
    """``layer(x)`` (an ``nnx.Linear`` or ``Embed.attend``) as one 2-D matmul over the flattened leading axes.

    Why: XLA:CPU lowers the weight gradient of a 3-D ``[B, T, D]`` input (two contracting axes) to
    transposed copies of the activations plus a slow generic dot; on ``[B*T, D]`` it is one fast GEMM
    (an MLP's forward+backward measured 258 ms -> 151 ms on this 2-core CPU). The reshapes are free.
    """
    lead = x_NI.shape[:-1]
    y = layer(x_NI.reshape(-1, x_NI.shape[-1]))
    return y.reshape(*lead, y.shape[-1])


def positions_from_mask(attention_mask_BT: jax.Array) -> jax.Array:
    """Position of each token among the real tokens of its row (0 for leading padding)."""
    mask = attention_mask_BT.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def make_attention_mask(attention_mask_BS: jax.Array, num_queries: int, query_offset=0,
                        window: int | None = None) -> jax.Array:
    """Boolean ``[B, T, S]``: causal over slots, padding keys removed, optional sliding window."""
    num_keys = attention_mask_BS.shape[-1]
    q_slot = query_offset + jnp.arange(num_queries)[:, None]
    k_slot = jnp.arange(num_keys)[None, :]
    allowed_TS = k_slot <= q_slot
    if window is not None:
        allowed_TS &= (q_slot - k_slot) < window
    return allowed_TS[None] & attention_mask_BS.astype(bool)[:, None, :]


def update_layer_cache(cache_k_BSKH, cache_v_BSKH, k_BTKH, v_BTKH, index):
    """Write this call's keys and values into the cache at slot ``index``."""
    start = (0, index, 0, 0)
    cache_k_BSKH = jax.lax.dynamic_update_slice(cache_k_BSKH, k_BTKH.astype(cache_k_BSKH.dtype), start)
    cache_v_BSKH = jax.lax.dynamic_update_slice(cache_v_BSKH, v_BTKH.astype(cache_v_BSKH.dtype), start)
    return cache_k_BSKH, cache_v_BSKH


def dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, *, scale: float) -> jax.Array:
    """Grouped-query attention; N query heads share K key/value heads. Returns ``[B, T, N, H]``."""
    b, t, n, h = q_BTNH.shape
    kv_heads = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, kv_heads, n // kv_heads, h)
    logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                              preferred_element_type=jnp.float32) * scale
    neg = jnp.finfo(jnp.float32).min
    logits_BKGTS = jnp.where(mask_BTS[:, None, None, :, :], logits_BKGTS, neg)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(b, t, n, h)


def run_layers(layers, h_BTD: jax.Array, caches: list | None, *args, remat: bool = False, policy=None):
    """Apply ``layers`` in order, each as ``layer(h_BTD, cache_i, *args) -> (h_BTD, cache_i)``.

    ``caches`` is ``None`` (no KV cache) or one entry per layer (e.g. a ``(k, v)`` pair); ``args`` are
    shared by every layer and must be arrays or ``None``. With ``remat`` each layer call is wrapped in
    ``nnx.remat`` (gradient checkpointing: activations inside a layer are recomputed in the backward
    pass; only the layer inputs are kept). Returns ``(h_BTD, new_caches)``.
    """
    def apply(layer, h, cache, *rest):
        return layer(h, cache, *rest)

    if remat:
        apply = nnx.remat(apply, policy=policy)
    new_caches = []
    for i, layer in enumerate(layers):
        h_BTD, cache = apply(layer, h_BTD, None if caches is None else caches[i], *args)
        new_caches.append(cache)
    return h_BTD, (None if caches is None else new_caches)
