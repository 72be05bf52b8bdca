"""The low-level API's losses on the JAX engine: pure functions of per-token logprobs and the datum arrays.

The formulas are ``itersft_jax.shared.datum.builtin_loss`` (written once for both engines) on ``jax.numpy``;
``datum_loss`` is the per-micro-batch loss the core's gradient loop runs: ``cross_entropy`` through the fused
chunked head (``loss.weighted_xent``, the loss ``step()`` uses — no second copy, no logits), every other loss
through ``loss.token_logprobs`` (the one logprob definition) and the formula; ``compute_logprobs`` through
``token_logprobs`` alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from itersft_jax.core.loss import token_logprobs, weighted_xent
from itersft_jax.shared.datum import LOGPROBS_ONLY, LossOps, builtin_loss

JNP_OPS = LossOps(exp=jnp.exp, minimum=jnp.minimum, clip=jnp.clip, sum=jnp.sum, stop_gradient=jax.lax.stop_gradient)
FLOAT_KEYS = ("weights", "logprobs", "advantages")  # the packed batch's float arrays, [A, R, T] like input_ids


def rl_loss(loss_fn: str, logp, inputs: dict, config: dict):
    """``builtin_loss`` on jnp arrays (usable directly on ``[N, L]`` padded data, as in tests and custom fns)."""
    return builtin_loss(JNP_OPS, loss_fn, logp, inputs, config)


def datum_loss(h_BTD, head, micro: dict, *, loss_fn: str, config: tuple, chunk_size: int | None = None):
    """``(summed loss, target-token count, per-token logprobs [B, T])`` of one packed micro-batch of data.

    ``micro``: ``input_ids``, ``attention_mask`` (segment ids, 0 = padding), ``target_tokens`` (already aligned:
    position t's own target) and the float inputs; padding positions hold zeros. ``config``: the loss's
    ``loss_fn_config`` as sorted ``(key, value)`` pairs (static)."""
    inside_BT = (micro["attention_mask"] != 0).astype(jnp.float32)
    count = jnp.sum(inside_BT)
    if loss_fn == "cross_entropy":
        loss, logp_BT = weighted_xent(h_BTD, head, micro["target_tokens"], micro["weights"] * inside_BT,
                                      chunk_size=chunk_size, logprobs=True)
        return loss, count, logp_BT
    logp_BT = token_logprobs(h_BTD, head, micro["target_tokens"], chunk_size=chunk_size)
    if loss_fn == LOGPROBS_ONLY:  # compute_logprobs, forward_backward_custom's first pass
        return jnp.zeros((), jnp.float32), count, logp_BT
    inputs = {k: micro[k] * inside_BT for k in FLOAT_KEYS if k in micro}
    loss = rl_loss(loss_fn, logp_BT, inputs, dict(config))
    return loss, count, jax.lax.stop_gradient(logp_BT)
