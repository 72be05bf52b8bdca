"""Decode attention over a prompt held once for its rows (issue 28, item 3; the engine does not call it yet, see
docs/sampler.md "A prompt's KV held once"): each row attends its group's prefix keys/values (``[G, K, P, H]``, one
copy per prompt) and its own suffix (``[B, K, S, H]``: the tokens it generated), the two partial softmaxes merged by
log-sum-exp, as cascade / shared-prefix attention does (FlashInfer's cascade, Hydragen).

``out = (e^{m_p} Z_p o_p + e^{m_s} Z_s o_s) / (e^{m_p} Z_p + e^{m_s} Z_s)``: each part's output ``o`` normalised
by its own sum ``Z`` at its own max ``m``, rescaled to a common max. Equal to one softmax over the row's prefix
followed by its suffix (tested against ``grouped_attention`` over the concatenated keys, fp32, 1e-6).

The prefix part computes every row's logits against *every* group's prefix and keeps its own group's (a one-hot
over groups): the ``G`` prefixes are read once per step, not once per row, for ``G x`` the prefix logits' FLOPs —
small next to the model's matmuls in a decode step while ``G`` (distinct prompts among the slots) is small, the
case this layout is for (n = 16 rows per prompt).
"""

from __future__ import annotations

import jax.numpy as jnp


def _partial(logits_BKQS, v, spec: str):
    """A masked part's ``(max [B, K, Q, 1], sum of exp [B, K, Q, 1], normalised output)``; a row with no
    unmasked key in it gets sum 0 (its part then weighs nothing)."""
    max_BKQ1 = jnp.max(logits_BKQS, axis=-1, keepdims=True)
    max_BKQ1 = jnp.where(jnp.isfinite(max_BKQ1), max_BKQ1, 0.0)
    p_BKQS = jnp.exp(logits_BKQS - max_BKQ1)
    z_BKQ1 = jnp.sum(p_BKQS, axis=-1, keepdims=True)
    out = jnp.einsum(spec, p_BKQS.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return max_BKQ1, z_BKQ1, out / jnp.maximum(z_BKQ1, jnp.finfo(jnp.float32).tiny)


def shared_prefix_attention(q_BTNH, prefix_k_GKPH, prefix_v_GKPH, prefix_mask_GP, group_B, k_BKSH, v_BKSH,
                            mask_BTS, *, scale: float, softcap: float | None = None):
    """Grouped-query attention of ``q`` (``[B, T, N, H]``, N query heads over K key heads) over row ``b``'s
    group prefix ``prefix[group_B[b]]`` (``prefix_mask_GP``: 1 = a real prompt token, all visible to every
    query) followed by its own suffix keys (``mask_BTS`` as ``grouped_attention``'s). Logits and softmax fp32;
    returns ``[B, T, N, H]`` in ``q``'s dtype."""
    b, t, n, h = q_BTNH.shape
    kv_heads = k_BKSH.shape[1]
    groups = prefix_k_GKPH.shape[0]
    q_BKQH = q_BTNH.transpose(0, 2, 1, 3).reshape(b, kv_heads, (n // kv_heads) * t, h)

    def cap(x):
        return x if softcap is None else softcap * jnp.tanh(x / softcap)

    # prefix: every group's keys once; a row keeps its own group's logits
    logits_BKQGP = cap(jnp.einsum("bkqh,gkph->bkqgp", q_BKQH, prefix_k_GKPH.astype(q_BKQH.dtype),
                                  preferred_element_type=jnp.float32) * scale)
    own_BG = group_B[:, None] == jnp.arange(groups)[None, :]
    visible_BGP = own_BG[:, :, None] & (prefix_mask_GP[None] > 0)
    logits_BKQGP = jnp.where(visible_BGP[:, None, None], logits_BKQGP, -jnp.inf)
    logits_BKQX = logits_BKQGP.reshape(b, kv_heads, -1, groups * prefix_k_GKPH.shape[2])
    v_prefix_XKH = prefix_v_GKPH.transpose(0, 2, 1, 3).reshape(-1, kv_heads, h)
    m_p, z_p, o_p = _partial(logits_BKQX, v_prefix_XKH, "bkqx,xkh->bkqh")

    # suffix: the row's own slots, masked as the XLA path masks a cache
    logits_BKQS = cap(jnp.einsum("bkqh,bksh->bkqs", q_BKQH, k_BKSH.astype(q_BKQH.dtype),
                                 preferred_element_type=jnp.float32) * scale)
    s = k_BKSH.shape[2]
    logits_BKGTS = logits_BKQS.reshape(b, kv_heads, -1, t, s)
    logits_BKQS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, -jnp.inf).reshape(b, kv_heads, -1, s)
    m_s, z_s, o_s = _partial(logits_BKQS, v_BKSH.astype(q_BKQH.dtype), "bkqs,bksh->bkqh")

    m = jnp.maximum(m_p, m_s)
    w_p, w_s = z_p * jnp.exp(m_p - m), z_s * jnp.exp(m_s - m)
    out_BKQH = (w_p * o_p + w_s * o_s) / (w_p + w_s)
    return out_BKQH.astype(q_BTNH.dtype).reshape(b, n, t, h).transpose(0, 2, 1, 3)
