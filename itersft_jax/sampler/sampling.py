"""Logits -> next token, shared by both engines: Hugging Face's warpers (temperature, top-k, top-p) and the
per-row draws of the continuous engine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from itersft_jax.shared.data import bucket_length
from itersft_jax.shared.outputs import MAX_EOS_IDS, eos_id_list


def filter_logits(logits_BV: jax.Array, knobs: dict) -> jax.Array:
    """HF's warpers in HF's order: temperature, top-k, top-p. fp32 in, fp32 out (-inf = removed).

    ``top_k`` 0 and ``top_p`` 1 switch a filter off; the values are traced, so no setting recompiles.
    """
    logits_BV = logits_BV / knobs["temperature"]
    neg_inf = jnp.float32(-jnp.inf)
    vocab = logits_BV.shape[-1]
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)  # descending
    k = jnp.where(knobs["top_k"] > 0, jnp.minimum(knobs["top_k"], vocab), vocab)
    kth_B1 = jax.lax.dynamic_slice_in_dim(sorted_BV, k - 1, 1, axis=-1)
    logits_BV = jnp.where(logits_BV < kth_B1, neg_inf, logits_BV)  # ties with the k-th are kept, as in HF
    # Values >= the k-th form a prefix of the descending sort, so the sort stays valid after top-k.
    sorted_BV = jnp.where(sorted_BV < kth_B1, neg_inf, sorted_BV)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the strictly more likely tokens
    keep_BV = (before_BV < knobs["top_p"]) | (knobs["top_p"] >= 1.0)
    keep_BV = keep_BV.at[:, 0].set(True)
    last_B1 = jnp.sum(keep_BV, axis=-1, keepdims=True) - 1
    threshold_B1 = jnp.take_along_axis(sorted_BV, last_B1, -1)
    return jnp.where(logits_BV < threshold_B1, neg_inf, logits_BV)


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


def make_knobs(*, do_sample: bool, temperature: float, top_k: int, top_p: float, pad_token_id: int,
               eos_token_id) -> dict:
    """Every sampling setting as a run-time value (no setting recompiles); EOS ids padded to ``MAX_EOS_IDS``."""
    eos = eos_id_list(eos_token_id)
    return {"do_sample": np.bool_(do_sample), "filter": np.bool_(top_k > 0 or top_p < 1.0),
            "temperature": np.float32(temperature), "top_k": np.int32(top_k), "top_p": np.float32(top_p),
            "pad_id": np.int32(pad_token_id),
            "eos_ids": np.asarray(eos + [-1] * (MAX_EOS_IDS - len(eos)), np.int32)}


def batch_bucket(rows: int) -> int:
    """The batch ladder: 1, 2, 3, 4, 6, 8, 12, 16, 24, ..."""
    return 1 if rows <= 1 else bucket_length(rows, minimum=2)
