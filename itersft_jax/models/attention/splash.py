"""``"splash"``: TPU splash attention with segment ids, causal/local masks and GQA."""


from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from itersft_jax.models.attention.blocks import pad_axis


@functools.lru_cache(maxsize=64)
def _splash_kernel(t: int, groups: int, window: int | None, softcap: float | None, block: int, interpret: bool):
    """The MQA splash kernel for ``groups`` query heads sharing one kv head (built once per static case)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if window is None:
        head_mask = sa.CausalMask((t, t))
    else:  # keys t - (window - 1) .. t
        head_mask = sa.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
    blocks = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                           block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sa.make_splash_mqa_single_device(sa.MultiHeadMask([head_mask] * groups), block_sizes=blocks,
                                            attn_logits_soft_cap=softcap, interpret=interpret)

def splash_attention(q_BTNH, k_BTKH, v_BTKH, seg_BT, *, scale, window, softcap, interpret):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, n, h = q_BTNH.shape
    kv = k_BTKH.shape[2]
    tp = -(-t // 128) * 128  # splash tiles are multiples of 128 tokens
    block = next(blk for blk in (512, 256, 128) if tp % blk == 0)
    kernel = _splash_kernel(tp, n // kv, window, softcap, block, interpret)
    # splash takes no scale: fold it into q (soft-cap then sees scale * q.k, as specified)
    q_BKGTH = (pad_axis(q_BTNH, 1, tp) * jnp.asarray(scale, q_BTNH.dtype)).reshape(b, tp, kv, n // kv, h)
    q_BKGTH = q_BKGTH.transpose(0, 2, 3, 1, 4)
    k_BKTH = pad_axis(k_BTKH, 1, tp).transpose(0, 2, 1, 3)
    v_BKTH = pad_axis(v_BTKH, 1, tp).transpose(0, 2, 1, 3)
    seg_BT = pad_axis(seg_BT, 1, tp)

    def one_row(q_KGTH, k_KTH, v_KTH, seg_T):
        ids = sa.SegmentIds(q=seg_T, kv=seg_T)
        return jax.vmap(kernel, in_axes=(0, 0, 0, None))(q_KGTH, k_KTH, v_KTH, ids)

    out_BKGTH = jax.vmap(one_row)(q_BKGTH, k_BKTH, v_BKTH, seg_BT)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, tp, n, h)[:, :t]
