"""The shared data layer: hand-written expectations for every input form and truncation mode."""

import subprocess
import sys

import numpy as np
import pytest

from itersft_jax.shared.data import (
    IGNORE_INDEX,
    Example,
    bucket_length,
    collate,
    count_label_tokens,
    plan_updates,
    prepare_examples,
    resolve_ratio,
)

X = IGNORE_INDEX


def ids_labels(examples):
    return [(ex.input_ids.tolist(), ex.labels.tolist()) for ex in examples]


# ---------------------------------------------------------------------------------------------------------
# input_ids form


def test_input_ids_default_labels_are_the_ids():
    out = prepare_examples(input_ids=[[5, 6, 7], [8, 9]])
    assert ids_labels(out) == [([5, 6, 7], [5, 6, 7]), ([8, 9], [8, 9])]
    assert out[0].input_ids.dtype == np.int32


def test_attention_mask_zero_positions_are_removed_left_and_right():
    out = prepare_examples(input_ids=[[0, 0, 5, 6], [7, 8, 0, 0]], attention_mask=[[0, 0, 1, 1], [1, 1, 0, 0]])
    assert ids_labels(out) == [([5, 6], [5, 6]), ([7, 8], [7, 8])]


def test_given_labels_are_honoured():
    out = prepare_examples(input_ids=[[5, 6, 7, 8]], labels=[[X, X, 7, 8]])
    assert ids_labels(out) == [([5, 6, 7, 8], [X, X, 7, 8])]


@pytest.mark.parametrize("mode,expected", [
    ("keep_end", [([6, 7, 8], [X, 7, 8]), ([9, 10], [9, 10])]),
    ("keep_start", [([5, 6, 7], [X, X, 7]), ([9, 10], [9, 10])]),
])
def test_input_ids_truncation_is_on_the_sequence_axis(mode, expected):
    # TRL sliced the batch axis: with max_length=3 and 2 samples it kept both samples whole.
    out = prepare_examples(input_ids=[[5, 6, 7, 8], [9, 10]], labels=[[X, X, 7, 8], [9, 10]],
                           max_length=3, truncation_mode=mode)
    assert ids_labels(out) == expected


def test_two_d_arrays_with_mask_and_truncation():
    ids = np.array([[5, 6, 7, 8, 0], [9, 10, 11, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    out = prepare_examples(input_ids=ids, attention_mask=mask, max_length=2, truncation_mode="keep_end")
    assert ids_labels(out) == [([7, 8], [7, 8]), ([10, 11], [10, 11])]


# ---------------------------------------------------------------------------------------------------------
# texts form


def test_texts_use_the_tokenizers_own_special_tokens(tokenizer):
    out = prepare_examples(texts=["hello world"], tokenizer=tokenizer)
    expected = tokenizer("hello world").input_ids
    assert expected[0] == tokenizer.bos_token_id  # the standard fixture prepends BOS, appends nothing
    assert ids_labels(out) == [(expected, expected)]


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_texts_truncation(tokenizer, mode):
    full = tokenizer("The quick brown fox jumps over the lazy dog.").input_ids
    out = prepare_examples(texts=["The quick brown fox jumps over the lazy dog."], tokenizer=tokenizer,
                           max_length=4, truncation_mode=mode)
    cut = full[-4:] if mode == "keep_end" else full[:4]
    assert ids_labels(out) == [(cut, cut)]


def test_texts_labels_equal_to_texts_are_accepted_for_causal_lm(tokenizer):
    texts = ["a b", "hello world"]
    out = prepare_examples(texts=texts, texts_labels=list(texts), tokenizer=tokenizer)
    expected = [tokenizer(t).input_ids for t in texts]
    assert ids_labels(out) == [(x, x) for x in expected]  # as without texts_labels: every token a label


def test_texts_labels_are_the_decoder_targets_for_encoder_decoder(tokenizer):
    out = prepare_examples(texts=["question"], texts_labels=["answer"], tokenizer=tokenizer,
                           is_encoder_decoder=True)
    assert out[0].input_ids.tolist() == tokenizer("question").input_ids
    assert out[0].labels.tolist() == tokenizer("answer").input_ids  # TRL tokenized `texts` here


# ---------------------------------------------------------------------------------------------------------
# prompts/completions form


def test_completion_masking_and_eos(tokenizer):
    out = prepare_examples(prompts=["12 + 30 ="], completions=[" 42"], tokenizer=tokenizer)
    p = tokenizer("12 + 30 =").input_ids
    c = tokenizer(" 42", add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    assert ids_labels(out) == [(p + c + [eos], [X] * len(p) + c + [eos])]


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_prompts_truncation(tokenizer, mode):
    p = tokenizer("Question: what is two plus two?").input_ids
    c = tokenizer(" four", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    full_ids, full_labels = p + c, [X] * len(p) + c
    n = len(c) + 2 if mode == "keep_end" else len(p) + 1
    out = prepare_examples(prompts=["Question: what is two plus two?"], completions=[" four"],
                           tokenizer=tokenizer, max_length=n, truncation_mode=mode)
    if mode == "keep_end":
        assert ids_labels(out) == [(full_ids[-n:], full_labels[-n:])]
    else:
        assert ids_labels(out) == [(full_ids[:n], full_labels[:n])]


def test_eos_stays_a_label_token_when_pad_equals_eos(tokenizer_pad_eq_eos):
    tok = tokenizer_pad_eq_eos
    assert tok.pad_token_id == tok.eos_token_id
    out = prepare_examples(prompts=["7 * 6 ="], completions=[" 42"], tokenizer=tok)
    assert out[0].labels[-1] == tok.eos_token_id  # TRL's collator turned it into -100
    texts = prepare_examples(texts=["hi</s>"], tokenizer=tok)
    assert texts[0].labels[-1] == tok.eos_token_id


def test_completion_already_ending_with_eos_is_not_doubled(tokenizer):
    out = prepare_examples(prompts=["a"], completions=[" b</s>"], tokenizer=tokenizer)
    assert out[0].input_ids.tolist().count(tokenizer.eos_token_id) == 1


def test_samples_without_label_tokens_are_dropped_with_a_warning(caplog):
    out = prepare_examples(input_ids=[[5, 6, 7], [8, 9, 10]], labels=[[5, 6, 7], [X, X, X]])
    assert ids_labels(out) == [([5, 6, 7], [5, 6, 7])]
    assert "dropped 1 of 2" in caplog.text


def test_tokenizer_is_not_mutated(tokenizer):
    before = (tokenizer.truncation_side, tokenizer.padding_side, tokenizer.model_max_length,
              dict(tokenizer.init_kwargs))
    prepare_examples(texts=["The quick brown fox"], tokenizer=tokenizer, max_length=2, truncation_mode="keep_start")
    prepare_examples(prompts=["a"], completions=["b"], tokenizer=tokenizer, max_length=2)
    after = (tokenizer.truncation_side, tokenizer.padding_side, tokenizer.model_max_length,
             dict(tokenizer.init_kwargs))
    assert before == after


# ---------------------------------------------------------------------------------------------------------
# Containers


def _containers():
    import jax.numpy as jnp
    import torch

    rows = [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    return {
        "list": rows,
        "numpy-2d": np.array(rows),
        "numpy-rows": [np.array(r) for r in rows],
        "torch-2d": torch.tensor(rows),
        "torch-rows": [torch.tensor(r) for r in rows],
        "jax-2d": jnp.array(rows),
        "jax-rows": [jnp.array(r) for r in rows],
        "tuple": tuple(tuple(r) for r in rows),
    }


def test_every_container_type_gives_the_same_updates():
    reference = None
    for name, ids in _containers().items():
        examples = prepare_examples(input_ids=ids, labels=ids)
        updates = plan_updates(examples, micro_batch_size=2, gradient_accumulation_steps=1, seed=3, call_index=1)
        arrays = [collate(u) for u in updates]
        flat = [(k, a[k].tolist()) for a in arrays for k in sorted(a)]
        if reference is None:
            reference = flat
        assert flat == reference, name


# ---------------------------------------------------------------------------------------------------------
# Batching


def _examples(lengths):
    return [Example(np.arange(1, n + 1, dtype=np.int32), np.arange(1, n + 1, dtype=np.int32)) for n in lengths]


def test_plan_updates_counts_and_trailing_partial_group():
    ex = _examples([3] * 10)
    updates = plan_updates(ex, micro_batch_size=2, gradient_accumulation_steps=2, seed=0, call_index=0)
    assert [len(u) for u in updates] == [2, 2, 1]
    assert [[len(mb) for mb in u] for u in updates] == [[2, 2], [2, 2], [2]]
    assert sum(len(mb) for u in updates for mb in u) == 10


def test_plan_updates_is_seeded_by_seed_and_call_index():
    ex = _examples(range(2, 12))

    def order(seed, call):
        ups = plan_updates(ex, micro_batch_size=1, gradient_accumulation_steps=1, seed=seed, call_index=call)
        return [len(u[0][0].input_ids) for u in ups]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert sorted(order(0, 0)) == list(range(2, 12))


def test_collate_pads_rows_and_micro_batches_with_zero_weight():
    ex = _examples([2, 3])
    out = collate([[ex[0], ex[1]], [ex[0]]], rows=3, length=4, num_micro_batches=3, pad_id=0)
    assert out["input_ids"].shape == (3, 3, 4)
    assert out["input_ids"][0].tolist() == [[1, 2, 0, 0], [1, 2, 3, 0], [0, 0, 0, 0]]
    assert out["attention_mask"][0].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    assert out["labels"][0].tolist() == [[1, 2, X, X], [1, 2, 3, X], [X, X, X, X]]
    assert (out["attention_mask"][2] == 0).all() and (out["labels"][2] == X).all()
    assert count_label_tokens([[ex[0], ex[1]], [ex[0]]]) == 1 + 2 + 1


def test_bucket_ladder():
    assert [bucket_length(n) for n in (1, 16, 17, 25, 33, 49, 65, 97, 129, 200, 300, 500)] == [
        16, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    assert bucket_length(300, max_length=320) == 320
    assert bucket_length(40, max_length=320) == 48
    distinct = {bucket_length(n) for n in range(1, 513)}
    assert len(distinct) == 11


def test_resolve_ratio():
    assert resolve_ratio(0.1, 50, "logging_steps") == 5
    assert resolve_ratio(10, -1, "logging_steps") == 10
    with pytest.raises(ValueError, match="logging_steps"):
        resolve_ratio(0.5, -1, "logging_steps")


# ---------------------------------------------------------------------------------------------------------
# Bad input: type, and a message that names the argument


BAD = [
    (dict(), ValueError, "input form"),
    (dict(input_ids=[[1, 2]], texts=["a"]), ValueError, "exactly one input form"),
    (dict(texts=["a"], prompts=["a"], completions=["b"]), ValueError, "exactly one input form"),
    (dict(input_ids=[]), ValueError, "`input_ids` is empty"),
    (dict(input_ids=[[]]), ValueError, "input_ids[0]"),
    (dict(input_ids=[1, 2, 3]), TypeError, "input_ids"),
    (dict(input_ids=np.array([1, 2, 3])), ValueError, "input_ids"),
    (dict(input_ids="hello"), TypeError, "input_ids"),
    (dict(input_ids=[[1.5, 2.0]]), TypeError, "input_ids[0]"),
    (dict(input_ids=[[True, False]]), TypeError, "input_ids[0]"),
    (dict(input_ids=[[1, 2, 999]]), ValueError, "input_ids[0]"),
    (dict(input_ids=[[1, -3]]), ValueError, "input_ids[0]"),
    (dict(input_ids=[[1, 2]], attention_mask=[[1, 1], [1, 1]]), ValueError, "attention_mask"),
    (dict(input_ids=[[1, 2]], attention_mask=[[1]]), ValueError, "attention_mask[0]"),
    (dict(input_ids=[[1, 2]], attention_mask=[[1, 2]]), ValueError, "attention_mask[0]"),
    (dict(input_ids=[[1, 2]], attention_mask=[[0, 0]]), ValueError, "attention_mask[0]"),
    (dict(input_ids=[[1, 2]], labels=[[1, 2], [1, 2]]), ValueError, "labels"),
    (dict(input_ids=[[1, 2]], labels=[[1, 2, 3]]), ValueError, "labels[0]"),
    (dict(input_ids=[[1, 2]], labels=[[1, -5]]), ValueError, "labels[0]"),
    (dict(input_ids=[[1, 2]], labels=[[X, X]]), ValueError, "labels"),
    (dict(texts="hello"), TypeError, "texts"),
    (dict(texts=[]), ValueError, "texts"),
    (dict(texts=["a", 3]), TypeError, "texts[1]"),
    (dict(texts=["a"], texts_labels=["b"]), ValueError, "prompts"),
    (dict(texts=["a"], texts_labels=["a", "b"]), ValueError, "texts_labels"),
    (dict(texts_labels=["a"], input_ids=[[1]]), ValueError, "texts_labels"),
    (dict(prompts=["a"]), ValueError, "completions"),
    (dict(completions=["a"]), ValueError, "prompts"),
    (dict(prompts=["a", "b"], completions=["c"]), ValueError, "completions"),
    (dict(prompts=["a"], completions=[None]), TypeError, "completions[0]"),
    (dict(texts=["a"], attention_mask=[[1]]), ValueError, "attention_mask"),
    (dict(input_ids=[[1, 2]], max_length=-1), ValueError, "max_length"),
    (dict(input_ids=[[1, 2]], max_length=0), ValueError, "max_length"),
    (dict(input_ids=[[1, 2]], max_length=2.5), TypeError, "max_length"),
    (dict(input_ids=[[1, 2]], truncation_mode="middle"), ValueError, "truncation_mode"),
    (dict(input_ids=[[1, 2]], labels=[[X, 2]], max_length=1, truncation_mode="keep_start"), ValueError,
     "max_length"),
    (dict(input_ids=[["a", "b"]]), TypeError, "input_ids[0]"),
    (dict(input_ids={"input_ids": [[1]]}), TypeError, "input_ids"),
]


@pytest.mark.parametrize("kwargs,exc,fragment", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_raises_naming_the_argument(kwargs, exc, fragment, tokenizer):
    with pytest.raises(exc) as info:
        prepare_examples(tokenizer=tokenizer, vocab_size=len(tokenizer), **kwargs)
    assert fragment in str(info.value)


def test_text_forms_need_a_tokenizer_and_an_eos(tokenizer_no_pad):
    with pytest.raises(ValueError, match="processing_class"):
        prepare_examples(texts=["a"])
    tok = tokenizer_no_pad
    assert tok.eos_token_id is not None  # no pad is fine for every form
    assert prepare_examples(prompts=["a"], completions=["b"], tokenizer=tok)


def test_encoder_decoder_needs_targets():
    with pytest.raises(ValueError, match="labels"):
        prepare_examples(input_ids=[[1, 2]], is_encoder_decoder=True)


# ---------------------------------------------------------------------------------------------------------
# Import hygiene (fresh interpreters)


@pytest.mark.parametrize("module,forbidden", [
    ("itersft_jax.shared.data", ("jax", "torch")),
    ("itersft_jax", ("jax", "torch")),
    ("itersft_torch", ("jax",)),
    ("itersft_jax.shared.config", ("jax",)),
    ("itersft_torch.generation", ("jax",)),
    ("itersft_jax.shared.outputs", ("jax", "torch")),
    ("itersft_jax.shared.low_level", ("jax", "torch")),
    ("itersft_jax.shared.atomic_dir", ("jax", "torch")),
    ("itersft_torch.state", ("jax",)),
    ("itersft_torch.rl_losses", ("jax",)),
])
def test_import_hygiene(module, forbidden):
    code = (f"import sys, {module}; bad = [m for m in {forbidden!r} if m in sys.modules]; "
            f"print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"{module} imported {result.stdout.strip()} {result.stderr[-500:]}"


def test_handed_arrays_are_converted_without_importing_their_framework_otherwise():
    code = ("import sys, numpy as np; from itersft_jax.shared.data import prepare_examples; "
            "prepare_examples(input_ids=np.array([[1, 2, 3]])); "
            "sys.exit(1 if ('torch' in sys.modules or 'jax' in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
