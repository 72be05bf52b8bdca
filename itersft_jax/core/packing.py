"""Packing one optimizer update's samples into few fixed-shape rows (JAX engine only).

The shared data layer (``data.plan_updates``) decides *which* samples form an update; how they are laid
out inside the update does not change it: the update's loss is the token-weighted sum over its samples,
so it is the same whether a sample sits alone in a padded row or next to others in a packed one, as long
as attention never crosses samples and positions restart per sample. Packing then buys two things:

* little compute on padding: samples are placed first-fit-decreasing into rows of ``row_length``
  tokens, so an update of eight samples of 32..512 tokens costs ~5 rows of 512, not 8;
* few compilations: the update is always ``[A, R, T]`` with ``A`` fixed by the batch size. Empty
  micro-batches come last and the train step skips them at run time, so the number of rows an update
  needs never changes the shape.

A packed row carries segment ids in ``attention_mask`` (1, 2, ... per sample, 0 for padding; see
``models.attention.masks.make_attention_mask``), and each sample's first label is set to -100: the token before
it belongs to another sample and must not be trained to predict it (it never carries loss unpacked
either, where the shift drops position 0).
"""

from __future__ import annotations

import math

import numpy as np

from itersft_jax.shared.data import IGNORE_INDEX, Example
from itersft_jax.shared.datum import TARGETS, Datum

MIN_TOKENS_PER_ROW_GROUP = 512  # per device: rows of short samples are grouped so a micro-batch stays a GEMM


def rows_per_micro_batch(row_length: int, num_devices: int = 1, rows_per_device: int | None = None) -> int:
    """Rows of one micro-batch, a multiple of the device count so the rows shard evenly:
    ``rows_per_device`` per device when given (accelerators: the per-device batch size), else enough for
    ``MIN_TOKENS_PER_ROW_GROUP`` tokens per device (CPUs)."""
    if rows_per_device is None:
        rows_per_device = max(1, math.ceil(MIN_TOKENS_PER_ROW_GROUP / row_length))
    return num_devices * rows_per_device


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``capacity`` tokens, longest first."""
    bins: list[list[int]] = []
    space: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > capacity:
            raise ValueError(f"sample of {lengths[i]} tokens does not fit a row of {capacity}")
        for b, free in enumerate(space):
            if lengths[i] <= free:
                bins[b].append(i)
                space[b] -= lengths[i]
                break
        else:
            bins.append([i])
            space.append(capacity - lengths[i])
    return bins


def pack_update(micro_batches: list[list[Example]], *, row_length: int, rows: int, num_micro_batches: int,
                pad_id: int = 0) -> tuple[dict[str, np.ndarray], int]:
    """One update's samples packed into ``[num_micro_batches, rows, row_length]`` int32 arrays.

    Returns the arrays (``input_ids``, ``attention_mask`` holding segment ids, ``labels``) and the number
    of leading micro-batches that hold any token (the rest are all padding, skipped by the step).
    """
    examples = [ex for mb in micro_batches for ex in mb]
    arrays, used, places = pack_sequences([{"input_ids": ex.input_ids, "labels": ex.labels} for ex in examples],
                                          fill={"input_ids": (pad_id, np.int32), "labels": (IGNORE_INDEX, np.int32)},
                                          row_length=row_length, rows=rows, num_micro_batches=num_micro_batches)
    for a, m, start, _ in places:
        arrays["labels"][a, m, start] = IGNORE_INDEX  # predicted from another sample's last token: no loss
    return arrays, used


def pack_sequences(sequences: list[dict[str, np.ndarray]], *, fill: dict[str, tuple], row_length: int, rows: int,
                   num_micro_batches: int) -> tuple[dict[str, np.ndarray], int, list[tuple[int, int, int, int]]]:
    """Sequences (dicts of equally long arrays, keys as in ``fill``: ``{key: (pad value, dtype)}``, one of them
    ``input_ids``) placed first-fit-decreasing into ``[num_micro_batches, rows, row_length]`` arrays, plus
    ``attention_mask`` holding segment ids. Returns the arrays, the number of micro-batches holding a token and
    each sequence's place ``(micro-batch, row, start, length)``, in the order given."""
    row_bins = first_fit_decreasing([len(seq["input_ids"]) for seq in sequences], row_length)
    used = math.ceil(len(row_bins) / rows)
    if used > num_micro_batches:
        raise ValueError(f"{len(row_bins)} packed rows do not fit {num_micro_batches} micro-batches of {rows}")
    shape = (num_micro_batches, rows, row_length)
    arrays = {key: np.full(shape, value, dtype) for key, (value, dtype) in fill.items()}
    arrays["attention_mask"] = np.zeros(shape, np.int32)
    places: list = [None] * len(sequences)
    for r, members in enumerate(row_bins):
        a, m = divmod(r, rows)
        start = 0
        for segment, i in enumerate(members, start=1):
            end = start + len(sequences[i]["input_ids"])
            for key, value in sequences[i].items():
                arrays[key][a, m, start:end] = value
            arrays["attention_mask"][a, m, start:end] = segment
            places[i] = (a, m, start, end - start)
            start = end
    return arrays, used, places


def pack_data(data: list[Datum], *, row_length: int, rows: int, num_micro_batches: int, pad_id: int = 0):
    """``Datum`` s packed like ``pack_update``: ``input_ids`` (``model_input``), segment ids, ``target_tokens``
    (int32; already aligned, so no label is dropped at a segment's start) and the float inputs (fp32; zeros on
    padding). Returns ``(arrays, micro-batches holding a token, places)`` as ``pack_sequences``."""
    keys = sorted({k for d in data for k in d.loss_fn_inputs})
    fill = {"input_ids": (pad_id, np.int32), **{k: (0, np.int32 if k == TARGETS else np.float32) for k in keys}}
    sequences = [{"input_ids": d.model_input, **{k: d.loss_fn_inputs.get(k, 0) for k in keys}} for d in data]
    return pack_sequences(sequences, fill=fill, row_length=row_length, rows=rows,
                          num_micro_batches=num_micro_batches)
