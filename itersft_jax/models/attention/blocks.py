"""Block arithmetic shared by the blockwise kernels (xla_chunked, pallas_gpu): block sizes, padding, which key
blocks a query block visits, masked logits."""


from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: a row masked in one block never turns into NaN

def block_size(t: int, cap: int, floor: int = 16) -> int:
    """A power-of-two block: ``cap`` for long rows, a quarter of the row (>= ``floor``) for short ones."""
    return max(floor, min(cap, next_pow2(t) // 4))

def next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(x, 1))))

def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)  # zeros: segment 0 for ids, so padded tokens are padding

def kv_block_range(i, first_key_block, *, block_q: int, block_k: int, window: int | None, div):
    """Key blocks ``[lo, hi)`` that queries of block ``i`` may attend: causal, the window, and not before the
    first key of the block's earliest sample (``first_key_block``, see ``segment_block_bounds``)."""
    hi = div((i + 1) * block_q + block_k - 1, block_k)
    lo = first_key_block
    if window is not None:
        lo = jnp.maximum(lo, div(jnp.maximum(i * block_q - (window - 1), 0), block_k))
    return lo, hi

def q_block_range(j, end_query_block, *, block_q: int, block_k: int, window: int | None, div):
    """Query blocks ``[lo, hi)`` that may attend key block ``j``: causal, the window, and not after the last
    query of the block's latest sample (``end_query_block`` is exclusive)."""
    lo = div(j * block_k, block_q)
    hi = end_query_block
    if window is not None:
        hi = jnp.minimum(hi, div((j + 1) * block_k + window - 2, block_q) + 1)
    return lo, hi

def segment_block_bounds(seg_BT, block_q: int, block_k: int):
    """Per-block loop bounds from the samples: ``first_key_block_BI`` (per query block, the key block holding the
    first token of its earliest sample) and ``end_query_block_BJ`` (per key block, one past the query block
    holding the last token of its latest sample). Packed rows then cost the attention of their samples, not of
    the whole causal triangle.

    A sample is a run of equal ids. Where a row reuses an id in two runs (which the contract lets attend each
    other) the row gets no skipping: bounds 0 and the last block. Padding runs bound padding queries to their
    own run; their outputs are zeroed anyway.
    """
    b, t = seg_BT.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    prev = jnp.pad(seg_BT, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
    nxt = jnp.pad(seg_BT, ((0, 0), (0, 1)), constant_values=-1)[:, 1:]
    first_BT = jax.lax.cummax(jnp.where(seg_BT != prev, pos, 0), axis=1)
    last_BT = jax.lax.cummin(jnp.where(seg_BT != nxt, pos, t - 1), axis=1, reverse=True)
    run_ids = jnp.sort(jnp.where((seg_BT != prev) & (seg_BT != 0), seg_BT, jnp.iinfo(jnp.int32).min), axis=1)
    reused_B = jnp.any((run_ids[:, 1:] == run_ids[:, :-1]) & (run_ids[:, 1:] != jnp.iinfo(jnp.int32).min), axis=1)
    first_BT = jnp.where(reused_B[:, None], 0, first_BT)
    last_BT = jnp.where(reused_B[:, None], t - 1, last_BT)
    first_key_block_BI = first_BT.reshape(b, t // block_q, block_q).min(-1) // block_k
    end_query_block_BJ = last_BT.reshape(b, t // block_k, block_k).max(-1) // block_q + 1
    return first_key_block_BI, end_query_block_BJ

def masked_logits(s, q_pos, k_pos, seg_q, seg_k, *, window, softcap):
    """Soft-cap then mask fp32 ``scale * q.k`` logits ``[..., Q, ..., S]`` laid out as ``q_pos``/``k_pos`` say.

    Returns ``(logits, capped)``; ``capped`` feeds the soft-cap derivative ``1 - (capped / c)^2``. Padding
    queries attend padding keys (ids 0 == 0), so no row is ever empty; their outputs are zeroed outside.
    """
    capped = s if softcap is None else softcap * jnp.tanh(s / softcap)
    allowed = (k_pos <= q_pos) & (seg_q == seg_k)
    if window is not None:
        allowed &= q_pos - k_pos < window
    return jnp.where(allowed, capped, MASK_VALUE), capped

def softcap_grad(ds, capped, softcap):
    return ds if softcap is None else ds * (1.0 - jnp.square(capped / softcap))
