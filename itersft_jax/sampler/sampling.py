"""Logits -> next token, shared by both engines: transformers' warpers (temperature, top-k, top-p, min-p) without
a vocabulary sort, and the per-row draws of the continuous engine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from itersft_jax.shared.data import bucket_length
from itersft_jax.shared.outputs import MAX_EOS_IDS, eos_id_list


def _search(pred, lo_B: jax.Array, hi_B: jax.Array) -> jax.Array:
    """Per row, the smallest integer ``x`` in ``(lo, hi]`` where the monotone predicate ``pred(x_B1) -> bool[B]``
    holds, given ``pred(lo)`` false and ``pred(hi)`` true: a bisection, each step one masked reduction over the
    vocabulary (never a sort), until every row's interval is one integer wide (log2 of the widest range)."""
    def body(bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok, done = pred(mid[:, None]), hi - lo <= 1  # a converged row stays put
        return jnp.where(done | ok, lo, mid), jnp.where(~done & ok, mid, hi)

    return jax.lax.while_loop(lambda b: jnp.any(b[1] - b[0] > 1), body, (lo_B, hi_B))[1]


def _ordered(x: jax.Array) -> jax.Array:
    """fp32 -> uint32 keys in the same order (-inf lowest): positive floats get the sign bit set, negative ones
    all their bits flipped."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


CANDIDATES = 64  # the most likely tokens top-k and top-p look at first (one ``lax.top_k``, no full sort)


def _top_k(logits_BV: jax.Array, k) -> jax.Array:
    """transformers' ``TopKLogitsWarper``: drop what is below the k-th largest logit (ties with it kept). For
    ``k <= CANDIDATES`` the k-th largest is read off one ``lax.top_k``; past it, it is the largest key ``x`` with
    ``count(key >= x) >= k``: 32 counting passes over the row."""
    k = jnp.minimum(k, logits_BV.shape[-1])
    n = min(CANDIDATES, logits_BV.shape[-1])

    def from_candidates(logits_BV):
        top_BK = jax.lax.top_k(logits_BV, n)[0]
        return jnp.take_along_axis(top_BK, jnp.broadcast_to(k - 1, (logits_BV.shape[0], 1)), axis=-1)

    def search(logits_BV):
        keys_BV = _ordered(logits_BV)
        # count(key > x) < k holds from x = the k-th largest key up
        lo_B = jnp.min(keys_BV, axis=-1).astype(jnp.uint32) - 1
        hi_B = jnp.max(keys_BV, axis=-1)
        kth_B = _search(lambda x: jnp.sum(keys_BV > x, axis=-1) < k, lo_B, hi_B)
        return jnp.where(keys_BV >= kth_B[:, None], logits_BV, -jnp.inf)

    return jax.lax.cond(k <= n, lambda x: jnp.where(x >= from_candidates(x), x, -jnp.inf), search, logits_BV)


FALLBACK_ROWS = 8  # rows per pass of top-p's fallback search (at most the batch)


def _top_p(logits_BV: jax.Array, top_p) -> jax.Array:
    """transformers' ``TopPLogitsWarper`` (the smallest set of most likely tokens whose mass reaches ``top_p``)
    without its sort: token ``i`` is kept iff the mass of the tokens strictly more likely than it is ``< top_p``.
    That mass only falls as ``p_i`` grows, so the kept set is ``{p_i >= x0}`` for the smallest such ``x0``.

    First from the ``CANDIDATES`` most likely tokens (one ``lax.top_k``): the mass strictly above each candidate
    is a sum over the candidates before it, and when the least likely candidate is not kept (its mass above
    reaches ``top_p``, the usual case for a peaked distribution) every token outside is less or equally likely,
    so dropped too, and ``x0`` is the least likely kept candidate. Only the rows the candidates do not settle (a
    flat row, ``top_p`` near 1) fall back, ``FALLBACK_ROWS`` at a time (gathered into a ``[FALLBACK_ROWS, V]``
    block; as many passes as such rows need, none when every row settled), to a binary search over the fp32 bit
    patterns of ``[0, max p]``: the smallest ``x0`` with ``mass(p > x0) < top_p``, ~30 masked sums over the
    block. So one flat row costs one block's search, not the whole batch's.
    Tie rule: every token tied with the least likely kept one is kept (transformers keeps the ones its sort
    happens to put last and drops the others)."""
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)
    batch, vocab = probs_BV.shape
    n, rows = min(CANDIDATES, vocab), min(FALLBACK_ROWS, batch)
    top_BK = jax.lax.top_k(probs_BV, n)[0]  # descending
    above_BK = jnp.sum(jnp.where(top_BK[:, :, None] > top_BK[:, None, :], top_BK[:, :, None], 0.0), axis=1)
    kept_BK = (above_BK < top_p) | (jnp.arange(n) == 0)  # a prefix, never empty
    x0_B = jnp.min(jnp.where(kept_BK, top_BK, jnp.inf), axis=-1)  # the least likely kept candidate
    # A token with p <= x < (1 - top_p) / V has at most V * x < 1 - top_p of mass at or below it: dropped. So
    # mass(p > x) >= top_p there and the search starts at (1 - top_p) / 2V (fp32 sums are off by far less than
    # the margin); 0 when top_p is too close to 1 for that margin.
    floor = jnp.where(top_p <= 0.999, (1.0 - top_p) / (2.0 * vocab), 0.0).astype(jnp.float32)

    def search_block(bounds):
        """The next ``rows`` unsettled rows (a permutation puts them first) searched together; the rest of the
        block (settled rows, when fewer are left) starts converged."""
        x0_B, todo_B = bounds
        rows_R = jnp.argsort(~todo_B, stable=True)[:rows]  # distinct rows, the unsettled ones first
        active_R = todo_B[rows_R]
        probs_RV = probs_BV[rows_R]
        keys_RV = jax.lax.bitcast_convert_type(probs_RV, jnp.int32)  # probabilities >= 0: the bits are ordered
        hi_R = jnp.max(keys_RV, axis=-1)  # mass(p > max) = 0 < top_p
        lo_R = jnp.minimum(jax.lax.bitcast_convert_type(floor, jnp.int32) - 1, hi_R - 1)
        lo_R = jnp.where(active_R, lo_R, hi_R - 1)
        found_R = _search(lambda x: jnp.sum(jnp.where(keys_RV > x, probs_RV, 0.0), axis=-1) < top_p, lo_R, hi_R)
        found_R = jnp.where(active_R, jax.lax.bitcast_convert_type(found_R, jnp.float32), x0_B[rows_R])
        return x0_B.at[rows_R].set(found_R), todo_B.at[rows_R].set(False)

    x0_B, _ = jax.lax.while_loop(lambda b: jnp.any(b[1]), search_block, (x0_B, kept_BK[:, -1]))
    return jnp.where(probs_BV >= x0_B[:, None], logits_BV, -jnp.inf)


def _min_p(logits_BV: jax.Array, min_p) -> jax.Array:
    """transformers' ``MinPLogitsWarper``: drop tokens less likely than ``min_p`` x the most likely one."""
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)
    top_B1 = jnp.max(probs_BV, axis=-1, keepdims=True)
    return jnp.where(probs_BV < min_p * top_B1, -jnp.inf, logits_BV)


def filter_logits(logits_BV: jax.Array, knobs: dict) -> jax.Array:
    """transformers' warpers in its order: temperature, top-k, top-p, min-p. fp32 in, fp32 out (-inf = removed).

    ``top_k`` 0, ``top_p`` 1 and ``min_p`` 0 switch a filter off (a ``cond`` that skips it); the values are
    traced, so no setting recompiles. No filter sorts the vocabulary: each is a threshold, top-k and top-p
    read off the row's ``CANDIDATES`` most likely tokens (one ``lax.top_k``) when those settle it, else found by
    a binary search of masked reductions over the row (``_top_k``, ``_top_p``).
    """
    logits_BV = logits_BV / knobs["temperature"]
    logits_BV = jax.lax.cond(knobs["top_k"] > 0, _top_k, lambda x, _: x, logits_BV, knobs["top_k"])
    logits_BV = jax.lax.cond(knobs["top_p"] < 1.0, _top_p, lambda x, _: x, logits_BV, knobs["top_p"])
    return jax.lax.cond(knobs.get("min_p", 0.0) > 0.0, _min_p, lambda x, _: x, logits_BV,
                        knobs.get("min_p", jnp.float32(0)))


def sample_rows(logits_BV: jax.Array, keys_B: jax.Array, knobs: dict) -> jax.Array:
    """One token per row, each row drawn with its own key (so a row's draw never depends on its neighbours);
    greedy or sampled chosen at run time. ``logits_BV`` fp32.

    A draw inverts the row's CDF at one uniform number: ``softmax`` (removed tokens get probability 0),
    ``cumsum``, and the first index whose cumulative mass exceeds ``u * total``, which always holds a token of
    positive probability. One random number per row: ``jax.random.categorical`` draws a Gumbel number per
    vocabulary entry, and generating those ``B x V`` threefry numbers was 30% of a CPU decode step
    (SmolLM2-135M shape, 64 rows: 102 ms of 335 ms).
    """
    def greedy(logits_BV):
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    def sample(logits_BV):
        logits_BV = jax.lax.cond(knobs["filter"], filter_logits, lambda x, kn: x / kn["temperature"],
                                 logits_BV, knobs)
        cdf_BV = jnp.cumsum(jax.nn.softmax(logits_BV, axis=-1), axis=-1)
        total_B1 = cdf_BV[:, -1:]
        u_B1 = jax.vmap(lambda k: jax.random.uniform(k, (1,), jnp.float32))(keys_B)
        u_B1 = jnp.minimum(u_B1 * total_B1, total_B1 * (1.0 - 2.0 ** -23))  # strictly below the total
        return jnp.sum(cdf_BV <= u_B1, axis=-1, dtype=jnp.int32)

    return jax.lax.cond(knobs["do_sample"], sample, greedy, logits_BV)


def process_logits(logits_BV: jax.Array, seen_BV: jax.Array, gen_B: jax.Array, knobs: dict) -> jax.Array:
    """transformers' logits processors before the warpers (greedy decoding too): ``repetition_penalty`` (a logit
    of a token the row holds, prompt included, divided by the penalty when positive, multiplied when negative),
    then ``min_new_tokens`` (every EOS id at -inf while the row has fewer new tokens). Each is skipped by a
    ``cond`` when off."""
    def penalize(x):
        pen = knobs["repetition_penalty"]
        return jnp.where(seen_BV, jnp.where(x < 0, x * pen, x / pen), x)

    def block_eos(x):
        eos_V = jnp.any(jnp.arange(x.shape[-1])[:, None] == knobs["eos_ids"][None, :], axis=-1)
        return jnp.where((gen_B < knobs["min_new"])[:, None] & eos_V[None, :], -jnp.inf, x)

    logits_BV = jax.lax.cond(knobs["repetition_penalty"] != 1.0, penalize, lambda x: x, logits_BV)
    return jax.lax.cond(jnp.any(gen_B < knobs["min_new"]), block_eos, lambda x: x, logits_BV)


def make_knobs(*, do_sample: bool, temperature: float, top_k: int, top_p: float, pad_token_id: int,
               eos_token_id, min_p: float = 0.0, min_new_tokens: int = 0, repetition_penalty: float = 1.0) -> dict:
    """Every sampling setting as a run-time value (no setting recompiles); EOS ids padded to ``MAX_EOS_IDS``."""
    eos = eos_id_list(eos_token_id)
    return {"do_sample": np.bool_(do_sample), "filter": np.bool_(top_k > 0 or top_p < 1.0 or min_p > 0),
            "temperature": np.float32(temperature), "top_k": np.int32(top_k), "top_p": np.float32(top_p),
            "min_p": np.float32(min_p), "min_new": np.int32(min_new_tokens),
            "repetition_penalty": np.float32(repetition_penalty), "pad_id": np.int32(pad_token_id),
            "eos_ids": np.asarray(eos + [-1] * (MAX_EOS_IDS - len(eos)), np.int32)}


def batch_bucket(rows: int) -> int:
    """The batch ladder: 1, 2, 3, 4, 6, 8, 12, 16, 24, ..."""
    return 1 if rows <= 1 else bucket_length(rows, minimum=2)
