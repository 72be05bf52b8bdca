"""The shared data layer: every ``step()`` input form -> examples -> shuffled optimizer updates -> padded arrays.

Both backends consume exactly what this module produces, so their results can be compared number for number.
It imports neither jax nor torch (it converts their arrays by duck typing) and never mutates the tokenizer.

Pipeline of one ``step()`` call::

    prepare_examples(...)  -> list[Example]            validation, tokenization, truncation, labels
    plan_updates(...)      -> list[list[list[Example]]] shuffle, micro-batches, accumulation groups
    collate(...)           -> dict of [A, M, T] arrays  right padding to a length bucket, zero-weight rows
"""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
TRUNCATION_MODES = ("keep_end", "keep_start")


@dataclasses.dataclass(frozen=True)
class Example:
    """One training sequence. ``labels`` follow the HF convention: aligned with ``input_ids`` (the shift
    happens in the loss), ``-100`` = no loss. For encoder-decoder models ``labels`` are the decoder
    targets and may have another length."""

    input_ids: np.ndarray
    labels: np.ndarray

    @property
    def num_label_tokens(self) -> int:
        """Tokens that carry loss once labels are shifted (position 0 is never predicted)."""
        return int(np.count_nonzero(self.labels[1:] != IGNORE_INDEX))


# ----------------------------------------------------------------------------------------------------------
# Conversion of user containers (torch / numpy / jax / lists) without importing torch or jax.


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as err:
        raise TypeError(f"`{name}` could not be read as an integer array: {err}") from None
    if arr.dtype == object:
        raise TypeError(f"`{name}` must hold integers, got ragged or mixed values")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if arr.dtype == bool:
            raise TypeError(f"`{name}` must hold integers, got booleans")
        raise TypeError(f"`{name}` must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _as_sequences(value: Any, name: str) -> list[np.ndarray]:
    """A 2-D array or a list of 1-D sequences -> list of 1-D int64 arrays."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"`{name}` must be a list of token-id sequences or a 2-D array, got a string")
    if isinstance(value, dict):
        raise TypeError(f"`{name}` must be a list of token-id sequences or a 2-D array, got a dict")
    ndim = getattr(value, "ndim", None)
    if ndim is not None:  # a numpy / torch / jax array
        arr = _to_numpy(value, name)
        if arr.ndim == 1:
            raise ValueError(f"`{name}` is a 1-D array; pass a list of sequences or a 2-D [batch, seq] array")
        if arr.ndim != 2:
            raise ValueError(f"`{name}` must be 2-D [batch, seq], got shape {tuple(arr.shape)}")
        rows = list(arr)
    elif isinstance(value, Sequence):
        rows = []
        for i, row in enumerate(value):
            if isinstance(row, (int, np.integer)):
                raise TypeError(f"`{name}` must be a list of sequences; element {i} is a single integer "
                                f"(wrap a single sequence in a list)")
            if isinstance(row, (str, bytes)):
                raise TypeError(f"`{name}[{i}]` is a string; pass token ids, or use `texts=`")
            arr = _to_numpy(row, f"{name}[{i}]")
            if arr.ndim != 1:
                raise ValueError(f"`{name}[{i}]` must be 1-D, got shape {tuple(arr.shape)}")
            rows.append(arr)
    else:
        raise TypeError(f"`{name}` must be a list of token-id sequences or a 2-D array, "
                        f"got {type(value).__name__}")
    if not rows:
        raise ValueError(f"`{name}` is empty")
    for i, row in enumerate(rows):
        if row.size == 0:
            raise ValueError(f"`{name}[{i}]` is an empty sequence")
    return rows


def token_sequences(value: Any, name: str, vocab_size: int | None = None) -> list[np.ndarray]:
    """A 2-D array or a list of 1-D token-id sequences (torch / numpy / jax / lists) as int64 arrays, each non-empty
    and in the vocabulary: ``TypeError``/``ValueError`` naming ``name``."""
    rows = _as_sequences(value, name)
    _check_vocab(rows, name, vocab_size)
    return rows


def check_texts(texts: Any, name: str) -> list[str]:
    """``texts`` as a list of ``str`` (a list, tuple or other sequence: not a dict, a generator or one string), each
    valid Unicode (a lone surrogate cannot be encoded, and tokenizers fail on it with a raw TypeError)."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"`{name}` must be a list of str, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"`{name}[{i}]` must be str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"`{name}[{i}]` is not valid Unicode text ({err.reason} at character {err.start}: "
                             f"{text[err.start]!r})") from None
    return list(texts)


def _check_str_list(value: Any, name: str) -> list[str]:
    texts = check_texts(value, name)
    if not texts:
        raise ValueError(f"`{name}` is empty")
    return texts



def _check_vocab(rows: list[np.ndarray], name: str, vocab_size: int | None, allow_ignore: bool = False):
    for i, row in enumerate(rows):
        bad = row < 0
        if allow_ignore:
            bad &= row != IGNORE_INDEX
        if vocab_size is not None:
            bad |= row >= vocab_size
        if bad.any():
            value = int(row[np.argmax(bad)])
            allowed = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            extra = " or -100" if allow_ignore else ""
            raise ValueError(f"`{name}[{i}]` holds id {value} outside the vocabulary; ids must be in "
                             f"{allowed}{extra}")


def _truncate(arr: np.ndarray, max_length: int | None, mode: str) -> np.ndarray:
    if max_length is None or len(arr) <= max_length:
        return arr
    return arr[-max_length:] if mode == "keep_end" else arr[:max_length]


def _tokenize(tokenizer, texts: list[str], name: str, add_special_tokens: bool) -> list[np.ndarray]:
    if tokenizer is None:
        raise ValueError(f"`{name}` needs a tokenizer: pass `processing_class` to the trainer")
    # Calling the tokenizer reads its settings and changes none of them (TRL set truncation_side).
    encoded = tokenizer(texts, add_special_tokens=add_special_tokens, truncation=False, padding=False)
    return [np.asarray(ids, dtype=np.int64) for ids in encoded["input_ids"]]


# ----------------------------------------------------------------------------------------------------------
# Input forms -> examples


def validate_truncation(max_length: int | None, truncation_mode: str) -> None:
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)):
            raise TypeError(f"`max_length` must be an int or None, got {type(max_length).__name__}")
        if max_length <= 0:
            raise ValueError(f"`max_length` must be positive, got {max_length}")
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"`truncation_mode` must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")


_WARNED_POSITIONS: weakref.WeakSet = weakref.WeakSet()  # trainers already warned about over-long samples


def warn_beyond_positions(examples: list[Example], max_positions: int | None, owner: object) -> None:
    """Warn once per ``owner`` (a trainer) when a sample is longer than the model's ``max_position_embeddings``:
    a learned position table has no row past it and rotary models were never trained that far, so the
    tokens beyond are trained on positions the model does not know. ``max_length`` truncates."""
    if not max_positions or owner in _WARNED_POSITIONS:
        return
    longest = max((len(ex.input_ids) for ex in examples), default=0)
    if longest > max_positions:
        _WARNED_POSITIONS.add(owner)
        logger.warning("step(): a sample of %d tokens is longer than the model's max_position_embeddings=%d; "
                       "its positions past %d are outside what the model knows. Set max_length=%d to truncate. "
                       "(warned once)", longest, max_positions, max_positions, max_positions)


def check_positions(lengths: Sequence[int], max_positions: int | None, name: str, *, hint: str = "") -> None:
    """``ValueError`` naming ``name[i]`` (or ``name.format(i=i)`` for a template like ``"data[{i}].model_input"``)
    when sequence ``i`` is longer than the model's learned position table (``max_positions``; None: no table — RoPE
    families take any length, as transformers does). A position past the table has no embedding: the lookup gives
    NaN, which would reach the loss and every later padded batch."""
    if not max_positions:
        return
    for i, n in enumerate(lengths):
        if n > max_positions:
            label = name.format(i=i) if "{i}" in name else f"{name}[{i}]"
            raise ValueError(f"`{label}` is {n} tokens long, more than the model's {max_positions} positions "
                             f"(its learned position table has no row past them){hint}")


def prepare_examples(
    *,
    input_ids=None,
    attention_mask=None,
    labels=None,
    texts=None,
    texts_labels=None,
    prompts=None,
    completions=None,
    tokenizer=None,
    max_length: int | None = None,
    truncation_mode: str = "keep_end",
    vocab_size: int | None = None,
    is_encoder_decoder: bool = False,
    max_positions: int | None = None,
) -> list[Example]:
    """Validate one ``step()`` call's inputs and turn them into truncated, labelled examples.

    Exactly one form: ``input_ids`` (+ optional ``attention_mask``, ``labels``), ``texts`` (+
    ``texts_labels`` for encoder-decoder models), or ``prompts`` + ``completions``. Raises
    ``ValueError``/``TypeError`` naming the argument before anything is changed anywhere.

    Positions where ``attention_mask`` is 0 are removed (they are padding: neither attended nor in the
    loss). Samples left with no label token after truncation are dropped with a warning; a call where
    none is left raises ``ValueError``. ``max_positions``: the model's learned position table (GPT-2, OPT); a
    sample longer than it after truncation is refused (``check_positions``).
    """
    validate_truncation(max_length, truncation_mode)
    forms = {
        "input_ids": input_ids is not None,
        "texts": texts is not None,
        "prompts/completions": prompts is not None or completions is not None,
    }
    given = [k for k, v in forms.items() if v]
    if not given:
        raise ValueError("step() needs one input form: `input_ids` (with optional `attention_mask`, "
                         "`labels`), `texts`, or `prompts` + `completions`")
    if len(given) > 1:
        raise ValueError(f"step() takes exactly one input form, got {' and '.join(given)}")
    if input_ids is None:
        for name, value in (("attention_mask", attention_mask), ("labels", labels)):
            if value is not None and not (name == "labels" and texts is not None and is_encoder_decoder):
                raise ValueError(f"`{name}` goes with `input_ids`; it cannot be combined with {given[0]}")
    if texts is None and texts_labels is not None:
        raise ValueError("`texts_labels` goes with `texts`")

    if input_ids is not None:
        examples = _from_ids(input_ids, attention_mask, labels, vocab_size, is_encoder_decoder)
    elif texts is not None:
        examples = _from_texts(texts, texts_labels, labels, tokenizer, vocab_size, is_encoder_decoder)
    else:
        examples = _from_prompts(prompts, completions, tokenizer, vocab_size, is_encoder_decoder)

    truncated = [
        Example(_truncate(ex.input_ids, max_length, truncation_mode),
                _truncate(ex.labels, max_length, truncation_mode))
        for ex in examples
    ]
    name = {"input_ids": "input_ids", "texts": "texts", "prompts/completions": "prompts[{i}] + completions[{i}]"}
    hint = (f" (after truncation to max_length={max_length})" if max_length else "") + \
        (f"; set `max_length` <= {max_positions} to truncate" if max_positions else "")
    check_positions([len(ex.input_ids) for ex in truncated], max_positions, name[given[0]], hint=hint)
    if is_encoder_decoder:
        check_positions([len(ex.labels) for ex in truncated], max_positions,
                        "labels" if texts_labels is None else "texts_labels", hint=hint)
        kept = [ex for ex in truncated if np.any(ex.labels != IGNORE_INDEX)]
    else:
        kept = [ex for ex in truncated if ex.num_label_tokens > 0]
    if not kept:
        untruncated = [ex for ex in examples if (np.any(ex.labels != IGNORE_INDEX) if is_encoder_decoder
                                                 else ex.num_label_tokens > 0)]
        if untruncated:  # truncation removed them
            raise ValueError(
                f"no sample has a label token left (max_length={max_length}, truncation_mode="
                f"{truncation_mode!r}); check `labels`/`completions` and `max_length`")
        raise ValueError(
            f"no sample has a label token: each needs a token with a label after its first one (a causal LM "
            f"predicts token t from the tokens before it); got {len(examples)} sample(s) of lengths "
            f"{sorted({len(ex.input_ids) for ex in examples})[:8]}. Check for empty texts/completions and `labels`")
    if len(kept) < len(truncated):
        logger.warning("step(): dropped %d of %d samples that have no label token left after truncation",
                       len(truncated) - len(kept), len(truncated))
    return [Example(ex.input_ids.astype(np.int32), ex.labels.astype(np.int32)) for ex in kept]


def _from_ids(input_ids, attention_mask, labels, vocab_size, is_encoder_decoder) -> list[Example]:
    ids = _as_sequences(input_ids, "input_ids")
    _check_vocab(ids, "input_ids", vocab_size)
    masks = None
    if attention_mask is not None:
        masks = _as_sequences(attention_mask, "attention_mask")
        if len(masks) != len(ids):
            raise ValueError(f"`attention_mask` has {len(masks)} sequences but `input_ids` has {len(ids)}")
        for i, (m, x) in enumerate(zip(masks, ids)):
            if len(m) != len(x):
                raise ValueError(f"`attention_mask[{i}]` has length {len(m)} but `input_ids[{i}]` has {len(x)}")
            if not np.isin(m, (0, 1)).all():
                raise ValueError(f"`attention_mask[{i}]` must hold only 0 and 1")
            if not m.any():
                raise ValueError(f"`attention_mask[{i}]` is all zeros: the sample has no token")
    label_rows = None
    if labels is not None:
        label_rows = _as_sequences(labels, "labels")
        if len(label_rows) != len(ids):
            raise ValueError(f"`labels` has {len(label_rows)} sequences but `input_ids` has {len(ids)}")
        _check_vocab(label_rows, "labels", vocab_size, allow_ignore=True)
        if not is_encoder_decoder:
            for i, (lab, x) in enumerate(zip(label_rows, ids)):
                if len(lab) != len(x):
                    raise ValueError(f"`labels[{i}]` has length {len(lab)} but `input_ids[{i}]` has {len(x)} "
                                     f"(causal-LM labels are aligned with input_ids)")
    elif is_encoder_decoder:
        raise ValueError("encoder-decoder models need decoder targets: pass `labels` (or `texts_labels`)")

    examples = []
    for i, x in enumerate(ids):
        lab = label_rows[i] if label_rows is not None else x
        if masks is not None:
            keep = masks[i].astype(bool)
            x = x[keep]
            if not is_encoder_decoder:
                lab = lab[keep]
        examples.append(Example(x, lab))
    return examples


def _from_texts(texts, texts_labels, labels, tokenizer, vocab_size, is_encoder_decoder) -> list[Example]:
    texts = _check_str_list(texts, "texts")
    if texts_labels is not None:
        texts_labels = _check_str_list(texts_labels, "texts_labels")
        if len(texts_labels) != len(texts):
            raise ValueError(f"`texts_labels` has {len(texts_labels)} entries but `texts` has {len(texts)}")
        if not is_encoder_decoder and texts_labels != texts:
            raise ValueError(
                "`texts_labels` differs from `texts`, but a causal LM predicts its own input: to train on "
                "part of a text pass `input_ids` with `labels` (-100 where no loss), or use "
                "`prompts=` + `completions=`")
    ids = _tokenize(tokenizer, texts, "texts", add_special_tokens=True)
    _check_vocab(ids, "texts (tokenized)", vocab_size)
    if not is_encoder_decoder:
        return [Example(x, x) for x in ids]
    if texts_labels is not None:
        targets = _tokenize(tokenizer, texts_labels, "texts_labels", add_special_tokens=True)
    elif labels is not None:
        targets = _as_sequences(labels, "labels")
        if len(targets) != len(ids):
            raise ValueError(f"`labels` has {len(targets)} sequences but `texts` has {len(ids)}")
        _check_vocab(targets, "labels", vocab_size, allow_ignore=True)
    else:
        raise ValueError("encoder-decoder models need decoder targets: pass `texts_labels` (or `labels`)")
    return [Example(x, y) for x, y in zip(ids, targets)]


def _from_prompts(prompts, completions, tokenizer, vocab_size, is_encoder_decoder) -> list[Example]:
    if prompts is None or completions is None:
        missing = "completions" if completions is None else "prompts"
        raise ValueError(f"`prompts` and `completions` go together; `{missing}` is missing")
    prompts = _check_str_list(prompts, "prompts")
    completions = _check_str_list(completions, "completions")
    if len(prompts) != len(completions):
        raise ValueError(f"`completions` has {len(completions)} entries but `prompts` has {len(prompts)}")
    if tokenizer is None:
        raise ValueError("`prompts`/`completions` need a tokenizer: pass `processing_class` to the trainer")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("`prompts`/`completions` append EOS after each completion, but the "
                         "`processing_class` has no eos_token")
    prompt_ids = _tokenize(tokenizer, prompts, "prompts", add_special_tokens=True)
    completion_ids = _tokenize(tokenizer, completions, "completions", add_special_tokens=False)
    examples = []
    for p, c in zip(prompt_ids, completion_ids):
        if len(c) == 0 or c[-1] != eos:
            c = np.concatenate([c, [eos]])
        if is_encoder_decoder:
            examples.append(Example(p, c))
        else:
            examples.append(Example(np.concatenate([p, c]),
                                    np.concatenate([np.full(len(p), IGNORE_INDEX), c])))
    _check_vocab([ex.input_ids for ex in examples], "prompts/completions (tokenized)", vocab_size)
    return examples


# ----------------------------------------------------------------------------------------------------------
# Examples -> updates -> arrays


def plan_updates(examples: list[Example], *, micro_batch_size: int, gradient_accumulation_steps: int,
                 seed: int, call_index: int) -> list[list[list[Example]]]:
    """Shuffle (seeded by ``seed`` and the call counter), cut into micro-batches of ``micro_batch_size``
    and group ``gradient_accumulation_steps`` micro-batches into one optimizer update; a trailing
    partial group is still one update. Inside an update, samples are sorted by length before they are
    cut: the update's token-weighted loss does not depend on which micro-batch a sample sits in, and
    similar lengths side by side waste less compute on padding."""
    if micro_batch_size < 1:
        raise ValueError(f"`per_device_train_batch_size` must be >= 1, got {micro_batch_size}")
    if gradient_accumulation_steps < 1:
        raise ValueError(f"`gradient_accumulation_steps` must be >= 1, got {gradient_accumulation_steps}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(call_index)])
    order = rng.permutation(len(examples))
    per_update = micro_batch_size * gradient_accumulation_steps
    updates = []
    for start in range(0, len(order), per_update):
        chunk = sorted((examples[i] for i in order[start:start + per_update]), key=lambda e: len(e.input_ids))
        updates.append([chunk[j:j + micro_batch_size] for j in range(0, len(chunk), micro_batch_size)])
    return updates


def bucket_length(length: int, max_length: int | None = None, minimum: int = 16) -> int:
    """The smallest bucket >= ``length`` on the ladder 16, 24, 32, 48, 64, 96, ... (powers of two and
    1.5x between), capped at ``max_length``: a long iterative run sees a handful of shapes."""
    bucket = minimum
    while bucket < length:
        half = bucket // 2 if bucket & (bucket - 1) == 0 else bucket // 3
        bucket += half
    if max_length is not None:
        bucket = min(bucket, max(max_length, length))
    return bucket


def training_pad_id(tokenizer) -> int:
    """The id that pads training and evaluation rows on both engines: the tokenizer's pad id, else 0 (padding is
    never attended nor in the loss, so its value only has to be a valid id)."""
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return 0 if pad_id is None else int(pad_id)


def collate(micro_batches: list[list[Example]], *, pad_id: int = 0, rows: int | None = None,
            length: int | None = None, num_micro_batches: int | None = None,
            label_length: int | None = None) -> dict[str, np.ndarray]:
    """Right-pad micro-batches into ``[A, M, T]`` int32 arrays ``input_ids``, ``attention_mask``,
    ``labels``. Missing rows and micro-batches are padding (mask 0, labels -100: zero weight). With
    ``label_length`` (encoder-decoder) labels get their own length ``[A, M, L]``."""
    rows = rows or max(len(mb) for mb in micro_batches)
    num = num_micro_batches or len(micro_batches)
    longest = max(len(ex.input_ids) for mb in micro_batches for ex in mb)
    length = length or longest
    if length < longest:
        raise ValueError(f"collate length {length} is shorter than the longest sample ({longest})")
    lab_len = label_length or length
    input_ids = np.full((num, rows, length), pad_id, np.int32)
    mask = np.zeros((num, rows, length), np.int32)
    labels = np.full((num, rows, lab_len), IGNORE_INDEX, np.int32)
    for a, mb in enumerate(micro_batches):
        for m, ex in enumerate(mb):
            n = len(ex.input_ids)
            input_ids[a, m, :n] = ex.input_ids
            mask[a, m, :n] = 1
            labels[a, m, :len(ex.labels)] = ex.labels
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def count_label_tokens(micro_batches: list[list[Example]]) -> int:
    return sum(ex.num_label_tokens for mb in micro_batches for ex in mb)


def resolve_ratio(value: float, max_steps: int, name: str) -> int:
    """HF allows ``*_steps`` in (0, 1) as a ratio of ``max_steps``; resolve it to a step count."""
    if 0 < value < 1:
        if max_steps is None or max_steps <= 0:
            raise ValueError(f"`{name}`={value} is a ratio of `max_steps`, but `max_steps` is not set; "
                             f"give `{name}` as a number of updates or set `max_steps`")
        return max(1, math.ceil(max_steps * value))
    return int(value)
