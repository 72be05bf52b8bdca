"""``"xla_chunked"``: blockwise online-softmax attention in plain JAX with a flash backward (every backend)."""


from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from itersft_jax.models.attention import blocks


@dataclasses.dataclass(frozen=True)
class _Cfg:
    scale: float
    window: int | None
    softcap: float | None
    block: int

def chunked_attention(q_BTNH, k_BTKH, v_BTKH, seg_BT, *, scale, window, softcap, block_cap: int = 512):
    b, t, n, h = q_BTNH.shape
    kv = k_BTKH.shape[2]
    block = min(blocks.block_size(t, block_cap), blocks.next_pow2(t))
    tp = -(-t // block) * block
    q_BKTGH = blocks.pad_axis(q_BTNH, 1, tp).reshape(b, tp, kv, n // kv, h).transpose(0, 2, 1, 3, 4)
    k_BKTH = blocks.pad_axis(k_BTKH, 1, tp).transpose(0, 2, 1, 3)
    v_BKTH = blocks.pad_axis(v_BTKH, 1, tp).transpose(0, 2, 1, 3)
    seg_BT = blocks.pad_axis(seg_BT, 1, tp)
    bounds = blocks.segment_block_bounds(seg_BT, block, block)
    out_BKTGH = _chunked_core(q_BKTGH, k_BKTH, v_BKTH, seg_BT, bounds, _Cfg(scale, window, softcap, block))
    return out_BKTGH.transpose(0, 2, 1, 3, 4).reshape(b, tp, n, h)[:, :t]

def _chunk_logits(q_BKQGH, k_BKSH, seg_q_BQ, seg_k_BS, q0, k0, cfg: _Cfg):
    """Masked logits ``[B, K, Q, G, S]`` of one (query block, key block) pair, and the soft-capped ones."""
    s = jnp.einsum("bkqgh,bksh->bkqgs", q_BKQGH, k_BKSH, preferred_element_type=jnp.float32) * cfg.scale
    q_pos = (q0 + jnp.arange(q_BKQGH.shape[2]))[:, None, None]
    k_pos = k0 + jnp.arange(k_BKSH.shape[2])
    return blocks.masked_logits(s, q_pos, k_pos, seg_q_BQ[:, None, :, None, None], seg_k_BS[:, None, None, None, :],
                          window=cfg.window, softcap=cfg.softcap)

def _slice_t(x, start, size, axis=2):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)

@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _chunked_core(q_BKTGH, k_BKTH, v_BKTH, seg_BT, bounds, cfg: _Cfg):
    return _chunked_fwd(q_BKTGH, k_BKTH, v_BKTH, seg_BT, bounds, cfg)[0]

def _chunked_fwd(q_BKTGH, k_BKTH, v_BKTH, seg_BT, bounds, cfg: _Cfg):
    """Online softmax: for each query block, the key blocks it may attend, one at a time."""
    b, kv, tp, g, h = q_BKTGH.shape
    bs = cfg.block

    def query_block(i, carry):
        out_BKTGH, lse_BKTG = carry
        q_i = _slice_t(q_BKTGH, i * bs, bs)
        seg_q = _slice_t(seg_BT, i * bs, bs, axis=1)

        def key_block(j, state):
            m, denom, acc = state
            logits, _ = _chunk_logits(q_i, _slice_t(k_BKTH, j * bs, bs), seg_q, _slice_t(seg_BT, j * bs, bs, 1),
                                      i * bs, j * bs, cfg)
            m_new = jnp.maximum(m, logits.max(-1))
            p = jnp.exp(logits - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum("bkqgs,bksh->bkqgh", p.astype(v_BKTH.dtype), _slice_t(v_BKTH, j * bs, bs),
                            preferred_element_type=jnp.float32)
            return m_new, alpha * denom + p.sum(-1), alpha[..., None] * acc + pv

        # one loop serves the whole batch: the bound of the row that needs the most key blocks
        lo, hi = blocks.kv_block_range(i, bounds[0][:, i].min(), block_q=bs, block_k=bs, window=cfg.window,
                                 div=jnp.floor_divide)
        init = (jnp.full((b, kv, bs, g), blocks.MASK_VALUE, jnp.float32), jnp.zeros((b, kv, bs, g), jnp.float32),
                jnp.zeros((b, kv, bs, g, h), jnp.float32))
        m, denom, acc = jax.lax.fori_loop(lo, hi, key_block, init)
        out_i = (acc / denom[..., None]).astype(q_BKTGH.dtype)
        out_BKTGH = jax.lax.dynamic_update_slice_in_dim(out_BKTGH, out_i, i * bs, 2)
        return out_BKTGH, jax.lax.dynamic_update_slice_in_dim(lse_BKTG, m + jnp.log(denom), i * bs, 2)

    init = (jnp.zeros_like(q_BKTGH), jnp.zeros((b, kv, tp, g), jnp.float32))
    out_BKTGH, lse_BKTG = jax.lax.fori_loop(0, tp // bs, query_block, init)
    return out_BKTGH, (q_BKTGH, k_BKTH, v_BKTH, seg_BT, bounds, out_BKTGH, lse_BKTG)

def _chunked_bwd(cfg: _Cfg, residuals, d_out_BKTGH):
    """Flash-attention-2 backward in one pass: for each key block, the query blocks that attend it; dq is
    accumulated into a full fp32 buffer, dk/dv per key block. ``rowsum(dP * P) = rowsum(dO * O)``."""
    q_BKTGH, k_BKTH, v_BKTH, seg_BT, bounds, out_BKTGH, lse_BKTG = residuals
    bs, tp = cfg.block, q_BKTGH.shape[2]
    delta_BKTG = jnp.sum(d_out_BKTGH.astype(jnp.float32) * out_BKTGH.astype(jnp.float32), axis=-1)
    d_out_BKTGH = d_out_BKTGH.astype(q_BKTGH.dtype)

    def key_block(j, carry):
        dq_BKTGH, dk_BKTH, dv_BKTH = carry
        k_j, v_j = _slice_t(k_BKTH, j * bs, bs), _slice_t(v_BKTH, j * bs, bs)
        seg_k = _slice_t(seg_BT, j * bs, bs, axis=1)

        def query_block(i, state):
            dq, dk_j, dv_j = state
            q_i, do_i = _slice_t(q_BKTGH, i * bs, bs), _slice_t(d_out_BKTGH, i * bs, bs)
            logits, capped = _chunk_logits(q_i, k_j, _slice_t(seg_BT, i * bs, bs, 1), seg_k, i * bs, j * bs, cfg)
            p = jnp.exp(logits - _slice_t(lse_BKTG, i * bs, bs)[..., None])
            dv_j = dv_j + jnp.einsum("bkqgs,bkqgh->bksh", p.astype(do_i.dtype), do_i,
                                     preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkqgh,bksh->bkqgs", do_i, v_j, preferred_element_type=jnp.float32)
            ds = blocks.softcap_grad(p * (dp - _slice_t(delta_BKTG, i * bs, bs)[..., None]), capped, cfg.softcap)
            ds = (ds * cfg.scale).astype(q_i.dtype)
            dk_j = dk_j + jnp.einsum("bkqgs,bkqgh->bksh", ds, q_i, preferred_element_type=jnp.float32)
            dq_i = _slice_t(dq, i * bs, bs) + jnp.einsum("bkqgs,bksh->bkqgh", ds, k_j,
                                                         preferred_element_type=jnp.float32)
            return jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * bs, 2), dk_j, dv_j

        lo, hi = blocks.q_block_range(j, bounds[1][:, j].max(), block_q=bs, block_k=bs, window=cfg.window,
                                div=jnp.floor_divide)
        zeros = jnp.zeros(k_j.shape, jnp.float32)
        dq_BKTGH, dk_j, dv_j = jax.lax.fori_loop(lo, hi, query_block, (dq_BKTGH, zeros, zeros))
        dk_BKTH = jax.lax.dynamic_update_slice_in_dim(dk_BKTH, dk_j.astype(dk_BKTH.dtype), j * bs, 2)
        dv_BKTH = jax.lax.dynamic_update_slice_in_dim(dv_BKTH, dv_j.astype(dv_BKTH.dtype), j * bs, 2)
        return dq_BKTGH, dk_BKTH, dv_BKTH

    init = (jnp.zeros(q_BKTGH.shape, jnp.float32), jnp.zeros_like(k_BKTH), jnp.zeros_like(v_BKTH))
    dq_BKTGH, dk_BKTH, dv_BKTH = jax.lax.fori_loop(0, tp // bs, key_block, init)
    return dq_BKTGH.astype(q_BKTGH.dtype), dk_BKTH, dv_BKTH, None, None

_chunked_core.defvjp(_chunked_fwd, _chunked_bwd)
