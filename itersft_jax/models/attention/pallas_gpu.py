"""``"pallas_gpu"``: our Pallas (Triton) flash-attention kernel with segment ids, GQA, windows and soft-caps."""


from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from itersft_jax.models.attention.blocks import (
    MASK_VALUE,
    block_size,
    kv_block_range,
    masked_logits,
    next_pow2,
    pad_axis,
    q_block_range,
    segment_block_bounds,
    softcap_grad,
)


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    scale: float
    window: int | None
    softcap: float | None
    groups: int  # query heads per kv head
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    num_warps: int
    num_stages: int
    interpret: bool

def gpu_config(t: int, head_dim: int, **kw) -> GpuConfig:
    """Block sizes for a padded head dim: 128x64 forward / 64x64 backward up to 128 lanes, smaller above."""
    small = head_dim > 128
    return GpuConfig(block_q=block_size(t, 64 if small else 128), block_k=block_size(t, 32 if small else 64),
                   block_q_bwd=block_size(t, 32 if small else 64), block_k_bwd=block_size(t, 32 if small else 64),
                   num_warps=4 if head_dim <= 64 else 8, num_stages=2, **kw)

def pallas_gpu_attention(q_BTNH, k_BTKH, v_BTKH, seg_BT, *, scale, window, softcap, interpret):
    b, t, n, h = q_BTNH.shape
    hp = max(16, next_pow2(h))  # Triton tiles are powers of two; zero lanes change no dot product
    cfg = gpu_config(t, hp, scale=scale, window=window, softcap=softcap, groups=n // k_BTKH.shape[2],
                   interpret=interpret)
    blk = max(cfg.block_q, cfg.block_k, cfg.block_q_bwd, cfg.block_k_bwd)
    tp = -(-t // blk) * blk
    q, k, v = (pad_axis(pad_axis(x, 3, hp), 1, tp) for x in (q_BTNH, k_BTKH, v_BTKH))
    out = _pallas_core(q, k, v, pad_axis(seg_BT, 1, tp), cfg)
    return out[:, :t, :, :h]

def _pallas_call(kernel, cfg: GpuConfig, *, grid, in_specs, out_specs, out_shape, name):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
                          interpret=cfg.interpret, name=name)

def _tile_logits(q, k, q_pos, k_pos, seg_q, seg_k, cfg: GpuConfig):
    from jax.experimental.pallas import triton as plgpu

    s = plgpu.dot(q, k, trans_b=True) * cfg.scale  # fp32 accumulation
    return masked_logits(s, q_pos[:, None], k_pos[None, :], seg_q[:, None], seg_k[None, :], window=cfg.window,
                          softcap=cfg.softcap)

def _fwd_kernel(q_ref, k_ref, v_ref, seg_ref, lo_ref, o_ref, lse_ref, *, cfg: GpuConfig):
    """One query block of one head against the key blocks it may attend (grid: q block, batch, head)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    i, bq, bk = pl.program_id(0), cfg.block_q, cfg.block_k
    q = q_ref[...]
    q_pos = i * bq + jnp.arange(bq)
    seg_q = seg_ref[pl.ds(i * bq, bq)]

    def body(j, carry):
        acc, m, denom = carry
        k = k_ref[pl.ds(j * bk, bk), :]
        logits, _ = _tile_logits(q, k, q_pos, j * bk + jnp.arange(bk), seg_q, seg_ref[pl.ds(j * bk, bk)], cfg)
        m_new = jnp.maximum(m, logits.max(axis=1))
        p = jnp.exp(logits - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        v = v_ref[pl.ds(j * bk, bk), :]
        return alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v), m_new, alpha * denom + p.sum(axis=1)

    lo, hi = kv_block_range(i, lo_ref[()], block_q=bq, block_k=bk, window=cfg.window, div=jax.lax.div)
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, denom = jax.lax.fori_loop(lo, hi, body, init)
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(denom)

def _dkv_kernel(q_ref, k_ref, v_ref, seg_ref, hi_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: GpuConfig):
    """dK, dV of one key block of one kv head: its G query heads' query blocks that attend it (grid: key block,
    batch, kv head). The G heads are a static loop, so GQA needs neither repeated keys nor a reduction."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    j, bq, bk = pl.program_id(0), cfg.block_q_bwd, cfg.block_k_bwd
    k, v = k_ref[...], v_ref[...]
    k_pos = j * bk + jnp.arange(bk)
    seg_k = seg_ref[pl.ds(j * bk, bk)]
    lo, hi = q_block_range(j, hi_ref[()], block_q=bq, block_k=bk, window=cfg.window, div=jax.lax.div)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for g in range(cfg.groups):
        def body(i, carry, g=g):
            dk, dv = carry
            rows = pl.ds(i * bq, bq)
            q, do = q_ref[rows, g, :], do_ref[rows, g, :]
            logits, capped = _tile_logits(q, k, i * bq + jnp.arange(bq), k_pos, seg_ref[rows], seg_k, cfg)
            p = jnp.exp(logits - lse_ref[g, rows][:, None])
            dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
            dp = plgpu.dot(do, v, trans_b=True)
            ds = softcap_grad(p * (dp - delta_ref[g, rows][:, None]), capped, cfg.softcap) * cfg.scale
            return dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True), dv

        dk, dv = jax.lax.fori_loop(lo, hi, body, (dk, dv))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)

def _dq_kernel(q_ref, k_ref, v_ref, seg_ref, lo_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: GpuConfig):
    """dQ of one query block of one head (grid: q block, batch, head), key blocks as in the forward."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    i, bq, bk = pl.program_id(0), cfg.block_q_bwd, cfg.block_k_bwd
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_pos = i * bq + jnp.arange(bq)
    seg_q = seg_ref[pl.ds(i * bq, bq)]

    def body(j, dq):
        k, v = k_ref[pl.ds(j * bk, bk), :], v_ref[pl.ds(j * bk, bk), :]
        logits, capped = _tile_logits(q, k, q_pos, j * bk + jnp.arange(bk), seg_q, seg_ref[pl.ds(j * bk, bk)], cfg)
        p = jnp.exp(logits - lse[:, None])
        dp = plgpu.dot(do, v, trans_b=True)
        ds = softcap_grad(p * (dp - delta[:, None]), capped, cfg.softcap) * cfg.scale
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    lo, hi = kv_block_range(i, lo_ref[()], block_q=bq, block_k=bk, window=cfg.window, div=jax.lax.div)
    dq_ref[...] = jax.lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32)).astype(dq_ref.dtype)

def _specs(cfg: GpuConfig, tp: int, hp: int, block_q: int):
    """BlockSpecs over ``[B, T, heads, H]`` arrays for a (q block, batch, query head) grid."""
    from jax.experimental import pallas as pl

    g = cfg.groups
    q_block = pl.BlockSpec((None, block_q, None, hp), lambda i, b, n: (b, i, n, 0))
    kv_full = pl.BlockSpec((None, tp, None, hp), lambda i, b, n: (b, 0, jax.lax.div(n, g), 0))
    seg_full = pl.BlockSpec((None, tp), lambda i, b, n: (b, 0))
    row_stat = pl.BlockSpec((None, None, block_q), lambda i, b, n: (b, n, i))
    block_bound = pl.BlockSpec((None, None), lambda i, b, n: (b, i))  # one scalar per (row, block)
    return q_block, kv_full, seg_full, row_stat, block_bound

@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _pallas_core(q, k, v, seg, cfg: GpuConfig):
    return _pallas_fwd(q, k, v, seg, cfg)[0]

def _pallas_fwd(q, k, v, seg, cfg: GpuConfig):
    b, tp, n, hp = q.shape
    q_block, kv_full, seg_full, row_stat, block_bound = _specs(cfg, tp, hp, cfg.block_q)
    first_key_block, _ = segment_block_bounds(seg, cfg.block_q, cfg.block_k)
    out, lse_BNT = _pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg), cfg, grid=(tp // cfg.block_q, b, n),
        in_specs=[q_block, kv_full, kv_full, seg_full, block_bound], out_specs=[q_block, row_stat],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, tp), jnp.float32)],
        name="itersft_flash_fwd")(q, k, v, seg, first_key_block)
    return out, (q, k, v, seg, out, lse_BNT)

def _pallas_bwd(cfg: GpuConfig, residuals, d_out):
    from jax.experimental import pallas as pl

    q, k, v, seg, out, lse_BNT = residuals
    b, tp, n, hp = q.shape
    kv, g, bq, bk = k.shape[2], cfg.groups, cfg.block_q_bwd, cfg.block_k_bwd
    d_out = d_out.astype(q.dtype)
    delta_BNT = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    q_all = pl.BlockSpec((None, tp, g, hp), lambda j, b, h: (b, 0, h, 0))  # the G query heads of kv head h
    kv_block = pl.BlockSpec((None, bk, None, hp), lambda j, b, h: (b, j, h, 0))
    stat_all = pl.BlockSpec((None, g, tp), lambda j, b, h: (b, h, 0))
    seg_full = pl.BlockSpec((None, tp), lambda j, b, h: (b, 0))
    key_bound = pl.BlockSpec((None, None), lambda j, b, h: (b, j))
    first_key_block, end_query_block = segment_block_bounds(seg, bq, bk)
    dk, dv = _pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg), cfg, grid=(tp // bk, b, kv),
        in_specs=[q_all, kv_block, kv_block, seg_full, key_bound, q_all, stat_all, stat_all],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="itersft_flash_dkv")(q, k, v, seg, end_query_block, d_out, lse_BNT, delta_BNT)
    q_block, kv_full, seg_full, row_stat, block_bound = _specs(cfg, tp, hp, bq)
    dq = _pallas_call(
        functools.partial(_dq_kernel, cfg=cfg), cfg, grid=(tp // bq, b, n),
        in_specs=[q_block, kv_full, kv_full, seg_full, block_bound, q_block, row_stat, row_stat], out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), name="itersft_flash_dq")(
        q, k, v, seg, first_key_block, d_out, lse_BNT, delta_BNT)
    return dq, dk, dv, None

_pallas_core.defvjp(_pallas_fwd, _pallas_bwd)
