"""The causal-LM loss from hidden states: LM head and cross-entropy fused, computed in chunks of tokens.

``causal_lm_loss(h_BTD, head, labels_BT)`` takes the LM head's input and the head as data
(``models.layers.LMHead``), never logits: the ``N = B * T`` tokens are cut into chunks of ``chunk_size``
rows and each chunk's ``[C, V]`` logits live only inside the chunk, so neither the forward nor the
backward pass ever holds ``[N, V]`` (with a 128k vocabulary, 2,048 tokens of fp32 logits are 1 GB; the
logits, their softmax and their gradient made three such buffers).

The gradient is computed in the same pass as the loss (as fused linear cross-entropy kernels do): per
chunk, ``dlogits = weight * (softmax - target distribution)`` right after the softmax, then ``dh`` and
``dW`` (accumulated over chunks in fp32). The custom VJP keeps ``dh`` and ``dW`` as its residuals and
scales them by the incoming cotangent, so no chunk's head matmul is recomputed and a single chunk costs
what an unfused head + cross-entropy costs (three ``N x D x V`` matmuls). Without differentiation
(evaluation) only the loss is computed.

``token_logprobs(h_BTD, head, targets_BT)`` gives each token's log-probability through the same chunked head —
the one definition the low-level API's losses, ``compute_logprobs`` and the sampler's logprobs share.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from itersft_jax.models.layers import LMHead
from itersft_jax.shared.data import IGNORE_INDEX

CHUNK_BYTES = 128 * 2**20  # fp32 logits of one chunk (its gradient reuses the buffer)
CHUNK_ROW_MULTIPLE = 128  # chunk rows: a multiple of this (GEMM tiles on accelerators)


def default_chunk_size(vocab_size: int) -> int:
    """Token rows per chunk: as many as keep one chunk's fp32 logits within ``CHUNK_BYTES`` (128 MiB), in
    multiples of 128 rows.

    128,256 (Llama 3) -> 256 rows, 32,000 -> 1,024, 8,192 -> 4,096: a CPU micro-batch (~512 tokens) of a
    vocabulary up to 64k is one chunk (no loop), and every chunk is still a large GEMM. Measured on this
    CPU (2-layer Llama, vocab 128k, ``benchmarks/memory_check.py``): each halving of the chunk cut the
    step's peak resident memory by ~250 MB (XLA's temporaries plus the GEMM library's packed copies of the
    chunk); 512 rows missed the 0.25x-of-torch target, 256 meets it.
    """
    rows = CHUNK_BYTES // (4 * vocab_size)
    return max(CHUNK_ROW_MULTIPLE, rows // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE)


def check_loss_options(label_smoothing: float = 0.0, chunk_size: int | None = None) -> None:
    """``ValueError`` naming the option unless ``0 <= label_smoothing <= 1`` and ``chunk_size`` is a positive
    int (or ``None``: ``default_chunk_size``)."""
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"`label_smoothing` (label_smoothing_factor) must be in [0, 1], got {label_smoothing!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}")


def causal_lm_loss(h_BTD: jax.Array, head: LMHead, labels_BT: jax.Array, *, label_smoothing: float = 0.0,
                   chunk_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy of ``softcap(h @ W)`` and the number of label tokens, both fp32.

    ``labels_BT`` follow the HF convention: aligned with the inputs, ``-100`` ignored; the shift happens
    here (position ``t`` predicts ``labels[t + 1]``). ``label_smoothing`` ``eps`` is transformers'
    ``LabelSmoother`` / torch's ``cross_entropy(label_smoothing=eps)``: each label token's loss is
    ``(1 - eps) * nll + eps * mean_v(-log p_v)``; the caller divides the sum once by the label-token count.
    ``chunk_size``: token rows per chunk (``None``: ``default_chunk_size(V)``); the last chunk is padded
    with zero-weight rows. Products accumulate in fp32, softmax and loss are fp32 whatever ``head.dtype``.
    """
    check_loss_options(label_smoothing, chunk_size)
    ignore_B1 = jnp.full((labels_BT.shape[0], 1), IGNORE_INDEX, labels_BT.dtype)
    targets_BT = jnp.concatenate([labels_BT[:, 1:], ignore_B1], axis=1)
    weights_BT = (targets_BT != IGNORE_INDEX).astype(jnp.float32)
    safe_targets_BT = jnp.where(targets_BT == IGNORE_INDEX, 0, targets_BT)
    loss = weighted_xent(h_BTD, head, safe_targets_BT, weights_BT, label_smoothing=label_smoothing,
                         chunk_size=chunk_size)
    return loss, jnp.sum(weights_BT)


def weighted_xent(h_BTD: jax.Array, head: LMHead, targets_BT: jax.Array, weights_BT: jax.Array, *,
                  label_smoothing: float = 0.0, chunk_size: int | None = None, logprobs: bool = False):
    """``sum(weights * xent(softcap(h @ W), targets))`` over already-aligned targets (any ids in ``[0, V)``; any
    real weights, negative ones included), fused and chunked as described above: the cross_entropy loss of
    ``causal_lm_loss`` (which shifts HF labels into these) and of the low-level API.

    ``logprobs=True``: also each token's log-probability ``[B, T]`` fp32 (``token_logprobs``' quantity),
    computed in the same pass from the chunk's ``log Z`` and target logit; no gradient flows through it."""
    n, d = math.prod(h_BTD.shape[:-1]), h_BTD.shape[-1]
    vocab = head.weight.shape[0 if head.transposed else 1]
    chunk = min(chunk_size or default_chunk_size(vocab), n)
    padded = -(-n // chunk) * chunk
    h_ND, targets_N, weights_N = h_BTD.reshape(n, d), targets_BT.reshape(n), weights_BT.reshape(n)
    if padded > n:  # a ragged last chunk: zero-weight rows (cheap: [pad, D], not [pad, V])
        h_ND = jnp.pad(h_ND, ((0, padded - n), (0, 0)))
        targets_N, weights_N = jnp.pad(targets_N, (0, padded - n)), jnp.pad(weights_N, (0, padded - n))
    spec = _Spec(head.transposed, head.softcap, jnp.dtype(head.dtype), float(label_smoothing), chunk, logprobs)
    if not logprobs:
        return _fused_xent(h_ND, head.weight, head.bias, targets_N, weights_N, spec)
    loss, logp_N = _fused_xent(h_ND, head.weight, head.bias, targets_N, weights_N, spec)
    return loss, jax.lax.stop_gradient(logp_N)[:n].reshape(h_BTD.shape[:-1])


class _Spec(NamedTuple):  # the static part of the fused loss (hashable: a nondiff argument)
    transposed: bool
    softcap: float | None
    dtype: Any
    label_smoothing: float
    chunk: int
    logprobs: bool = False  # the fused loss also returns each token's log-probability (no gradient through it)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fused_xent(h_ND, w, b, targets_N, weights_N, spec: _Spec):
    """``sum(weights * smoothed_xent(softcap(h @ w + b), targets))`` over chunks of ``spec.chunk`` rows (``b``: the
    head's bias or None; with ``spec.logprobs`` also each row's log-probability: ``(loss, logp_N)``)."""
    loss, _, _, _, logp_N = _over_chunks(h_ND, w, b, targets_N, weights_N, spec, with_grads=False)
    return (loss, logp_N) if spec.logprobs else loss


def _fused_xent_fwd(h_ND, w, b, targets_N, weights_N, spec):
    loss, d_h_ND, d_w, d_b, logp_N = _over_chunks(h_ND, w, b, targets_N, weights_N, spec, with_grads=True)
    return ((loss, logp_N) if spec.logprobs else loss), (d_h_ND, d_w, d_b)


def _fused_xent_bwd(spec, residuals, g):
    if spec.logprobs:
        g = g[0]  # the logprobs output carries no gradient
    d_h_ND, d_w, d_b = residuals
    d_b = None if d_b is None else (d_b * g).astype(d_b.dtype)
    return (d_h_ND * g).astype(d_h_ND.dtype), (d_w * g).astype(d_w.dtype), d_b, None, None


_fused_xent.defvjp(_fused_xent_fwd, _fused_xent_bwd)


def _over_chunks(h_ND, w, b, targets_N, weights_N, spec, with_grads):
    """(loss, dh, dW, db, logp) of the unit cotangent; dh, dW, db are None without ``with_grads`` (db also without a
    bias ``b``), logp [N] None without ``spec.logprobs``. One chunk: no loop."""
    w_c = w.astype(spec.dtype)  # cast once, outside the loop
    b_f = None if b is None else b.astype(jnp.float32)
    n, d = h_ND.shape
    if n == spec.chunk:
        loss, d_h, d_w, d_b, logp = _chunk(h_ND, targets_N, weights_N, w_c, b_f, spec, with_grads)
        return loss, d_h, None if d_w is None else d_w.astype(w.dtype), _cast_like(d_b, b), logp
    k = n // spec.chunk
    xs = (h_ND.reshape(k, spec.chunk, d), targets_N.reshape(k, spec.chunk), weights_N.reshape(k, spec.chunk))
    flat = (lambda a: None) if not spec.logprobs else (lambda a: a.reshape(n))
    if not with_grads:
        def loss_only(loss_acc, x):
            loss, _, _, _, logp = _chunk(*x, w_c, b_f, spec, False)
            return loss_acc + loss, logp

        loss, logp_KC = jax.lax.scan(loss_only, jnp.zeros((), jnp.float32), xs)
        return loss, None, None, None, flat(logp_KC)

    def with_grad(carry, x):
        loss_acc, d_w_acc, d_b_acc = carry
        loss, d_h, d_w, d_b, logp = _chunk(*x, w_c, b_f, spec, True)
        return (loss_acc + loss, d_w_acc + d_w, None if d_b is None else d_b_acc + d_b), (d_h, logp)

    init = (jnp.zeros((), jnp.float32), jnp.zeros(w.shape, jnp.float32), None if b is None else jnp.zeros_like(b_f))
    (loss, d_w, d_b), (d_h_KCD, logp_KC) = jax.lax.scan(with_grad, init, xs)
    return loss, d_h_KCD.reshape(n, d), d_w.astype(w.dtype), _cast_like(d_b, b), flat(logp_KC)


def _cast_like(grad, param):
    return None if grad is None else grad.astype(param.dtype)


def _chunk(h_CD, targets_C, weights_C, w_c, b_f, spec: _Spec, with_grads: bool):
    """One chunk: its weighted loss sum, ``with_grads`` ``dh`` ([C, D], h's dtype), ``dW`` and ``db`` (fp32; db None
    without a bias ``b_f``), and with ``spec.logprobs`` each row's log-probability (else None)."""
    x_CD, logits_CV, log_z_C1, target_C = _chunk_logits(h_CD, targets_C, w_c, b_f, spec)
    eps = spec.label_smoothing
    loss_C = log_z_C1[:, 0] - target_C
    logp_C = target_C - log_z_C1[:, 0] if spec.logprobs else None
    if eps:  # (1 - eps) * (log_z - z_target) + eps * (log_z - mean_v z_v)
        loss_C = log_z_C1[:, 0] - (1.0 - eps) * target_C - eps * jnp.mean(logits_CV, axis=-1)
    loss = jnp.sum(loss_C * weights_C)
    if not with_grads:
        return loss, None, None, None, logp_C
    d_h_CD, d_w, d_b = _chunk_grads(x_CD, logits_CV, log_z_C1, targets_C, weights_C, w_c, b_f is not None, spec)
    return loss, d_h_CD.astype(h_CD.dtype), d_w, d_b, logp_C


def _chunk_logits(h_CD, targets_C, w_c, b_f, spec: _Spec):
    """``(x, logits [C, V] fp32, log Z [C, 1], the targets' logits [C])`` of one chunk (bias added, soft-capped)."""
    x_CD = h_CD.astype(spec.dtype)
    logits_CV = jnp.dot(x_CD, w_c.T if spec.transposed else w_c, preferred_element_type=jnp.float32)
    if b_f is not None:
        logits_CV = logits_CV + b_f
    if spec.softcap is not None:
        logits_CV = spec.softcap * jnp.tanh(logits_CV / spec.softcap)
    max_C1 = jnp.max(logits_CV, axis=-1, keepdims=True)
    log_z_C1 = max_C1 + jnp.log(jnp.sum(jnp.exp(logits_CV - max_C1), axis=-1, keepdims=True))
    target_C = jnp.take_along_axis(logits_CV, targets_C[:, None], axis=-1)[:, 0]
    return x_CD, logits_CV, log_z_C1, target_C


def _chunk_grads(x_CD, logits_CV, log_z_C1, targets_C, weights_C, w_c, with_bias: bool, spec: _Spec):
    """``dh`` ([C, D], h's dtype), ``dW`` and ``db`` (fp32; None without a bias) of ``sum(weights * smoothed_xent)``
    over one chunk."""
    eps = spec.label_smoothing
    vocab_1V = jax.lax.broadcasted_iota(targets_C.dtype, (1, logits_CV.shape[-1]), 1)
    target_dist_CV = (vocab_1V == targets_C[:, None]).astype(jnp.float32)
    if eps:  # the smoothed target distribution: (1 - eps) * one_hot + eps / V
        target_dist_CV = (1.0 - eps) * target_dist_CV + eps / logits_CV.shape[-1]
    d_logits_CV = (jnp.exp(logits_CV - log_z_C1) - target_dist_CV) * weights_C[:, None]
    if spec.softcap is not None:  # d/dx c*tanh(x/c) = 1 - tanh^2, and logits_CV already is c*tanh
        d_logits_CV = d_logits_CV * (1.0 - jnp.square(logits_CV / spec.softcap))
    g_CV = d_logits_CV.astype(spec.dtype)  # 16-bit x 16-bit -> fp32 products in the backward too
    if spec.transposed:  # w_c is [V, D]
        d_h_CD = jnp.dot(g_CV, w_c, preferred_element_type=jnp.float32)
        d_w = jnp.dot(g_CV.T, x_CD, preferred_element_type=jnp.float32)
    else:  # w_c is [D, V]
        d_h_CD = jnp.dot(g_CV, w_c.T, preferred_element_type=jnp.float32)
        d_w = jnp.dot(x_CD.T, g_CV, preferred_element_type=jnp.float32)
    d_b = jnp.sum(d_logits_CV, axis=0) if with_bias else None
    return d_h_CD, d_w, d_b  # d_h in fp32: the caller casts it to h's dtype


# ----------------------------------------------------------------------------- per-token log-probabilities


def token_logprobs(h_BTD: jax.Array, head: LMHead, targets_BT: jax.Array, *,
                   chunk_size: int | None = None) -> jax.Array:
    """``log p(targets[b, t] | h[b, t])`` under ``softmax(softcap(h @ W))`` at temperature 1, fp32 ``[B, T]``.

    The one definition of a token's log-probability that every part shares: the low-level API's losses
    (``forward_backward``), ``compute_logprobs`` and the sampler's ``return_logprobs`` (whose decode steps
    compute the same quantity over the KV cache). ``targets_BT`` are already aligned (position ``t``'s own
    target, any id in ``[0, V)``; mask unwanted positions afterwards). Computed in chunks like the loss, never
    holding ``[B*T, V]``; differentiable in ``h`` and the head's weight (the backward recomputes each chunk's
    logits once: ``d logp / d logits = onehot - softmax``).
    """
    check_loss_options(0.0, chunk_size)
    b, t, d = h_BTD.shape
    n = b * t
    vocab = head.weight.shape[0 if head.transposed else 1]
    chunk = min(chunk_size or default_chunk_size(vocab), n)
    padded = -(-n // chunk) * chunk
    h_ND, targets_N = h_BTD.reshape(n, d), targets_BT.reshape(n).astype(jnp.int32)
    if padded > n:
        h_ND, targets_N = jnp.pad(h_ND, ((0, padded - n), (0, 0))), jnp.pad(targets_N, (0, padded - n))
    spec = _Spec(head.transposed, head.softcap, jnp.dtype(head.dtype), 0.0, chunk)
    return _logprobs(h_ND, head.weight, head.bias, targets_N, spec)[:n].reshape(b, t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _logprobs(h_ND, w, bias, targets_N, spec: _Spec):
    return _logprobs_fwd(h_ND, w, bias, targets_N, spec)[0]


def _chunks_of(spec: _Spec, *arrays):
    return tuple(a.reshape(a.shape[0] // spec.chunk, spec.chunk, *a.shape[1:]) for a in arrays)


def _logprobs_fwd(h_ND, w, bias, targets_N, spec):
    w_c = w.astype(spec.dtype)
    b_f = None if bias is None else bias.astype(jnp.float32)

    def one(_, x):
        h_CD, targets_C = x
        _, _, log_z_C1, target_C = _chunk_logits(h_CD, targets_C, w_c, b_f, spec)
        return None, target_C - log_z_C1[:, 0]

    _, logp_KC = jax.lax.scan(one, None, _chunks_of(spec, h_ND, targets_N))
    return logp_KC.reshape(-1), (h_ND, w, bias, targets_N)


def _logprobs_bwd(spec, residuals, g_N):
    h_ND, w, bias, targets_N = residuals
    w_c = w.astype(spec.dtype)
    b_f = None if bias is None else bias.astype(jnp.float32)

    def one(acc, x):  # d(sum g * logp) = the weighted cross-entropy's gradient with weights -g
        d_w_acc, d_b_acc = acc
        h_CD, targets_C, g_C = x
        x_CD, logits_CV, log_z_C1, _ = _chunk_logits(h_CD, targets_C, w_c, b_f, spec)
        d_h_CD, d_w, d_b = _chunk_grads(x_CD, logits_CV, log_z_C1, targets_C, -g_C.astype(jnp.float32), w_c,
                                        b_f is not None, spec)
        return (d_w_acc + d_w, None if d_b is None else d_b_acc + d_b), d_h_CD.astype(h_CD.dtype)

    init = (jnp.zeros(w.shape, jnp.float32), None if b_f is None else jnp.zeros_like(b_f))
    (d_w, d_b), d_h_KCD = jax.lax.scan(one, init, _chunks_of(spec, h_ND, targets_N, g_N))
    return d_h_KCD.reshape(h_ND.shape), d_w.astype(w.dtype), _cast_like(d_b, bias), None


_logprobs.defvjp(_logprobs_fwd, _logprobs_bwd)
