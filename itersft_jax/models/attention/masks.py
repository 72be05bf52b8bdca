"""Positions and attention masks from a 0/1 mask or from segment ids of packed rows (the XLA path's masks)."""


from __future__ import annotations

import jax
import jax.numpy as jnp


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
    """Boolean ``[B, T, S]``: causal over slots, padding keys removed, same segment, optional sliding window.

    A query's segment is the mask at its slot (``query_offset + t``); with a plain 0/1 mask this changes
    nothing for real queries.
    """
    num_keys = attention_mask_BS.shape[-1]
    allowed_TS = slot_mask(num_queries, num_keys, query_offset, window)
    seg_BS = attention_mask_BS.astype(jnp.int32)
    if num_queries == num_keys:
        q_seg_BT = seg_BS
    else:
        q_seg_BT = jax.lax.dynamic_slice_in_dim(seg_BS, query_offset, num_queries, axis=1)
    same_BTS = (seg_BS[:, None, :] == q_seg_BT[:, :, None]) & (seg_BS != 0)[:, None, :]
    return allowed_TS[None] & same_BTS

def slot_mask(num_queries: int, num_keys: int, query_offset, window: int | None) -> jax.Array:
    q_slot = query_offset + jnp.arange(num_queries)[:, None]
    k_slot = jnp.arange(num_keys)[None, :]
    allowed_TS = k_slot <= q_slot
    if window is not None:
        allowed_TS &= (q_slot - k_slot) < window
    return allowed_TS
