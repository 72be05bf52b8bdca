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
    row_bins = first_fit_decreasing([len(ex.input_ids) for ex in examples], row_length)
    used = math.ceil(len(row_bins) / rows)
    if used > num_micro_batches:
        raise ValueError(f"{len(row_bins)} packed rows do not fit {num_micro_batches} micro-batches of {rows}")
    shape = (num_micro_batches, rows, row_length)
    input_ids = np.full(shape, pad_id, np.int32)
    segments = np.zeros(shape, np.int32)
    labels = np.full(shape, IGNORE_INDEX, np.int32)
    for r, members in enumerate(row_bins):
        a, m = divmod(r, rows)
        start = 0
        for segment, i in enumerate(members, start=1):
            ex = examples[i]
            end = start + len(ex.input_ids)
            input_ids[a, m, start:end] = ex.input_ids
            segments[a, m, start:end] = segment
            labels[a, m, start:end] = ex.labels
            labels[a, m, start] = IGNORE_INDEX  # predicted from another sample's last token: no loss
            start = end
    return {"input_ids": input_ids, "attention_mask": segments, "labels": labels}, used
