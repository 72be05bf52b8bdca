"""loss.py: the chunked LM head + cross-entropy against an unchunked reference, torch, and its memory.

Tolerances: fp32, chunked vs the unchunked autodiff reference: loss and gradients (w.r.t. h and W) within
1e-5 relative (max abs difference / max abs of the reference); label smoothing vs a float64 hand-written
formula and torch's ``F.cross_entropy(label_smoothing=)``: 1e-5 relative; bf16 compute vs the fp32 reference
on the same bf16-rounded inputs: 1e-2 relative (bf16 keeps ~3 significant digits).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from itersft_jax.core.loss import causal_lm_loss, default_chunk_size
from itersft_jax.models.layers import LMHead

B, T, D, V = 3, 7, 12, 50  # N = 21 tokens: chunks of 8 leave a ragged last chunk of 5


def inputs(seed=0, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    h = jax.random.normal(k1, (B, T, D), jnp.float32).astype(dtype)
    w = jax.random.normal(k2, (D, V), jnp.float32)
    labels = jax.random.randint(k3, (B, T), 0, V).at[0, 2:4].set(-100).at[2, 1].set(-100)
    return h, w, labels


def reference(h, w, transposed, softcap, labels, eps=0.0):
    """Unchunked fp32 head + smoothed cross-entropy, differentiated by autodiff."""
    logits = jnp.dot(h.reshape(-1, D).astype(jnp.float32), w.T if transposed else w,
                     precision=jax.lax.Precision.HIGHEST)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    logp = jax.nn.log_softmax(logits, axis=-1)
    targets = jnp.concatenate([labels[:, 1:], jnp.full((B, 1), -100)], axis=1).reshape(-1)
    weights = (targets != -100).astype(jnp.float32)
    nll = -jnp.take_along_axis(logp, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
    per_token = (1 - eps) * nll - eps * jnp.mean(logp, axis=-1)
    return jnp.sum(per_token * weights), jnp.sum(weights)


def rel(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))


def chunked(h, w, labels, transposed, softcap, eps, chunk):
    return causal_lm_loss(h, LMHead(w, transposed, softcap, jnp.float32), labels, label_smoothing=eps,
                          chunk_size=chunk)


@pytest.mark.parametrize(("transposed", "softcap"), [(False, None), (True, 3.0)])  # both layouts, both caps
def test_chunked_equals_unchunked_reference(transposed, softcap):
    h, w, labels = inputs()
    w = w.T if transposed else w
    for eps in (0.0, 0.1):
        ref_fn = functools.partial(reference, transposed=transposed, softcap=softcap, labels=labels, eps=eps)
        (ref_loss, ref_count), ref_grads = jax.jit(jax.value_and_grad(ref_fn, argnums=(0, 1), has_aux=True))(h, w)
        for chunk in (8, None):  # 3 chunks (ragged last one), and one chunk
            loss_fn = functools.partial(chunked, labels=labels, transposed=transposed, softcap=softcap, eps=eps,
                                        chunk=chunk)
            (loss, count), grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(h, w)
            eval_loss, _ = jax.jit(loss_fn)(h, w)  # the primal (no gradient) path: evaluation
            key = (eps, chunk)
            assert float(count) == float(ref_count) == 15, key
            assert rel(loss, ref_loss) <= 1e-5 and rel(eval_loss, ref_loss) <= 1e-5, key
            assert rel(grads[0], ref_grads[0]) <= 1e-5 and rel(grads[1], ref_grads[1]) <= 1e-5, key


def test_bf16_compute_is_close_to_fp32_on_the_same_inputs():
    h, w, labels = inputs(seed=1, dtype=jnp.bfloat16)
    (ref_loss, _), (ref_dh, ref_dw) = jax.value_and_grad(reference, argnums=(0, 1), has_aux=True)(
        h.astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32), False, None, labels)

    def loss_fn(h, w):
        return causal_lm_loss(h, LMHead(w, False, None, jnp.bfloat16), labels, chunk_size=8)

    (loss, _), (dh, dw) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(h, w)
    assert loss.dtype == jnp.float32 and dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    assert rel(loss, ref_loss) <= 1e-2 and rel(dh, ref_dh) <= 1e-2 and rel(dw, ref_dw) <= 1e-2


def test_label_smoothing_equals_formula_and_torch():
    eps = 0.1
    h, w, labels = inputs(seed=2)
    loss, count = causal_lm_loss(h, LMHead(w, False, None, jnp.float32), labels, label_smoothing=eps, chunk_size=8)

    logits = np.asarray(h, np.float64).reshape(B, T, D) @ np.asarray(w, np.float64)
    targets = np.asarray(labels)[:, 1:]
    logp = logits[:, :-1] - np.log(np.exp(logits[:, :-1]).sum(-1, keepdims=True))
    mask = targets != -100
    nll = -np.take_along_axis(logp, np.maximum(targets, 0)[..., None], -1)[..., 0]
    by_hand = ((1 - eps) * nll - eps * logp.mean(-1))[mask].sum()
    by_torch = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits[:, :-1].reshape(-1, V)), torch.from_numpy(targets.reshape(-1)).long(),
        ignore_index=-100, reduction="sum", label_smoothing=eps).item()
    assert float(count) == mask.sum()
    assert float(loss) == pytest.approx(by_hand, rel=1e-5)
    assert float(loss) == pytest.approx(by_torch, rel=1e-5)


def test_chunked_gradient_never_holds_n_by_v_fp32():
    """XLA's temporary buffers of loss + gradient: chunked, far below one [N, V] fp32 buffer; one chunk
    of N rows (the unchunked computation) needs at least one (so this test can fail)."""
    n_rows, dim, vocab = 2048, 16, 2048
    h = jnp.zeros((1, n_rows, dim), jnp.float32)
    w = jnp.zeros((dim, vocab), jnp.float32)
    labels = jnp.zeros((1, n_rows), jnp.int32)
    full = n_rows * vocab * 4

    def temp_bytes(chunk):
        def loss_fn(h, w):
            return causal_lm_loss(h, LMHead(w, False, None, jnp.float32), labels, chunk_size=chunk)[0]

        compiled = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1))).lower(h, w).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(128) < full / 4
    assert temp_bytes(n_rows) >= full


def test_default_chunk_size_and_bad_options():
    assert default_chunk_size(128256) == 256 and default_chunk_size(8192) == 4096
    assert default_chunk_size(10**7) == 128  # never below one tile
    h, w, labels = inputs()
    head = LMHead(w, False, None, jnp.float32)
    with pytest.raises(ValueError, match="label_smoothing"):
        causal_lm_loss(h, head, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="chunk_size"):
        causal_lm_loss(h, head, labels, chunk_size=0)


@pytest.mark.parametrize("transposed, softcap, chunk", [(False, None, 8), (True, 3.0, 5), (False, None, None)])
def test_token_logprobs_and_their_gradients_equal_a_float64_reference(transposed, softcap, chunk):
    """``token_logprobs`` (the one logprob definition of the low-level API, compute_logprobs and the sampler):
    values and the gradient of an arbitrary per-token function of them (``sum(g * logp)``, g of both signs) equal
    float64 torch autodiff through the unchunked head within 1e-5 relative (fp32)."""
    from itersft_jax.core.loss import token_logprobs

    h, w, labels = inputs(seed=3)
    w = w.T if transposed else w
    targets = jnp.where(labels < 0, 0, labels)
    g = jax.random.normal(jax.random.key(9), (B, T))

    def ours(h, w):
        logp = token_logprobs(h, LMHead(w, transposed, softcap, jnp.float32), targets, chunk_size=chunk)
        return jnp.sum(g * logp), logp

    (_, logp), (d_h, d_w) = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(h, w)
    th = torch.tensor(np.asarray(h), dtype=torch.float64, requires_grad=True)
    tw = torch.tensor(np.asarray(w), dtype=torch.float64, requires_grad=True)
    logits = th.reshape(-1, D) @ (tw.T if transposed else tw)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(np.asarray(targets)).reshape(-1, 1).long())[:, 0]
    (torch.tensor(np.asarray(g), dtype=torch.float64).reshape(-1) * ref).sum().backward()

    def rel(a, b):
        b = np.asarray(b)
        return np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max()

    assert logp.shape == (B, T) and logp.dtype == jnp.float32
    assert rel(logp.reshape(-1), ref.detach().numpy()) < 1e-5
    assert rel(d_h, th.grad.numpy()) < 1e-5 and rel(d_w, tw.grad.numpy()) < 1e-5


@pytest.mark.parametrize("softcap, chunk", [(None, 8), (3.0, None)])
def test_head_bias_in_the_loss_logprobs_and_logits_equals_a_float64_reference(softcap, chunk):
    """An output head with a bias (GPT-J's ``lm_head``): the fused loss (its evaluation path too), ``token_logprobs``
    and ``head_logits`` equal float64 torch autodiff through ``h @ W + b`` within 1e-5 relative, gradients w.r.t.
    ``h``, ``W`` and ``b`` included (chunks of 8 with a ragged last one, and one chunk)."""
    from itersft_jax.core.loss import token_logprobs
    from itersft_jax.models.layers import head_logits

    h, w, labels = inputs(seed=4)
    b = jax.random.normal(jax.random.key(5), (V,))
    targets = jnp.where(labels < 0, 0, labels)
    g = jax.random.normal(jax.random.key(6), (B, T))

    def ours(h, w, b):
        head = LMHead(w, False, softcap, jnp.float32, b)
        loss, _ = causal_lm_loss(h, head, labels, label_smoothing=0.1, chunk_size=chunk)
        return loss + jnp.sum(g * token_logprobs(h, head, targets, chunk_size=chunk)), loss

    (_, loss), grads = jax.value_and_grad(ours, argnums=(0, 1, 2), has_aux=True)(h, w, b)
    eval_loss = jax.jit(lambda h, w, b: ours(h, w, b)[1])(h, w, b)

    th, tw, tb = (torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True) for x in (h, w, b))
    logits = th.reshape(-1, D) @ tw + tb
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    shifted = torch.tensor(np.concatenate([np.asarray(labels)[:, 1:], np.full((B, 1), -100)], 1)).reshape(-1)
    ref_loss = torch.nn.functional.cross_entropy(logits, shifted.long(), ignore_index=-100, reduction="sum",
                                                 label_smoothing=0.1)
    logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(np.asarray(targets)).reshape(-1, 1).long())[:, 0]
    (ref_loss + (torch.tensor(np.asarray(g), dtype=torch.float64).reshape(-1) * logp).sum()).backward()

    def rel64(a, ref):
        ref = np.asarray(ref)
        return np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max()

    assert rel64(loss, ref_loss.item()) < 1e-5 and rel64(eval_loss, ref_loss.item()) < 1e-5
    for got, ref in zip(grads, (th, tw, tb)):
        assert got.shape == ref.shape and rel64(got, ref.grad.numpy()) < 1e-5
    assert rel64(head_logits(LMHead(w, False, softcap, jnp.float32, b), h).reshape(-1, V), logits.detach()) < 1e-5
