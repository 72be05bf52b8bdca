"""Evaluation, written once for both engines: the forms an eval dataset takes, and one evaluation's metrics.

``Evaluator.run`` prepares the samples (any ``step()`` input form, or an ``eval_dataset`` with columns named like
``step()``'s arguments), asks the engine for the summed loss (``Engine.eval_loss``) and, with ``compute_metrics``,
for predictions batch by batch (``Engine.eval_predictions``); the flow logs the result and fires ``on_evaluate``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
from transformers import EvalPrediction

from itersft_jax.shared.data import Example

if TYPE_CHECKING:
    from itersft_jax.shared.engine import Engine, FlowHost

logger = logging.getLogger(__name__)

# Columns of an eval dataset, named like step()'s arguments (or their singular).
_DATASET_COLUMNS = {"input_ids": "input_ids", "attention_mask": "attention_mask", "labels": "labels",
                    "texts": "texts", "text": "texts", "texts_labels": "texts_labels",
                    "prompts": "prompts", "prompt": "prompts", "completions": "completions",
                    "completion": "completions"}


def dataset_forms(dataset) -> dict:
    """Columns of an eval dataset (a dict of columns, a ``datasets.Dataset``, or a list of row dicts as
    ``transformers.Trainer`` takes) as ``step()`` keyword arguments."""
    if dataset is None:
        raise ValueError("evaluate() needs samples: pass them like step()'s arguments, or an `eval_dataset`")
    if isinstance(dataset, (list, tuple)) and dataset and all(isinstance(row, dict) for row in dataset):
        keys = set(dataset[0])
        if any(set(row) != keys for row in dataset):
            raise ValueError("`eval_dataset` rows must all have the same keys")
        dataset = {k: [row[k] for row in dataset] for k in keys}
    if isinstance(dataset, (list, tuple)):
        raise TypeError(f"`eval_dataset` given as a list must hold row dicts (e.g. [{{'text': ...}}, ...]), got "
                        f"{type(dataset[0]).__name__ if dataset else 'an empty list'}")
    columns = set(getattr(dataset, "column_names", None) or (dataset.keys() if isinstance(dataset, dict) else ()))
    if not columns:
        raise TypeError(f"`eval_dataset` must be a dict or a datasets.Dataset, got {type(dataset).__name__}")
    known = sorted(c for c in columns if c in _DATASET_COLUMNS)
    for form in set(_DATASET_COLUMNS.values()):
        both = [c for c in known if _DATASET_COLUMNS[c] == form]
        if len(both) > 1:
            raise ValueError(f"`eval_dataset` has both columns {both}, which mean the same input ({form}): keep one")
    forms = {_DATASET_COLUMNS[c]: list(dataset[c]) for c in known}
    if not forms:
        raise ValueError(f"`eval_dataset` has none of the columns {sorted(_DATASET_COLUMNS)}; got {sorted(columns)}")
    return forms


def _pad_concat(arrays: list[np.ndarray]) -> np.ndarray:
    """Batches ``[B_i, T_i, ...]`` stacked along axis 0, shorter ones padded with -100 on axis 1 (transformers'
    ``nested_concat`` convention)."""
    if arrays[0].ndim < 2:
        return np.concatenate(arrays)
    length = max(a.shape[1] for a in arrays)
    padded = [np.pad(a, [(0, 0), (0, length - a.shape[1])] + [(0, 0)] * (a.ndim - 2), constant_values=-100)
              for a in arrays]
    return np.concatenate(padded)


class Evaluator:
    """One evaluation's metrics on the held-out samples, through the engine's ``eval_loss`` / ``eval_predictions``;
    the trainer (``host``) holds ``eval_dataset``, ``compute_metrics`` and ``args``."""

    def __init__(self, host: FlowHost, engine: Engine):
        self.host, self.engine = host, engine

    def check_dataset(self) -> None:
        """Prepare the trainer's ``eval_dataset`` once when the trainer is built (then dropped), so a sample evaluate()
        cannot take — ids outside the vocabulary, one longer than the position table — is refused before any update
        rather than at the first evaluation, after updates were applied."""
        if self.host.eval_dataset is not None:
            self.engine.prepare_examples(**dataset_forms(self.host.eval_dataset))

    def run(self, forms: dict, eval_dataset, metric_key_prefix: str) -> dict[str, float]:
        """``{prefix}_loss``, ``{prefix}_num_tokens``, ``{prefix}_samples``, ``{prefix}_seconds`` and, with
        ``compute_metrics``, its results (prefixed)."""
        host, engine = self.host, self.engine
        if not isinstance(metric_key_prefix, str):
            raise TypeError(f"`metric_key_prefix` must be a str, got {type(metric_key_prefix).__name__}")
        start = time.perf_counter()
        if all(v is None for v in forms.values()):
            forms = dataset_forms(eval_dataset if eval_dataset is not None else host.eval_dataset)
        examples = engine.prepare_examples(**forms)
        loss_sum, tokens = engine.eval_loss(examples)
        metrics = {f"{metric_key_prefix}_loss": loss_sum / max(tokens, 1), f"{metric_key_prefix}_num_tokens": tokens,
                   f"{metric_key_prefix}_samples": len(examples)}
        if host.compute_metrics is not None and not host.args.prediction_loss_only:
            computed = self._compute_metrics(examples)
            if not isinstance(computed, dict):
                raise TypeError(f"`compute_metrics` must return a dict of metrics, got {type(computed).__name__}")
            for key, value in computed.items():
                name = key if key.startswith(f"{metric_key_prefix}_") else f"{metric_key_prefix}_{key}"
                if name in metrics:  # the measured loss and counts stay (transformers' order: they are set last)
                    logger.warning("evaluate(): compute_metrics returned %r, which evaluate() computes itself; "
                                   "its own value is kept", key)
                    continue
                metrics[name] = value
        metrics[f"{metric_key_prefix}_seconds"] = time.perf_counter() - start
        return metrics

    def _compute_metrics(self, examples: list[Example]) -> dict:
        """``compute_metrics(EvalPrediction(predictions, label_ids))``, predictions gathered batch by batch on the
        host (logits ``[N, T, V]``, or what ``preprocess_logits_for_metrics`` makes of them), -100-padded."""
        predictions, label_ids = [], []
        for preds, batch_labels in self.engine.eval_predictions(examples):
            predictions.append(np.asarray(preds))
            label_ids.append(np.asarray(batch_labels))
        return self.host.compute_metrics(EvalPrediction(predictions=_pad_concat(predictions),
                                                        label_ids=_pad_concat(label_ids)))
