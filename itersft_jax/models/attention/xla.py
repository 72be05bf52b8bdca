"""The materializing XLA attention path (``"xla"``): grouped-query attention with a hand-written backward."""


from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def grouped_attention(q_BTNH, k_BKSH, v_BKSH, mask_BTS, *, scale: float, softcap: float | None = None):
    """The XLA path: grouped-query attention over heads-first keys/values; N query heads share K heads.

    Query head ``n`` uses key head ``n // (N // K)``. The queries are laid out ``[B, K, G*T, H]`` so both
    products are plain batched matmuls over ``(B, K)``; the 5-D einsum this replaces made XLA:CPU
    transpose the ``[B, K, G, T, S]`` logits (measured: ``benchmarks/results/cpu_design_choices.md``).
    """
    b, t, n, h = q_BTNH.shape
    kv_heads = k_BKSH.shape[1]
    q_BKQH = q_BTNH.transpose(0, 2, 1, 3).reshape(b, kv_heads, (n // kv_heads) * t, h)
    out_BKQH = _attention_core(q_BKQH, k_BKSH, v_BKSH, mask_BTS, float(scale),
                               None if softcap is None else float(softcap))
    return out_BKQH.reshape(b, n, t, h).transpose(0, 2, 1, 3)

def _mm(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum`` accumulated in fp32, returned in ``a``'s dtype."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(a.dtype)

def _raw_logits(q_BKQH, k_BKSH, scale):
    return jnp.einsum("bkqh,bksh->bkqs", q_BKQH, k_BKSH, preferred_element_type=jnp.float32) * scale

def _attention_probs(q_BKQH, k_BKSH, mask_BTS, scale, softcap):
    b, kv_heads, q, _ = q_BKQH.shape
    t, s = mask_BTS.shape[1], k_BKSH.shape[2]
    logits_BKQS = _raw_logits(q_BKQH, k_BKSH, scale)
    if softcap is not None:
        logits_BKQS = softcap * jnp.tanh(logits_BKQS / softcap)
    logits_BKGTS = logits_BKQS.reshape(b, kv_heads, q // t, t, s)
    logits_BKGTS = jnp.where(mask_BTS[:, None, None, :, :], logits_BKGTS, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits_BKGTS, axis=-1).reshape(b, kv_heads, q, s)  # fp32

@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention_core(q_BKQH, k_BKSH, v_BKSH, mask_BTS, scale: float, softcap: float | None):
    """``softmax(mask(softcap(q k^T * scale))) v`` with a hand-written backward.

    The backward uses ``rowsum(dP * P) = rowsum(dO * O)`` (as flash attention does): a reduction over
    ``H`` instead of one over the ``[Q, S]`` probabilities, which XLA:CPU ran slowly (measured:
    ``benchmarks/results/cpu_design_choices.md``). With a soft-cap it recomputes ``q k^T`` for ``1 - tanh^2``
    rather than keeping a second ``[Q, S]`` fp32 residual.
    """
    return _attention_core_fwd(q_BKQH, k_BKSH, v_BKSH, mask_BTS, scale, softcap)[0]

def _attention_core_fwd(q_BKQH, k_BKSH, v_BKSH, mask_BTS, scale, softcap):
    probs_BKQS = _attention_probs(q_BKQH, k_BKSH, mask_BTS, scale, softcap)
    out_BKQH = _mm("bkqs,bksh->bkqh", probs_BKQS.astype(v_BKSH.dtype), v_BKSH)
    return out_BKQH, (q_BKQH, k_BKSH, v_BKSH, mask_BTS, probs_BKQS, out_BKQH)

def _attention_core_bwd(scale, softcap, residuals, d_out_BKQH):
    q_BKQH, k_BKSH, v_BKSH, mask_BTS, probs_BKQS, out_BKQH = residuals
    d_v_BKSH = _mm("bkqs,bkqh->bksh", probs_BKQS.astype(d_out_BKQH.dtype), d_out_BKQH)
    d_probs_BKQS = jnp.einsum("bkqh,bksh->bkqs", d_out_BKQH, v_BKSH, preferred_element_type=jnp.float32)
    delta_BKQ1 = jnp.sum(d_out_BKQH.astype(jnp.float32) * out_BKQH.astype(jnp.float32), axis=-1, keepdims=True)
    d_logits_BKQS = probs_BKQS * (d_probs_BKQS - delta_BKQ1) * scale
    if softcap is not None:  # d/dx c*tanh(x/c) = 1 - tanh^2
        d_logits_BKQS = d_logits_BKQS * (1 - jnp.square(jnp.tanh(_raw_logits(q_BKQH, k_BKSH, scale) / softcap)))
    d_logits_BKQS = d_logits_BKQS.astype(q_BKQH.dtype)
    d_q_BKQH = _mm("bkqs,bksh->bkqh", d_logits_BKQS, k_BKSH)
    d_k_BKSH = _mm("bkqs,bkqh->bksh", d_logits_BKQS, q_BKQH)
    return d_q_BKQH, d_k_BKSH.astype(k_BKSH.dtype), d_v_BKSH.astype(v_BKSH.dtype), None

_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)
