"""The continuous engine (itersft_jax/sampler/engine.py): one prefill per prompt, refilled slots, per-row
randomness, compilation ladders, cache length following the live rows, logprobs, and mesh equality.

Greedy == transformers for every family: ``test_families.test_greedy_generate_matches_transformers`` (it runs
this engine). Tolerances: logprobs vs ``core.loss.token_logprobs`` through a full forward of the finished
sequences, fp32: 1e-5 max abs (measured 9.5e-7); bf16 compute: 5e-3 max abs (measured 1.5e-3: the cached
decode and the full forward round bf16 activations at different places).
"""

from __future__ import annotations

import json
import os
import random
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from itersft_jax.core.loss import token_logprobs
from itersft_jax.models import get_family
from itersft_jax.models.layers import head_logits
from itersft_jax.sampler.engine import CHUNK_STEPS, sample_ids
from itersft_jax.sampler.sampling import batch_bucket
from itersft_jax.sampler.static import generate_ids
from itersft_jax.shared.data import bucket_length
from tests.support import module_command, root_on_path
from tests.support.compilations import count_compilations
from tests.support.offline import tiny_config

VOCAB = 320
HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_llama(dtype=jnp.float32, **overrides):
    model = get_family("llama").CausalLM(tiny_config("llama", VOCAB, **overrides), dtype=dtype, rngs=nnx.Rngs(0))
    return nnx.split(model, nnx.Param)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def random_prompts(count: int, seed: int = 0, lengths=(3, 20)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, rng.integers(*lengths)).tolist() for _ in range(count)]


def test_one_prefill_per_prompt_refilled_slots_and_static_engine_tokens(llama):
    """7 prompts x 3 rows in 8 slots: 7 prompts prefilled (not 21 rows), rows inserted as others end, greedy
    tokens identical to the static engine (which prefills every row and decodes one batch to the end)."""
    graphdef, params = llama
    prompts = random_prompts(7)
    res = sample_ids(graphdef, params, prompts, num_return_sequences=3, max_new_tokens=40, eos_token_id=[5, 9],
                     num_slots=8)
    ref, finished = generate_ids(graphdef, params, [p for p in prompts for _ in range(3)], max_new_tokens=40,
                                 eos_token_id=[5, 9])
    assert res.sequences == ref and res.finished == finished
    stats = res.stats
    assert stats["prompts_prefilled"] == 7 and stats["tokens"] == sum(map(len, ref))
    assert max(b for b, *_ in stats["chunk_shapes"]) == 8 and stats["chunks"] > 1
    assert stats["occupancy"] > 0.85 and stats["kv_bytes_peak"] > 0


def test_cache_follows_the_live_rows_not_the_budget(llama):
    """max_new_tokens=200 but every row ends within ~12 tokens: decode attention runs over a cache bucket above
    the longest live row plus one chunk, never the bucket of prompt + max_new_tokens (256)."""
    graphdef, params = llama
    prompts = random_prompts(6, seed=1)
    greedy = sample_ids(graphdef, params, prompts, max_new_tokens=12, eos_token_id=[]).sequences
    eos = sorted({row[11] for row in greedy})[:8]  # each row's 12th greedy token (or earlier) ends it
    res = sample_ids(graphdef, params, prompts, max_new_tokens=200, eos_token_id=eos)
    longest = max(len(p) + len(s) for p, s in zip(prompts, res.sequences))
    assert all(len(s) <= 12 for s in res.sequences)
    assert max(length for _, length, *_ in res.stats["chunk_shapes"]) <= bucket_length(longest + CHUNK_STEPS) < 256


def test_prompt_and_top_logprobs_equal_the_full_forward(llama):
    """``return_prompt_logprobs`` equal ``token_logprobs`` of a full forward of each prompt (fp32, 1e-5; a
    one-token prompt gets ``[]``); ``return_top_logprobs=5`` at each generated position: the 5 largest entries of
    a full forward's ``log_softmax`` of prompt + completion (1e-5), ids whose logprobs they are, rows cut by EOS
    and refilled slots (3 slots, 5 prompts x 2) included; the sampled token's own logprob never above the top."""
    graphdef, params = llama
    prompts = random_prompts(4, seed=4) + [[7]]
    res = sample_ids(graphdef, params, prompts, num_return_sequences=2, max_new_tokens=18, do_sample=True,
                     temperature=1.3, top_p=0.9, eos_token_id=[5, 9], key=jax.random.key(2), num_slots=3,
                     return_prompt_logprobs=True, return_top_logprobs=5)
    model = nnx.merge(graphdef, params)
    for r, seq in enumerate(res.sequences):
        prompt = prompts[r // 2]
        ids = jnp.asarray([prompt + seq])
        h, _ = model.hidden_states(ids, jnp.arange(ids.shape[1])[None], jnp.ones_like(ids))
        want = np.asarray(token_logprobs(h[:, :-1], model.head(), ids[:, 1:]))[0]
        assert len(res.prompt_logprobs[r]) == len(prompt) - 1
        assert np.abs(np.asarray(res.prompt_logprobs[r]) - want[:len(prompt) - 1]).max(initial=0) <= 1e-5
        logits = head_logits(model.head(), h[0, len(prompt) - 1: -1], keep_fp32=True)
        full = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        top, top_ids = np.asarray(res.top_logprobs[r]), np.asarray(res.top_logprob_ids[r])
        assert top.shape == top_ids.shape == (len(seq), 5)
        assert np.abs(top - -np.sort(-full, axis=-1)[:, :5]).max() <= 1e-5
        assert np.abs(np.take_along_axis(full, top_ids, axis=-1) - top).max() <= 1e-5
        assert np.all(np.asarray(res.logprobs[r]) <= top[:, 0] + 1e-6)
    assert res.prompt_logprobs[0] == res.prompt_logprobs[1] and res.prompt_logprobs[-1] == []
    plain = sample_ids(graphdef, params, prompts, num_return_sequences=2, max_new_tokens=18, do_sample=True,
                       temperature=1.3, top_p=0.9, eos_token_id=[5, 9], key=jax.random.key(2), num_slots=3)
    assert plain.sequences == res.sequences and plain.prompt_logprobs is None and plain.top_logprobs is None


def test_a_prompt_held_once_gives_the_per_slot_tokens(llama):
    """``share_prompts``: each prompt's KV held once in a pool of groups, the slots holding only generated tokens,
    decode attention merging both: the per-slot layout's tokens exactly and logprobs within 1e-5 (fp32),
    sampled with top-p, through 6 slots (groups freed and reused as prompts drain; a duplicated prompt shares
    its group); the prompt KV held shrinks. Refused under a sliding window when asked for explicitly."""
    graphdef, params = llama
    prompts = random_prompts(3, seed=5, lengths=(30, 60))
    prompts.append(prompts[0])
    kw = dict(num_return_sequences=4, max_new_tokens=20, do_sample=True, temperature=1.1, top_p=0.9,
              eos_token_id=[5, 9], key=jax.random.key(3), num_slots=6)
    per_slot = sample_ids(graphdef, params, prompts, share_prompts=False, **kw)
    shared = sample_ids(graphdef, params, prompts, share_prompts=True, **kw)
    assert shared.stats["shared_prompts"] and not per_slot.stats["shared_prompts"]
    assert not sample_ids(graphdef, params, prompts, num_return_sequences=4, max_new_tokens=1,
                          eos_token_id=[]).stats["shared_prompts"]  # default: prompts under SHARE_MIN_PROMPT
    assert shared.sequences == per_slot.sequences and shared.finish_reasons == per_slot.finish_reasons
    assert max(np.abs(np.subtract(a, b)).max() for a, b in zip(shared.logprobs, per_slot.logprobs)) <= 1e-5
    assert shared.stats["prompt_kv_bytes_peak"] * 2 <= per_slot.stats["prompt_kv_bytes_peak"]
    windowed = nnx.split(get_family("mistral").CausalLM(tiny_config("mistral", VOCAB, sliding_window=8),
                                                        rngs=nnx.Rngs(0)), nnx.Param)
    with pytest.raises(ValueError, match="`share_prompts`"):
        sample_ids(*windowed, prompts[:1], share_prompts=True, **kw)
    assert not sample_ids(*windowed, prompts[:1], **kw).stats["shared_prompts"]


def test_sampled_rows_do_not_depend_on_neighbours_slots_or_order(llama):
    """Seeded sampling: a prompt's rows are the same run together, alone, shuffled, with a duplicate beside
    it, or through 1 / 4 / 16 slots; the duplicate prompt's rows draw apart from the original's."""
    graphdef, params = llama
    prompts = random_prompts(5, seed=2)
    kw = dict(num_return_sequences=3, max_new_tokens=24, do_sample=True, temperature=1.3, top_k=40, top_p=0.95,
              eos_token_id=[5, 9], key=jax.random.key(7))
    together = sample_ids(graphdef, params, prompts, num_slots=4, **kw).sequences
    by_prompt = [together[3 * i: 3 * i + 3] for i in range(5)]
    assert len({tuple(r) for r in together}) > 10  # really sampled
    for i in (0, 3):
        assert sample_ids(graphdef, params, [prompts[i]], num_slots=1, **kw).sequences == by_prompt[i]
    order = [4, 2, 0, 3, 1]
    shuffled = sample_ids(graphdef, params, [prompts[i] for i in order], num_slots=16, **kw).sequences
    assert [shuffled[3 * j: 3 * j + 3] for j in range(5)] == [by_prompt[i] for i in order]
    dup = sample_ids(graphdef, params, [prompts[1], prompts[1]], num_slots=4, **kw).sequences
    assert dup[:3] == by_prompt[1] and dup[3:] != dup[:3]


def test_compilations_stay_within_the_ladders(llama):
    """30 varied calls (1-3 prompts of 4-99 tokens, 1-63 new tokens, 1-3 returns, 1-16 slots, every sampling
    setting): the model compiles once per (prompts, prompt bucket) prefill shape and once per (slots, cache
    bucket) chunk shape the engine ran at; those shapes lie on the ladders; only the engine's programs
    compile."""
    graphdef, params = llama
    rng = random.Random(0)
    sample_ids(graphdef, params, [[5, 6]], max_new_tokens=1)  # first call: eager helper ops
    prefill_shapes, chunk_shapes, limits = set(), set(), []
    with count_compilations(None) as total, count_compilations("sampler_prefill") as prefill, \
            count_compilations("sampler_chunk") as chunk, count_compilations("sampler_") as ours:
        for call in range(30):
            prompts = [[rng.randint(3, 300) for _ in range(rng.randint(4, 99))] for _ in range(rng.randint(1, 3))]
            returns, new, slots = rng.randint(1, 3), rng.randint(1, 63), rng.choice([1, 4, 16])
            res = sample_ids(graphdef, params, prompts, num_return_sequences=returns, max_new_tokens=new,
                             num_slots=slots, key=jax.random.key(call), do_sample=call % 2 == 1,
                             temperature=0.5 + call / 4, top_k=call % 4, top_p=[1.0, 0.9][call % 2],
                             min_p=[0.0, 0.0, 0.1][call % 3], eos_token_id=list(range(2, 2 + call % 4)))
            prefill_shapes |= res.stats["prefill_shapes"]
            chunk_shapes |= res.stats["chunk_shapes"]
            limits.append((batch_bucket(min(slots, len(prompts) * returns)), max(map(len, prompts)), new))
    assert prefill.count <= len(prefill_shapes) and chunk.count <= len(chunk_shapes)
    assert total.count == ours.count  # nothing else compiles
    ladder = {bucket_length(n) for n in range(1, 400)}
    assert {p for _, p in prefill_shapes} <= ladder and {s for _, s, *_ in chunk_shapes} <= ladder
    assert {b for b, *_ in chunk_shapes} | {b for b, _ in prefill_shapes} <= {batch_bucket(n) for n in range(1, 17)}
    # a shared-prompt pool (prompts of 128 tokens or more; none here): groups and prompt slots on the ladders
    assert {g for _, _, g, _ in chunk_shapes} <= {0} | {batch_bucket(n) for n in range(1, 17)}
    assert {p for *_, p in chunk_shapes} <= {0} | ladder
    assert max(s for _, s, *_ in chunk_shapes) <= max(bucket_length(bucket_length(p) + n + CHUNK_STEPS)
                                                  for _, p, n in limits)
    assert chunk.count + prefill.count < 60  # the static engine compiled 2 model programs per call here


def full_forward_logprobs(graphdef, params, prompts, n, sequences, temperature: float = 1.0):
    """``token_logprobs`` of each row's generated tokens through one full forward of prompt + completion (of
    ``h / temperature``: the logits at that temperature for a head without soft-cap)."""
    model = nnx.merge(graphdef, params)
    rows = [prompts[r // n] + sequences[r] for r in range(len(sequences))]
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    h, _ = model.hidden_states(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask))
    lp = np.asarray(token_logprobs(h[:, :-1] / temperature, model.head(), jnp.asarray(ids[:, 1:])))
    return [lp[r, len(prompts[r // n]) - 1: len(rows[r]) - 1] for r in range(len(rows))]


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-3)])
def test_logprobs_equal_token_logprobs_of_the_full_forward(dtype, tol):
    """Sampled at temperature 1.7 with top-k and top-p, the returned logprobs are still the model's at
    temperature 1: ``token_logprobs`` of the finished sequences (fp32 within 1e-5, bf16 within 5e-3), and not
    the warped distribution's (those differ by far more)."""
    graphdef, params = tiny_llama(dtype)
    prompts = random_prompts(4, seed=3)
    res = sample_ids(graphdef, params, prompts, num_return_sequences=2, max_new_tokens=20, do_sample=True,
                     temperature=1.7, top_k=50, top_p=0.9, eos_token_id=[5], key=jax.random.key(1), num_slots=3)
    expected = full_forward_logprobs(graphdef, params, prompts, 2, res.sequences)
    diff = max(np.abs(np.asarray(got) - want).max() for got, want in zip(res.logprobs, expected))
    assert all(len(lp) == len(s) for lp, s in zip(res.logprobs, res.sequences))
    assert diff <= tol, diff
    if dtype == jnp.float32:
        assert np.exp(np.concatenate(expected) - np.concatenate(res.logprobs)) == pytest.approx(1, abs=1e-5)
        # log softmax(logits / 1.7): the temperature-warped distribution (no soft-cap here, so h / T does it)
        warped = full_forward_logprobs(graphdef, params, prompts, 2, res.sequences, temperature=1.7)
        assert np.abs(np.concatenate(warped) - np.concatenate(res.logprobs)).max() > 0.1


def test_under_a_mesh_slots_split_and_tokens_equal_one_device(tiny_model_dir, tmp_path):
    """8 fake devices (subprocess): ``data:2,fsdp:4`` and ``fsdp:4,tensor:2`` trainers generate the same greedy
    and seeded-sampled tokens (and logprobs within 1e-5) as one device, with the KV cache's slots split
    over data x fsdp (8 slots: 1 per device on data:2,fsdp:4, 2 on fsdp:4,tensor:2)."""
    model_dir = tiny_model_dir("llama")
    env = root_on_path(dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    proc = subprocess.run(module_command("sampler_mesh_worker", model_dir, str(tmp_path)), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    from tests.support import sampler_mesh_worker

    assert len(jax.devices()) == 1
    one = sampler_mesh_worker.run(model_dir, str(tmp_path / "one"), None)
    for mesh in ("data:2,fsdp:4", "fsdp:4,tensor:2"):
        got = results[mesh]
        assert got["greedy"] == one["greedy"] and got["sampled"] == one["sampled"]
        assert np.abs(np.concatenate(got["logprobs"]) - np.concatenate(one["logprobs"])).max() < 1e-5
        assert got["slots_per_device"] * got["data_parallel"] == got["slots"] == 8
    assert one["slots_per_device"] == one["slots"]


def test_row_draws_follow_the_filtered_distribution():
    """``sample_rows`` (one uniform per row, inverted CDF) draws from ``softmax(filtered logits / T)``: 40,000
    draws of one row pass a chi-square test against the filtered softmax at level 1e-3 (Wilson-Hilferty
    quantile), and never give a token top-k/top-p/min-p removed."""
    from itersft_jax.sampler.sampling import filter_logits, make_knobs, sample_rows

    logits = jnp.asarray(np.random.default_rng(0).normal(0, 2, (1, 50)), jnp.float32)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(40_000))
    draw = jax.jit(lambda x, k, kn: sample_rows(x, k, kn))
    for top_k, top_p, min_p in ((0, 1.0, 0.0), (10, 0.8, 0.0), (0, 0.9, 0.05)):
        knobs = make_knobs(do_sample=True, temperature=1.5, top_k=top_k, top_p=top_p, min_p=min_p, pad_token_id=0,
                           eos_token_id=None)
        draws = np.asarray(draw(jnp.broadcast_to(logits, (40_000, 50)), keys, knobs))
        expected = np.asarray(jax.nn.softmax(filter_logits(logits, knobs))[0], np.float64)
        counts = np.bincount(draws, minlength=50)
        kept = expected > 0
        assert counts[~kept].sum() == 0 and kept.sum() < 50 or top_p == 1.0
        chi2 = (((counts - 40_000 * expected)[kept] ** 2) / (40_000 * expected[kept])).sum()
        dof = kept.sum() - 1
        critical = dof * (1 - 2 / (9 * dof) + 3.09 * np.sqrt(2 / (9 * dof))) ** 3  # P(chi2 > critical) = 1e-3
        assert chi2 < critical, (top_k, top_p, min_p, chi2, critical)
