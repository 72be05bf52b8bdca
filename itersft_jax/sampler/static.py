"""The previous, static-batch engine (kept for comparison: ``benchmarks/sampler_throughput.py``): every row
(prompt x ``num_return_sequences``) prefilled on its own, one batch decoded until its longest row ends.
``generate()`` runs the continuous engine (``sampler/engine.py``).

Shapes are bucketed so an iterative run compiles a handful of times, not once per call. Three ladders:

* batch ``B``: the rows (prompts x ``num_return_sequences``) padded to 1, 2, 3, 4, 6, 8, 12, 16, ...;
* prompt ``P``: prompts left-padded to ``data.bucket_length`` (16, 24, 32, 48, 64, 96, 128, ...);
* cache ``S``: ``bucket_length(P + max_new_tokens)`` slots (the loop stops at the requested count).

Each jitted program sees only the shapes it needs, and every sampling setting (``do_sample``,
``temperature``, ``top_k``, ``top_p``, EOS ids up to ``MAX_EOS_IDS``, ``max_new_tokens``, the seed) is a
run-time value. So the compilations are bounded by the ladders: ``generate_prefill`` once per (B, P),
``generate_decode`` once per (B, S), and ``generate_extend_cache`` — a copy, milliseconds to compile — once
per (B, P, S). A run with a fixed batch compiles the model at most twice per prompt bucket and cache
bucket it meets. Before, prefill and decode both compiled once per (B, P, new-token bucket): 30 varied calls
(1-4 prompts of 4-99 tokens, 1-63 new tokens, 1-3 returns) compiled the model 52 times; now 32 times, plus
21 cache copies (0.1 s each).

Positions come from the attention mask, so left padding does not shift them. The decode loop is a
``lax.while_loop`` that exits early once every row has emitted an end-of-sequence token.

Sampling follows Hugging Face ``generate``: logits in fp32, then temperature, then top-k (ties with the
k-th logit kept), then top-p (the smallest set whose probability reaches ``top_p``, at least one token;
tokens tied at the boundary are all kept).
Each row stops independently at its first EOS; after it the row emits padding, which is not counted.

Randomness: a fixed ``seed`` reproduces samples exactly. Without one, every call draws fresh samples — a
per-trainer (per-model) call counter is folded into ``args.seed`` — so a loop that never passes a seed
does not see the same samples twice (Tunix's sampler did), while a whole run stays reproducible.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from itersft_jax.models.attention.masks import positions_from_mask
from itersft_jax.sampler.sampling import batch_bucket, filter_logits, make_knobs
from itersft_jax.shared.data import bucket_length
from itersft_jax.shared.outputs import check_generation_args, id_rows

# ----------------------------------------------------------------------------------------------------------
# Logits -> next token


def _next_token(logits_BV: jax.Array, key: jax.Array, knobs: dict) -> jax.Array:
    """Greedy or sampled, chosen at run time (``lax.cond``): one compiled program serves every setting."""
    def greedy(logits_BV):
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    def sample(logits_BV):
        logits_BV = jax.lax.cond(knobs["filter"], filter_logits, lambda x, kn: x / kn["temperature"],
                                 logits_BV, knobs)
        return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)

    return jax.lax.cond(knobs["do_sample"], sample, greedy, logits_BV.astype(jnp.float32))


def _record(state: dict, token_B: jax.Array, step, knobs: dict) -> dict:
    """Write this step's tokens; rows already finished emit padding and stop counting."""
    done_B = state["done"]
    token_B = jnp.where(done_B, knobs["pad_id"], token_B)
    tokens_BN = jax.lax.dynamic_update_slice(state["tokens"], token_B[:, None], (0, step))
    is_eos_B = jnp.any(token_B[:, None] == knobs["eos_ids"][None, :], axis=-1)
    return dict(state, tokens=tokens_BN, last=token_B, lengths=state["lengths"] + (~done_B).astype(jnp.int32),
                done=done_B | is_eos_B)


# ----------------------------------------------------------------------------------------------------------
# The two jitted functions


@functools.partial(jax.jit, static_argnames=("graphdef",))
def generate_prefill(params, input_ids_BP, mask_BP, key, knobs, *, graphdef):
    """Run the prompts through the model into a cache of exactly ``P`` slots and choose the first new token.

    Returns ``(cache, token_B)``. Compiled once per (batch bucket, prompt bucket): neither
    ``max_new_tokens`` nor the cache length it needs reaches this program.
    """
    model = nnx.merge(graphdef, params)
    batch, prompt_len = input_ids_BP.shape
    cache = model.init_cache(batch, prompt_len)
    positions_BP = positions_from_mask(mask_BP)
    # The cache is empty: the prompt attends only its own keys, through the model's attention kernel.
    logits_B1V, cache = model(input_ids_BP, positions_BP, mask_BP, cache=cache, last_only=True)
    return cache, _next_token(logits_B1V[:, -1], jax.random.fold_in(key, 0), knobs)


@functools.partial(jax.jit, static_argnames=("graphdef", "batch", "length"))
def generate_extend_cache(params, cache, *, graphdef, batch: int, length: int):
    """The prefilled ``P``-slot cache at the start of an empty ``length``-slot one (a copy: milliseconds to
    compile, once per (batch, prompt, cache) bucket). Layout-agnostic: every leaf of the prefilled cache
    goes to the origin of the matching leaf of ``init_cache(batch, length)``."""
    target = nnx.merge(graphdef, params).init_cache(batch, length)
    leaves = [jax.lax.dynamic_update_slice(big, small.astype(big.dtype), (0,) * big.ndim)
              for big, small in zip(jax.tree.leaves(target), jax.tree.leaves(cache))]
    return jax.tree.unflatten(jax.tree.structure(cache), leaves)  # the prefilled cache's structure: not empty


@functools.partial(jax.jit, static_argnames=("graphdef",))
def generate_decode(params, cache, first_B, mask_BS, prompt_tokens_B, key, knobs, max_new_tokens, *, graphdef):
    """From the first new token, feed the last token and choose the next until ``max_new_tokens`` or every
    row is done. ``mask_BS`` covers the cache: the prompt's slots (0 = left padding), then 1 for every new
    slot (causality hides the slots not written yet). Compiled once per (batch bucket, cache bucket): the
    prompt bucket and ``max_new_tokens`` are run-time values here.

    Returns ``tokens`` ``[B, S]`` (the first ``max_new_tokens`` columns used), per-row ``lengths`` (tokens
    produced, EOS included) and ``done``.
    """
    batch, length = mask_BS.shape
    state = {"cache": cache, "tokens": jnp.full((batch, length), knobs["pad_id"], jnp.int32),
             "last": jnp.zeros((batch,), jnp.int32), "lengths": jnp.zeros((batch,), jnp.int32),
             "done": jnp.zeros((batch,), bool)}
    state = _record(state, first_B, 0, knobs)

    def cond(carry):
        step, _, state = carry
        return (step < max_new_tokens) & ~jnp.all(state["done"])

    def body(carry):
        step, params, state = carry
        positions_B1 = (prompt_tokens_B + step - 1)[:, None]
        # The params ride in the carry and the model is merged inside the body: NNX variables must belong
        # to the trace that uses them (a remat-wrapped layer refuses outer-trace variables).
        model = nnx.merge(graphdef, params)
        logits_B1V, cache = model(state["last"][:, None], positions_B1, mask_BS, cache=state["cache"])
        token_B = _next_token(logits_B1V[:, 0], jax.random.fold_in(key, step), knobs)
        return step + 1, params, _record(dict(state, cache=cache), token_B, step, knobs)

    _, _, state = jax.lax.while_loop(cond, body, (jnp.int32(1), params, state))
    return state["tokens"], state["lengths"], state["done"]


def cache_mask(mask_BP: np.ndarray, num_new: int) -> np.ndarray:
    """Key-slot mask of the cache: the prompt's padding is off, every new slot on (causality hides the
    slots not written yet)."""
    return np.concatenate([np.asarray(mask_BP, np.int32), np.ones((mask_BP.shape[0], num_new), np.int32)], -1)


# ----------------------------------------------------------------------------------------------------------
# Host side


def generate_ids(graphdef, params, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
                 key: jax.Array | None = None, vocab_size: int | None = None
                 ) -> tuple[list[list[int]], list[bool]]:
    """The engine for a bare model: ``graphdef``/``params`` from ``nnx.split(model, nnx.Param)``.

    ``prompt_ids``: one list of token ids per row (no padding; rows are not repeated here).
    ``eos_token_id``: int, list, or ``None`` (never stop early). Returns ``(sequences, finished)`` as in
    ``GenerationOutput``. The compute dtype is the one the module was built with; logits are fp32.
    """
    check_generation_args(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                          top_k=top_k, top_p=top_p)
    rows = id_rows(prompt_ids, vocab_size)

    batch = batch_bucket(len(rows))
    prompt_len = bucket_length(max(len(r) for r in rows))
    cache_len = bucket_length(prompt_len + max_new_tokens)
    input_ids_BP = np.full((batch, prompt_len), pad_token_id, np.int32)
    mask_BP = np.zeros((batch, prompt_len), np.int32)
    for i, row in enumerate(rows):
        input_ids_BP[i, prompt_len - len(row):] = row
        mask_BP[i, prompt_len - len(row):] = 1
    mask_BP[len(rows):, -1] = 1  # filler rows: one real (pad) token, so no row attends to nothing

    knobs = make_knobs(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                       pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    key = jax.random.key(0) if key is None else key

    cache, first_B = generate_prefill(params, input_ids_BP, mask_BP, key, knobs, graphdef=graphdef)
    cache = generate_extend_cache(params, cache, graphdef=graphdef, batch=batch, length=cache_len)
    mask_BS = cache_mask(mask_BP, cache_len - prompt_len)
    tokens_BN, lengths_B, done_B = generate_decode(params, cache, first_B, mask_BS, mask_BP.sum(-1, dtype=np.int32),
                                                   key, knobs, np.int32(max_new_tokens), graphdef=graphdef)
    tokens_BN, lengths_B, done_B = jax.device_get((tokens_BN, lengths_B, done_B))
    sequences = [tokens_BN[i, :lengths_B[i]].tolist() for i in range(len(rows))]
    return sequences, [bool(d) for d in done_B[:len(rows)]]


