"""Pieces every model family shares: the KV cache, the attention mask and dot-product attention.

Conventions (all families follow them, see ``models/__init__.py``):

* ``input_ids_BT`` int32, ``positions_BT`` int32 (from the attention mask, see ``positions_from_mask``),
  ``attention_mask_BS`` int/bool over the *key* slots: ``S == T`` without a cache, ``S`` = cache length
  with one. 1 marks a real token, 0 padding; packed rows carry segment ids (1, 2, ...) instead, and a
  query attends only its own segment (``make_attention_mask``).
* Without a cache, query ``t`` sits in slot ``t``; with one, in slot ``cache.index + t``. A query may
  attend a key slot at or before its own slot that the mask marks real (and, for sliding-window
  attention, less than ``window`` slots behind it).
* Softmax and attention logits are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer keys and values, ``[B, K, S, H]`` each, and the number of slots already written.

    Heads before slots: attention contracts over ``H`` and ``S`` per head, so this layout feeds the batched
    matmuls directly; a ``[B, S, K, H]`` cache made XLA transpose every layer's whole cache at every decode
    step (1.45x slower generation on this CPU).
    """

    k: list[jax.Array]
    v: list[jax.Array]
    index: jax.Array  # int32 scalar

    @classmethod
    def zeros(cls, num_layers: int, batch: int, length: int, num_kv_heads: int, head_dim: int,
              dtype=jnp.float32) -> KVCache:
        shape = (batch, num_kv_heads, length, head_dim)
        return cls(k=[jnp.zeros(shape, dtype) for _ in range(num_layers)],
                   v=[jnp.zeros(shape, dtype) for _ in range(num_layers)],
                   index=jnp.zeros((), jnp.int32))


class LMHead(NamedTuple):
    """The output projection of a causal LM, as data: ``logits = softcap(h @ W)``.

    ``weight`` is ``[D, V]`` (an ``nnx.Linear`` kernel) or, with ``transposed``, ``[V, D]`` (a tied embedding
    table); ``softcap`` is Gemma's final-logit soft-capping ``c * tanh(logits / c)`` or ``None``; ``dtype`` is
    the compute dtype of the product. The loss (``itersft_jax.loss``) takes this instead of logits, so it can
    compute the head chunk by chunk and never hold ``[N, V]``.
    """

    weight: jax.Array
    transposed: bool
    softcap: float | None
    dtype: Any


def head_logits(head: LMHead, h_ND: jax.Array) -> jax.Array:
    """``softcap(h @ W)`` over the flattened leading axes, accumulated in fp32, returned in ``head.dtype``."""
    lead = h_ND.shape[:-1]
    x = h_ND.reshape(-1, h_ND.shape[-1]).astype(head.dtype)
    if jnp.dtype(head.dtype).itemsize < 4:  # 16-bit x 16-bit -> fp32 products, backward included
        logits = _matmul_f32_acc(x, head.weight, head.transposed)
    else:
        w = head.weight.astype(head.dtype)
        logits = jnp.dot(x, w.T if head.transposed else w, preferred_element_type=jnp.float32)
    if head.softcap is not None:
        logits = head.softcap * jnp.tanh(logits / head.softcap)
    return logits.astype(head.dtype).reshape(*lead, logits.shape[-1])


def dense(layer, x_NI: jax.Array) -> jax.Array:
    """``layer(x)`` (an ``nnx.Linear`` or ``Embed.attend``) as one 2-D matmul over the flattened leading axes.

    Why: XLA:CPU lowers the weight gradient of a 3-D ``[B, T, D]`` input (two contracting axes) to
    transposed copies of the activations plus a slow generic dot; on ``[B*T, D]`` it is one fast GEMM
    (an MLP's forward+backward measured 258 ms -> 151 ms on this 2-core CPU). The reshapes are free.
    With a 16-bit compute dtype the product accumulates in fp32 (``_low_precision_dense``).
    """
    lead = x_NI.shape[:-1]
    x_NI = x_NI.reshape(-1, x_NI.shape[-1])
    y = _low_precision_dense(layer, x_NI)
    y = layer(x_NI) if y is None else y
    return y.reshape(*lead, y.shape[-1])


def _low_precision_dense(layer, x_NI):
    """bf16/fp16 ``Linear``/``Embed.attend`` as a 16-bit x 16-bit -> fp32 product, cast back; ``None`` for
    fp32 layers. XLA:CPU runs a bf16 -> bf16 dot as an upcast fp32 dot (142 GFLOP/s at 512x256x704 here)
    but bf16 -> fp32 on the CPU's bf16 units (619 GFLOP/s); fp32 accumulation is also what GPUs do."""
    owner = getattr(layer, "__self__", layer)  # Embed.attend is a bound method
    dtype = getattr(owner, "dtype", None)
    if dtype is None or jnp.dtype(dtype).itemsize >= 4:
        return None
    if isinstance(owner, nnx.Linear):
        y = _matmul_f32_acc(x_NI.astype(dtype), owner.kernel[...], False)
        if owner.bias is not None:
            y = y + owner.bias[...].astype(jnp.float32)
        return y.astype(dtype)
    if isinstance(owner, nnx.Embed) and getattr(layer, "__name__", "") == "attend":
        return _matmul_f32_acc(x_NI.astype(dtype), owner.embedding[...], True).astype(dtype)
    return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_f32_acc(x_NI, w, transposed: bool):
    """``x @ w`` (``w.T`` if ``transposed``) with ``w`` cast to ``x``'s 16-bit dtype, accumulated in fp32.

    Hand-written VJP so the backward products are 16-bit x 16-bit -> fp32 as well (autodiff would meet an
    fp32 cotangent and fall back to fp32 GEMMs); the weight gradient comes back in ``w``'s dtype.
    """
    return _matmul_f32_acc_fwd(x_NI, w, transposed)[0]


def _matmul_f32_acc_fwd(x_NI, w, transposed):
    w16 = w.astype(x_NI.dtype)
    w16_IO = w16.T if transposed else w16
    return jnp.dot(x_NI, w16_IO, preferred_element_type=jnp.float32), (x_NI, w16)


def _matmul_f32_acc_bwd(transposed, residuals, g_NO):
    x_NI, w16 = residuals
    g_NO = g_NO.astype(x_NI.dtype)
    w16_IO = w16.T if transposed else w16
    d_x_NI = jnp.dot(g_NO, w16_IO.T, preferred_element_type=jnp.float32).astype(x_NI.dtype)
    d_w_IO = jnp.dot(x_NI.T, g_NO, preferred_element_type=jnp.float32)
    return d_x_NI, (d_w_IO.T if transposed else d_w_IO)


_matmul_f32_acc.defvjp(_matmul_f32_acc_fwd, _matmul_f32_acc_bwd)


def positions_from_mask(attention_mask_BT: jax.Array) -> jax.Array:
    """Position of each token among the real tokens of its row (0 for leading padding)."""
    mask = attention_mask_BT.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def positions_from_segments(segment_ids_BT: jax.Array) -> jax.Array:
    """Position of each token within its segment: restarts at 0 wherever the segment id changes.

    For a 0/1 mask with right padding this is ``positions_from_mask`` on the real tokens (padding gets
    positions of its own, which nothing reads); for packed rows (ids 1, 1, 2, 2, 2, 0) every sample
    starts at 0, as it would alone.
    """
    seg = segment_ids_BT.astype(jnp.int32)
    t_BT = jnp.broadcast_to(jnp.arange(seg.shape[-1], dtype=jnp.int32), seg.shape)
    starts_BT = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=-1)
    first_BT = jax.lax.cummax(jnp.where(starts_BT, t_BT, 0), axis=1)
    return t_BT - first_BT


def make_attention_mask(attention_mask_BS: jax.Array, num_queries: int, query_offset=0,
                        window: int | None = None) -> jax.Array:
    """Boolean ``[B, T, S]``: causal over slots, padding keys removed, optional sliding window.

    ``attention_mask_BS`` may carry segment ids (1, 2, ... for samples packed into one row, 0 for
    padding) instead of 0/1: a query then attends only keys of its own segment. The query's segment is
    the mask at its slot (``query_offset + t``); with a plain 0/1 mask this changes nothing for real
    queries.
    """
    num_keys = attention_mask_BS.shape[-1]
    q_slot = query_offset + jnp.arange(num_queries)[:, None]
    k_slot = jnp.arange(num_keys)[None, :]
    allowed_TS = k_slot <= q_slot
    if window is not None:
        allowed_TS &= (q_slot - k_slot) < window
    seg_BS = attention_mask_BS.astype(jnp.int32)
    if num_queries == num_keys:
        q_seg_BT = seg_BS
    else:
        q_seg_BT = jax.lax.dynamic_slice_in_dim(seg_BS, query_offset, num_queries, axis=1)
    same_BTS = (seg_BS[:, None, :] == q_seg_BT[:, :, None]) & (seg_BS != 0)[:, None, :]
    return allowed_TS[None] & same_BTS


def update_layer_cache(cache_k_BKSH, cache_v_BKSH, k_BTKH, v_BTKH, index):
    """Write this call's keys and values (``[B, T, K, H]``) into the cache at slot ``index``."""
    start = (0, 0, index, 0)
    k_BKTH = k_BTKH.transpose(0, 2, 1, 3).astype(cache_k_BKSH.dtype)
    v_BKTH = v_BTKH.transpose(0, 2, 1, 3).astype(cache_v_BKSH.dtype)
    cache_k_BKSH = jax.lax.dynamic_update_slice(cache_k_BKSH, k_BKTH, start)
    cache_v_BKSH = jax.lax.dynamic_update_slice(cache_v_BKSH, v_BKTH, start)
    return cache_k_BKSH, cache_v_BKSH


def grouped_attention(q_BTNH, k_BKSH, v_BKSH, mask_BTS, *, scale: float) -> jax.Array:
    """Grouped-query attention over heads-first keys/values; N query heads share K heads. ``[B, T, N, H]``.

    Query head ``n`` uses key head ``n // (N // K)``. The queries are laid out ``[B, K, G*T, H]`` so both
    products are plain batched matmuls over ``(B, K)``; the 5-D einsum this replaces made XLA:CPU
    transpose the ``[B, K, G, T, S]`` logits (fwd+bwd of one 8x256x8x64 attention: 81 -> 61 ms).
    """
    b, t, n, h = q_BTNH.shape
    kv_heads = k_BKSH.shape[1]
    g = n // kv_heads
    q_BKQH = q_BTNH.transpose(0, 2, 1, 3).reshape(b, kv_heads, g * t, h)
    out_BKQH = _attention_core(q_BKQH, k_BKSH, v_BKSH, mask_BTS, float(scale))
    return out_BKQH.reshape(b, n, t, h).transpose(0, 2, 1, 3)


def _mm(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum`` accumulated in fp32, returned in ``a``'s dtype (see ``_low_precision_dense``)."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def _attention_probs(q_BKQH, k_BKSH, mask_BTS, scale):
    b, kv_heads, q, _ = q_BKQH.shape
    t, s = mask_BTS.shape[1], k_BKSH.shape[2]
    logits_BKQS = jnp.einsum("bkqh,bksh->bkqs", q_BKQH, k_BKSH, preferred_element_type=jnp.float32) * scale
    logits_BKGTS = logits_BKQS.reshape(b, kv_heads, q // t, t, s)
    logits_BKGTS = jnp.where(mask_BTS[:, None, None, :, :], logits_BKGTS, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits_BKGTS, axis=-1).reshape(b, kv_heads, q, s)  # fp32


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_core(q_BKQH, k_BKSH, v_BKSH, mask_BTS, scale: float):
    """``softmax(mask(q k^T * scale)) v`` with a hand-written backward.

    The backward uses ``rowsum(dP * P) = rowsum(dO * O)`` (as flash attention does): a reduction over
    ``H`` instead of one over the ``[Q, S]`` probabilities, which XLA:CPU ran slowly. Forward+backward of
    one 8x256x8x64 attention: 69 -> 55 ms.
    """
    return _attention_core_fwd(q_BKQH, k_BKSH, v_BKSH, mask_BTS, scale)[0]


def _attention_core_fwd(q_BKQH, k_BKSH, v_BKSH, mask_BTS, scale):
    probs_BKQS = _attention_probs(q_BKQH, k_BKSH, mask_BTS, scale)
    out_BKQH = _mm("bkqs,bksh->bkqh", probs_BKQS.astype(v_BKSH.dtype), v_BKSH)
    return out_BKQH, (q_BKQH, k_BKSH, v_BKSH, mask_BTS, probs_BKQS, out_BKQH)


def _attention_core_bwd(scale, residuals, d_out_BKQH):
    q_BKQH, k_BKSH, v_BKSH, mask_BTS, probs_BKQS, out_BKQH = residuals
    d_v_BKSH = _mm("bkqs,bkqh->bksh", probs_BKQS.astype(d_out_BKQH.dtype), d_out_BKQH)
    d_probs_BKQS = jnp.einsum("bkqh,bksh->bkqs", d_out_BKQH, v_BKSH, preferred_element_type=jnp.float32)
    delta_BKQ1 = jnp.sum(d_out_BKQH.astype(jnp.float32) * out_BKQH.astype(jnp.float32), axis=-1, keepdims=True)
    d_logits_BKQS = (probs_BKQS * (d_probs_BKQS - delta_BKQ1) * scale).astype(q_BKQH.dtype)
    d_q_BKQH = _mm("bkqs,bksh->bkqh", d_logits_BKQS, k_BKSH)
    d_k_BKSH = _mm("bkqs,bkqh->bksh", d_logits_BKQS, q_BKQH)
    return d_q_BKQH, d_k_BKSH.astype(k_BKSH.dtype), d_v_BKSH.astype(v_BKSH.dtype), None


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


def dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, *, scale: float) -> jax.Array:
    """``grouped_attention`` for sequence-first keys/values ``[B, S, K, H]``. Returns ``[B, T, N, H]``."""
    return grouped_attention(q_BTNH, k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3), mask_BTS,
                             scale=scale)


def run_layers(layers, h_BTD: jax.Array, cache: KVCache | None, *args, remat: bool = False, policy=None):
    """Apply ``layers`` in order, each as ``layer(h_BTD, kv_i, *args) -> (h_BTD, kv_i)``, threading the cache.

    ``kv_i`` is layer i's ``(k, v)`` slice of ``cache``, or ``None`` without a cache; ``args`` are shared
    by every layer and must be arrays or ``None``. With ``remat`` each layer call is wrapped in
    ``nnx.remat`` (gradient checkpointing: activations inside a layer are recomputed in the backward
    pass; only the layer inputs are kept). Returns ``(h_BTD, cache)``, the cache advanced by ``T`` slots.
    """
    def apply(layer, h, kv, *rest):
        return layer(h, kv, *rest)

    if remat:
        apply = nnx.remat(apply, policy=policy)
    new_k, new_v = [], []
    for i, layer in enumerate(layers):
        h_BTD, kv = apply(layer, h_BTD, None if cache is None else (cache.k[i], cache.v[i]), *args)
        if cache is not None:
            new_k.append(kv[0])
            new_v.append(kv[1])
    if cache is not None:
        cache = KVCache(k=new_k, v=new_v, index=cache.index + h_BTD.shape[1])
    return h_BTD, cache
