"""itersft_jax.sampler.generate: cache == full forward, sampling semantics, EOS, seeds, compile counts, and generation
reading the live (just updated) parameters (greedy == transformers for every family: ``test_families``).

Tolerance: cached decoding vs a full forward pass, fp32 on CPU: <= 1e-4 max abs on the logits (they are
O(1); what differs is summation order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from itersft_jax import IterativeSFTConfig
from itersft_jax.sampler.engine import sampler_chunk, sampler_prefill
from itersft_jax.sampler.generate import GenerationOutput, generate
from itersft_jax.sampler.sampling import filter_logits
from itersft_jax.sampler.static import cache_mask, generate_ids
from itersft_jax.trainer import IterativeSFTTrainer
from tests.support.compilations import count_compilations

PROMPTS = ["The quick brown fox", "hello", "12 + 30 = 42. 7 * 6 ="]
NEW = 12  # max_new_tokens of most tests: one new-token bucket (16) and one prompt bucket (16) -> one compile


def make_trainer(model_dir, tmp_path, tokenizer, **kwargs):
    args = IterativeSFTConfig(output_dir=str(tmp_path), report_to="none", activation_checkpointing=False,
                              per_device_train_batch_size=2, **kwargs)
    return IterativeSFTTrainer(model_dir, args=args, processing_class=tokenizer)


@pytest.fixture(scope="module")
def llama(tiny_model_dir, tmp_path_factory, tokenizer):
    path = tiny_model_dir("llama")
    return path, make_trainer(path, tmp_path_factory.mktemp("gen"), tokenizer)


def test_cached_decoding_logits_equal_full_forward(llama):
    _, trainer = llama
    model = trainer.model
    prompt_len, new = 16, 6
    rows = [[1, 5, 9, 200], [1, 7, 8, 9, 10, 11, 12, 13, 14], [1, 40]]
    ids = np.zeros((3, prompt_len), np.int32)
    mask = np.zeros((3, prompt_len), np.int32)
    for i, r in enumerate(rows):
        ids[i, -len(r):], mask[i, -len(r):] = r, 1
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    cache = model.init_cache(3, prompt_len + new)
    logits, cache = model(jnp.asarray(ids), jnp.asarray(positions), cache_mask(mask, new), cache=cache)
    cached = [logits[:, -1]]
    tokens = []
    for step in range(new - 1):
        token = jnp.argmax(cached[-1], -1).astype(jnp.int32)
        tokens.append(token)
        logits, cache = model(token[:, None], jnp.asarray(mask.sum(-1) + step)[:, None],
                              cache_mask(mask, new), cache=cache)
        cached.append(logits[:, 0])
    full_ids = np.concatenate([ids, np.stack(tokens, 1)], 1)
    full_mask = np.concatenate([mask, np.ones((3, new - 1), np.int32)], 1)
    full_positions = np.maximum(np.cumsum(full_mask, -1) - 1, 0)
    full, _ = model(jnp.asarray(full_ids), jnp.asarray(full_positions), jnp.asarray(full_mask))
    expected = np.asarray(full[:, prompt_len - 1:])
    got = np.stack([np.asarray(c) for c in cached], 1)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # and generate() itself follows the same greedy path
    out = trainer.generate(input_ids=rows, max_new_tokens=new - 1, eos_token_id=[])
    assert out.sequences == np.stack(tokens, 1).tolist()


def test_seeds(llama):
    _, trainer = llama
    kw = {"max_new_tokens": NEW, "do_sample": True, "eos_token_id": []}
    a, b = trainer.generate(PROMPTS, seed=3, **kw), trainer.generate(PROMPTS, seed=3, **kw)
    assert a.sequences == b.sequences
    assert trainer.generate(PROMPTS, seed=4, **kw).sequences != a.sequences
    # No seed: every call draws fresh samples (Tunix repeated them), none equals a seeded call by accident.
    c, d = trainer.generate(PROMPTS, **kw), trainer.generate(PROMPTS, **kw)
    assert c.sequences != d.sequences and c.sequences != a.sequences


def test_top_k_1_and_tiny_top_p_equal_greedy(llama):
    _, trainer = llama
    greedy = trainer.generate(PROMPTS, max_new_tokens=NEW, eos_token_id=[]).sequences
    for kw in ({"top_k": 1}, {"top_p": 1e-6}, {"top_k": 1, "temperature": 5.0}):
        assert trainer.generate(PROMPTS, max_new_tokens=NEW, eos_token_id=[], do_sample=True, seed=0,
                        **kw).sequences == greedy


def transformers_kept(logits, temperature, top_k, top_p, min_p):
    """The kept set of transformers' warpers in its order (temperature, top-k, top-p, min-p), with our tie rule
    at the top-p threshold: transformers keeps those of the tied tokens its sort puts last; we keep them all."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = TemperatureLogitsWarper(temperature)(None, torch.from_numpy(logits.copy()))
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        cut = TopPLogitsWarper(top_p)(None, scores.clone())
        least = torch.where(torch.isfinite(cut), scores, torch.inf).amin(-1, keepdim=True)
        scores = torch.where(scores >= least, scores, -torch.inf)  # + the tokens tied with the least kept one
    if min_p:
        scores = MinPLogitsWarper(min_p)(None, scores)
    return scores.numpy()


def test_filter_logits_equals_transformers_warpers_without_a_sort():
    """The threshold searches keep exactly transformers' set (top-k ties kept as it does; the top-p tie rule
    above), and the kept logits are its values: random, peaked, flat and tied rows, top_p 1 and 1e-6, top_k
    past the vocabulary, min_p after temperature and top-p."""
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=50) * 3, rng.normal(size=50) * 0.05, np.r_[40.0, rng.normal(size=49)],
            np.zeros(50), np.r_[[2.0] * 6, [1.0] * 20, rng.normal(size=24) - 3],
            np.log(np.r_[[0.3] * 2, [0.1] * 4, [0.0] * 44] + 1e-9), rng.normal(size=50) * 30]
    logits = np.stack(rows).astype(np.float32)
    # row 5 at top_p 0.65: 0.6 of mass above its four tied 0.1s, transformers keeps one of them, we keep all
    settings = [(1.0, 5, 1.0, 0.0), (0.7, 0, 0.8, 0.0), (1.3, 10, 0.5, 0.0), (1.0, 3, 1.0, 0.0),
                (0.5, 0, 0.95, 0.0), (1.0, 0, 1e-6, 0.0), (1.0, 0, 0.65, 0.0), (1.0, 1000, 0.9, 0.0),
                (0.8, 0, 1.0, 0.1), (1.5, 20, 0.9, 0.05), (1.0, 0, 0.999, 0.0), (2.0, 0, 0.3, 0.5)]
    fn = jax.jit(filter_logits)
    for temperature, top_k, top_p, min_p in settings:
        knobs = {"temperature": np.float32(temperature), "top_k": np.int32(top_k), "top_p": np.float32(top_p),
                 "min_p": np.float32(min_p)}
        got = np.asarray(fn(jnp.asarray(logits), knobs))
        expected = transformers_kept(logits, temperature, top_k, top_p, min_p)
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(expected),
                                      err_msg=f"T={temperature} k={top_k} p={top_p} min_p={min_p}")
        np.testing.assert_allclose(got[np.isfinite(got)], expected[np.isfinite(got)], rtol=1e-6)
    # ties at the top-p threshold: all kept (two 0.3s: p=0.3 keeps both, transformers one of them)
    tied = np.asarray(fn(jnp.asarray(logits[5:6]), {"temperature": np.float32(1), "top_k": np.int32(0),
                                                      "top_p": np.float32(0.3), "min_p": np.float32(0)}))
    assert np.isfinite(tied).sum() == 2



def test_filter_logits_candidates_and_their_fallback():
    """Top-k and top-p first look at the 64 most likely tokens and fall back to the threshold search when those
    do not settle a row; both paths, in one batch, keep transformers' set: a vocabulary of 300 with peaked rows
    (settled by the candidates), flat ones (the candidates hold too little mass: the search), and rows with ties
    at the 64th most likely value (the threshold above the tie, inside it, and below it); top_k below, at and
    past 64."""
    from itersft_jax.sampler.sampling import CANDIDATES

    rng = np.random.default_rng(1)
    V = 300
    tied = np.r_[np.linspace(6.0, 4.0, CANDIDATES - 10), [3.0] * 40, rng.normal(size=V - CANDIDATES - 30) - 6]
    rows = [rng.normal(size=V) * 4, np.r_[30.0, rng.normal(size=V - 1)], rng.normal(size=V) * 0.1, np.zeros(V),
            tied, rng.permutation(tied), np.r_[[1.0] * 100, rng.normal(size=V - 100) - 3]]
    logits = np.stack(rows).astype(np.float32)
    fn = jax.jit(filter_logits)
    for top_k, top_p in ((0, 0.9), (0, 0.95), (0, 0.5), (0, 0.99), (0, 0.999), (0, 0.3), (64, 0.95), (63, 1.0),
                         (64, 1.0), (65, 1.0), (200, 0.97), (5, 0.9)):
        knobs = {"temperature": np.float32(1), "top_k": np.int32(top_k), "top_p": np.float32(top_p),
                 "min_p": np.float32(0)}
        got = np.isfinite(np.asarray(fn(jnp.asarray(logits), knobs)))
        expected = np.isfinite(transformers_kept(logits, 1.0, top_k, top_p, 0.0))
        np.testing.assert_array_equal(got, expected, err_msg=f"k={top_k} p={top_p}")
        if top_k == 0 and top_p in (0.9, 0.95):  # row 4: the threshold above its tie at the 64th value, in it
            assert got[4].sum() == got[5].sum() and (got[4].sum() < 54 if top_p == 0.9 else got[4].sum() == 94)
    probs = np.asarray(jax.nn.softmax(logits[4]))
    assert probs[:CANDIDATES - 10].sum() < 0.95 < 0.99 < probs[:CANDIDATES + 30].sum()


def test_eos_stops_each_row_independently(llama):
    _, trainer = llama
    free = trainer.generate(PROMPTS, max_new_tokens=NEW, eos_token_id=[]).sequences
    step = next(s for s in range(2, NEW) if free[0][s] not in free[0][:s])
    eos = free[0][step]  # the token greedy emits at `step` for row 0: make it the EOS
    out = trainer.generate(PROMPTS, max_new_tokens=NEW, eos_token_id=eos)
    assert out.sequences[0] == free[0][:step + 1] and out.finished[0]
    for row, seq in zip(free[1:], out.sequences[1:]):
        expected = row[:row.index(eos) + 1] if eos in row else row
        assert seq == expected  # other rows go on until their own EOS
    assert out.finished[1:] == [eos in row for row in free[1:]]
    # a list of EOS ids: whichever comes first
    both = trainer.generate(PROMPTS, max_new_tokens=NEW, eos_token_id=[free[1][1], eos])
    assert both.sequences[1] == free[1][:2] and both.sequences[0] == out.sequences[0]


def test_num_return_sequences_and_output(llama, tokenizer):
    _, trainer = llama
    out = trainer.generate(PROMPTS[:2], max_new_tokens=NEW, num_return_sequences=2, eos_token_id=[],
                   do_sample=True, temperature=1e-5, seed=0)  # as good as greedy: the two rows agree
    assert isinstance(out, GenerationOutput) and out["sequences"] is out.sequences
    assert len(out.sequences) == 4 and out.sequences[0] == out.sequences[1] != out.sequences[2]
    assert out.prompt_ids[1] == out.prompt_ids[0] == tokenizer(PROMPTS[0]).input_ids
    assert all(len(s) == NEW for s in out.sequences) and not any(out.finished)
    with pytest.raises(ValueError, match="`num_return_sequences`=2 with greedy decoding"):  # as transformers
        trainer.generate(PROMPTS[:2], max_new_tokens=NEW, num_return_sequences=2)
    sampled = trainer.generate(PROMPTS[:2], max_new_tokens=NEW, num_return_sequences=3, do_sample=True,
                       eos_token_id=[], seed=0)
    assert len(set(map(tuple, sampled.sequences[:3]))) > 1  # the copies of one prompt are sampled apart


def test_bare_module_and_errors(llama):
    _, trainer = llama
    out = generate(trainer.model, input_ids=[[1, 5, 9]], max_new_tokens=4)
    assert out.texts is None and len(out.sequences[0]) <= 4
    seqs, _finished = generate_ids(trainer.graphdef, trainer.params, [[1, 5, 9]], max_new_tokens=4)
    assert seqs == trainer.generate(input_ids=[[1, 5, 9]], max_new_tokens=4, eos_token_id=[]).sequences
    with pytest.raises(ValueError, match="exactly one"):
        trainer.generate()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        trainer.generate(input_ids=[[1, 10**6]])
    with pytest.raises(TypeError, match="list of str"):
        trainer.generate("a single string")


def test_compiles_once_across_prompt_lengths_and_settings(llama):
    """Every sampling setting is a run-time value: six calls with one prompt bucket prefill-compile once, and
    the decode chunk compiles once for each (slots, cache) shape the engine reports it ran at. The two functions'
    caches are emptied first: what earlier tests compiled does not count."""
    _, trainer = llama
    rng = np.random.default_rng(0)
    chunk_shapes = set()
    sampler_prefill.clear_cache()
    sampler_chunk.clear_cache()
    with count_compilations("sampler_prefill") as prefill, count_compilations("sampler_chunk") as decode:
        for call in range(6):  # prompt lengths 17..24: one bucket (24)
            rows = [rng.integers(3, 300, rng.integers(17, 25)).tolist() for _ in range(3)]
            out = trainer.generate(input_ids=rows, max_new_tokens=9 + call, do_sample=call % 2 == 1,
                           top_k=[0, 5][call % 2], top_p=[1.0, 0.9][call % 2], temperature=0.5 + call,
                           eos_token_id=[2, 3][: 1 + call % 2])
            chunk_shapes |= out.stats["chunk_shapes"]
    assert prefill.count == 1 and decode.count == len(chunk_shapes)


def test_generate_sees_the_update_of_the_previous_step(tiny_model_dir, tmp_path, tokenizer):
    trainer = make_trainer(tiny_model_dir("llama"), tmp_path, tokenizer, learning_rate=1e-2)
    before = trainer.generate(["hello"], max_new_tokens=6).texts[0]
    for _ in range(12):
        trainer.step(prompts=["hello"], completions=[" world"])
    after = trainer.generate(["hello"], max_new_tokens=6)
    assert after.texts[0] == " world" != before and after.finished[0]
    assert jax.tree.leaves(trainer.params)[0] is jax.tree.leaves(trainer.train_state.params)[0]


def test_processors_and_stop_strings_equal_transformers(llama, tokenizer):
    """Greedy, token for token against transformers ``generate`` on the same weights (one prompt: no padding):
    ``repetition_penalty`` with ``min_new_tokens`` (the EOS is a token greedy emits early: blocked until then),
    and ``stop_strings`` (a piece of the greedy text across a token boundary: the row ends at the token that
    completes it, which transformers' ``StopStringCriteria`` keeps too)."""
    from transformers import AutoModelForCausalLM

    path, trainer = llama
    hf = AutoModelForCausalLM.from_pretrained(path).float().eval()
    prompt = PROMPTS[2]
    ids = tokenizer(prompt).input_ids

    def theirs(eos, **kw):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                              pad_token_id=0, **kw)
        row = out[0, len(ids):].tolist()
        return row[:row.index(eos) + 1] if eos in row else row

    plain = trainer.generate([prompt], max_new_tokens=NEW, eos_token_id=[]).sequences[0]
    penalized = trainer.generate([prompt], max_new_tokens=NEW, eos_token_id=[], repetition_penalty=1.5)
    assert penalized.sequences[0] != plain  # the penalty changes this row
    eos = penalized.sequences[0][1]
    out = trainer.generate([prompt], max_new_tokens=NEW, eos_token_id=eos, repetition_penalty=1.5, min_new_tokens=5)
    assert out.sequences[0] == theirs(eos, repetition_penalty=1.5, min_new_tokens=5)
    assert len(out.sequences[0]) >= 6 and eos not in out.sequences[0][:5]

    # a stop string across a token boundary, from printable text (a random model emits stray bytes too)
    texts = [tokenizer.decode([t]) for t in plain]
    i = next(i for i in range(3, NEW) if len(texts[i - 1]) >= 2 and texts[i]
             and (texts[i - 1] + texts[i]).isprintable() and "\ufffd" not in texts[i - 1] + texts[i])
    stop = texts[i - 1][-2:] + texts[i][:1]  # completed by token i
    unused = next(t for t in range(3, 300) if t not in plain)
    out = trainer.generate([prompt], max_new_tokens=NEW, eos_token_id=unused, stop_strings=[stop, "never seen"])
    assert out.sequences[0] == theirs(unused, stop_strings=[stop, "never seen"], tokenizer=tokenizer)
    assert stop in out.texts[0] and out.finish_reasons == ["stop_string"] and out.finished == [True]
    assert len(out.sequences[0]) <= i + 1


def test_new_arguments_are_checked_naming_them(llama):
    _, trainer = llama
    for kwargs, exc, name in ((dict(min_p=1.5), ValueError, "min_p"), (dict(min_p="0.1"), TypeError, "min_p"),
                              (dict(min_new_tokens=NEW + 1), ValueError, "min_new_tokens"),
                              (dict(min_new_tokens=1.0), TypeError, "min_new_tokens"),
                              (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
                              (dict(stop_strings=[""]), TypeError, "stop_strings"),
                              (dict(stop_strings=[3]), TypeError, "stop_strings")):
        with pytest.raises(exc, match=f"`{name}`"):
            trainer.generate(PROMPTS, max_new_tokens=NEW, **kwargs)
    with pytest.raises(ValueError, match="`stop_strings` need a tokenizer"):
        generate(trainer.model, input_ids=[[1, 5]], stop_strings=["a"])


def test_messages_go_through_the_chat_template(llama, tokenizer):
    """``messages``: each chat through the tokenizer's template with the generation prompt, tokenized without
    adding special tokens again; the same rows as ``input_ids`` of that text. No template: a clear error."""
    import copy

    _, trainer = llama
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    messages = [[{"role": "user", "content": "hello"}], [{"role": "system", "content": "be brief"},
                                                         {"role": "user", "content": "12 + 30 ="}]]
    out = trainer.generate(messages=messages, max_new_tokens=4, eos_token_id=[], tokenizer=chat)
    expected = [chat("user: hello\nassistant:", add_special_tokens=False).input_ids,
                chat("system: be brief\nuser: 12 + 30 =\nassistant:", add_special_tokens=False).input_ids]
    assert out.prompt_ids == expected
    assert out.sequences == trainer.generate(input_ids=expected, max_new_tokens=4, eos_token_id=[]).sequences
    with pytest.raises(ValueError, match="no chat template"):
        trainer.generate(messages=messages, max_new_tokens=4)
    with pytest.raises(ValueError, match="exactly one"):
        trainer.generate(PROMPTS, messages=messages, tokenizer=chat)
    with pytest.raises(TypeError, match="`messages"):
        trainer.generate(messages=["hello"], tokenizer=chat)
