"""The trainer contract both engines share: ``step()``'s statistics, what is due after an update, and the callback flow.

Both ``IterativeSFTTrainer`` classes (JAX and PyTorch) inherit :class:`TrainerShell`; an engine supplies only
what is particular to it — how one optimizer update runs, how its metrics reach the host, how a checkpoint is
written and how held-out samples are scored. Everything else is written once here:

* :class:`StepStats`, the dict ``step()`` returns;
* :class:`IterativeFlowCallback`, transformers' ``DefaultFlowCallback`` for ``step()``-driven training: the rules
  that say when a log, an evaluation or a checkpoint is due;
* the event flow of transformers' ``TrainerCallback`` protocol, driven by a real ``CallbackHandler``,
  ``TrainerState`` and ``TrainerControl`` (so ``report_to`` integrations and user callbacks work on both engines);
* the non-finite guard's accounting (``skipped_updates``, ``max_skipped_updates``) and ``evaluate()``.

Events, in order: ``on_init_end`` when the trainer is built; ``on_train_begin`` at the first ``step()`` call
(and the first one after ``end_training()``); per call ``on_epoch_begin`` (an "epoch" is one ``step()`` call: one
pass over its samples), per update ``on_step_begin`` / ``on_step_end`` followed by whatever the flags of
``control`` ask for — ``on_log``, ``on_evaluate``, ``on_save`` in that order —, then ``on_epoch_end`` (and what it
asks for); ``on_train_end`` at ``end_training()``.

Imports neither jax nor torch itself (``transformers.TrainingArguments`` already imports torch when installed).
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from transformers import EvalPrediction
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, TrainerCallback

from itersft_jax.shared.data import Example
from itersft_jax.shared.fields import counts_input_tokens, enum_name, input_token_stats
from itersft_jax.shared.interrupts import deferred_interrupt
from itersft_jax.shared.low_level import LowLevelAPI

logger = logging.getLogger(__name__)

PROGRESS_BAR_MIN_UPDATES = 8  # a call making at least this many updates shows a tqdm bar
TRAIN_NOT_SUPPORTED = (
    "IterativeSFTTrainer trains through `step(...)`, one call per batch your loop produces (input_ids / texts / "
    "prompts+completions). To train on a dataset, use transformers.Trainer or trl.SFTTrainer.")
# Columns of an eval dataset, named like step()'s arguments (or their singular).
_DATASET_COLUMNS = {"input_ids": "input_ids", "attention_mask": "attention_mask", "labels": "labels",
                    "texts": "texts", "text": "texts", "texts_labels": "texts_labels",
                    "prompts": "prompts", "prompt": "prompts", "completions": "completions",
                    "completion": "completions"}


class StepStats(dict):
    """What ``step()`` returns, on either engine (a plain ``dict`` with these keys):

    ``loss`` token-weighted mean cross-entropy over the call's applied updates (NaN when none was applied);
    ``learning_rate``, ``grad_norm`` of the call's last update (grad norm before clipping); ``num_tokens`` label
    tokens trained on; ``samples`` samples kept; ``updates`` optimizer updates applied in this call;
    ``skipped_updates`` updates skipped as non-finite; ``global_step`` updates applied in total; ``seconds`` wall
    time of the call; ``tokens_per_second`` non-padding input tokens per second; ``padded_tokens`` input positions
    computed, padding included. A MoE model with ``output_router_logits`` also reports ``aux_loss``, the mean over the
    applied updates of each update's load-balancing loss (unscaled; ``loss`` includes ``router_aux_loss_coef`` times
    it, as transformers' does).
    """

    KEYS = ("loss", "learning_rate", "grad_norm", "num_tokens", "samples", "updates", "skipped_updates",
            "global_step", "seconds", "tokens_per_second", "padded_tokens")


@dataclasses.dataclass
class UpdateRecord:
    """One dispatched update: ``metrics`` (``loss``, ``grad_norm``, ``learning_rate``, ``num_tokens``, ``skipped``;
    device arrays on the JAX engine until the next sync) and what the host already knows."""

    metrics: dict[str, Any]
    input_tokens: int  # non-padding input tokens
    padded_tokens: int  # input positions computed, padding included


class IterativeFlowCallback(DefaultFlowCallback):
    """``DefaultFlowCallback`` for ``step()``-driven training: the rules for what is due after an update.

    After each update (``on_step_end``): a log when ``logging_strategy="steps"`` and ``global_step`` is a multiple
    of ``logging_steps``, or at update 1 with ``logging_first_step``; an evaluation when ``eval_strategy="steps"``,
    ``global_step`` is a multiple of ``eval_steps`` and at least ``eval_delay``; a checkpoint when
    ``save_strategy="steps"`` and ``global_step`` is a multiple of ``save_steps``; at exactly ``global_step ==
    max_steps`` (``max_steps > 0``) a final checkpoint and evaluation for the "steps" strategies. After each
    ``step()`` call (``on_epoch_end``): whatever uses the ``"epoch"`` strategy. Unlike ``DefaultFlowCallback``
    it never stops training at ``max_steps``: the user's loop decides when to stop.
    """

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step == 1 and args.logging_first_step:
            control.should_log = True
        if enum_name(args.logging_strategy) == "steps" and _every(step, state.logging_steps):
            control.should_log = True
        evaluate_steps = enum_name(args.eval_strategy) == "steps" and args.eval_delay <= step
        if evaluate_steps and _every(step, state.eval_steps):
            control.should_evaluate = True
        if enum_name(args.save_strategy) == "steps" and _every(step, state.save_steps):
            control.should_save = True
        if args.max_steps > 0 and step == args.max_steps:
            control.should_save |= enum_name(args.save_strategy) == "steps"
            control.should_evaluate |= evaluate_steps
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        control.should_log |= enum_name(args.logging_strategy) == "epoch"
        control.should_evaluate |= enum_name(args.eval_strategy) == "epoch" and args.eval_delay <= state.epoch
        control.should_save |= enum_name(args.save_strategy) == "epoch"
        return control


def _every(step: int, every) -> bool:
    return bool(every) and every > 0 and step % int(every) == 0


def make_callback_handler(args, callbacks, *, model, processing_class, optimizer, lr_scheduler) -> CallbackHandler:
    """transformers' ``CallbackHandler`` with the flow rules, the ``report_to`` integrations (transformers' own
    callbacks) and the user's ``callbacks`` (instances or classes), in that order."""
    from transformers.integrations import get_reporting_integration_callbacks

    default = [IterativeFlowCallback, *get_reporting_integration_callbacks(args.report_to)]
    return CallbackHandler(default + list(callbacks or []), model, processing_class, optimizer, lr_scheduler)


def validate_shell_args(args, eval_dataset) -> None:
    """ValueError naming the field for a cadence the trainer cannot follow (checked when it is built)."""
    if enum_name(args.eval_strategy) != "no" and eval_dataset is None:
        raise ValueError(f"`eval_strategy`={enum_name(args.eval_strategy)!r} evaluates on `eval_dataset`, which is "
                         f"not given: pass `eval_dataset` or set eval_strategy='no'")


def check_trainer_arguments(*, processing_class, callbacks, optimizers, peft_config, eval_dataset) -> None:
    """``TypeError``/``ValueError`` naming the constructor argument that no trainer can use, raised before anything
    is loaded (each engine checks the types inside ``optimizers`` itself): a ``processing_class`` that is no
    tokenizer or processor, ``callbacks`` that are not ``TrainerCallback`` s, ``optimizers`` that is not a pair,
    a ``peft_config`` that is not a ``peft.PeftConfig``, an ``eval_dataset`` without the columns ``evaluate`` reads."""
    if processing_class is not None and not _is_processing_class(processing_class):
        raise TypeError(f"`processing_class` must be a tokenizer or processor (e.g. AutoTokenizer.from_pretrained("
                        f"...)), got {type(processing_class).__name__}: {processing_class!r}"[:300])
    if callbacks is not None:
        if not isinstance(callbacks, (list, tuple)):
            raise TypeError(f"`callbacks` must be a list of TrainerCallback instances or classes, got "
                            f"{type(callbacks).__name__}")
        for i, callback in enumerate(callbacks):
            is_class = isinstance(callback, type) and issubclass(callback, TrainerCallback)
            if not (is_class or isinstance(callback, TrainerCallback)):
                raise TypeError(f"`callbacks[{i}]` must be a transformers.TrainerCallback instance or class, got "
                                f"{type(callback).__name__}: {callback!r}"[:300])
    if optimizers is not None and not isinstance(optimizers, (list, tuple)) and not hasattr(optimizers, "update"):
        raise TypeError(f"`optimizers` must be a pair (optimizer, scheduler), got {type(optimizers).__name__}")
    if isinstance(optimizers, (list, tuple)) and len(optimizers) != 2:
        raise TypeError(f"`optimizers` must be a pair (optimizer, scheduler), got {len(optimizers)} items")
    if peft_config is not None:
        try:
            from peft import PeftConfig
        except ImportError:
            raise ImportError("`peft_config` needs the peft package: pip install peft (or itersft[peft])") from None
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"`peft_config` must be a peft config (e.g. peft.LoraConfig(r=8, ...)), got "
                            f"{type(peft_config).__name__}: {peft_config!r}"[:300])
    if eval_dataset is not None:
        dataset_forms(eval_dataset)


def _is_processing_class(value) -> bool:
    from transformers import PreTrainedTokenizerBase, ProcessorMixin

    if isinstance(value, (PreTrainedTokenizerBase, ProcessorMixin)):
        return True
    return callable(value) and callable(getattr(value, "batch_decode", None)) and not isinstance(value, type)


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


class TrainerShell(LowLevelAPI):
    """The engine-independent half of ``IterativeSFTTrainer`` (mixed into both engines' trainers): the engine
    contract. An engine sets ``args``, ``state`` (``TrainerState``), ``control`` (``TrainerControl``),
    ``callback_handler``, ``eval_dataset``, ``compute_metrics``, calls :meth:`_init_shell`, and implements the
    abstract methods below; its ``step()`` calls :meth:`_run_call`. ``_metrics_on_host`` says whether an update's
    metrics are host values as soon as it returns (PyTorch) or device values read at the next sync (JAX).
    """

    _metrics_on_host = True

    # ------------------------------------------------------------------------------------------------------
    # What each engine implements

    @abc.abstractmethod
    def step(self, input_ids=None, attention_mask=None, labels=None, texts=None, texts_labels=None, prompts=None,
             completions=None) -> StepStats:
        """Train on one batch of samples (the ``step()`` contract); returns the call's :class:`StepStats`."""

    @abc.abstractmethod
    def generate(self, *args, **kwargs):
        """Sample completions from the live parameters; returns a ``GenerationOutput``."""

    @abc.abstractmethod
    def save_model(self, output_dir: str | None = None, *args, **kwargs):
        """Write the model as a Hugging Face directory (with the tokenizer)."""

    @abc.abstractmethod
    def _prepare_examples(self, **forms) -> list[Example]:
        """``step()``'s input forms -> checked, tokenized, truncated ``Example`` s (the shared data layer)."""

    @abc.abstractmethod
    def _fetch(self, metrics: list[dict]) -> list[dict]:
        """Dispatched updates' metrics as host values (the JAX engine's one device -> host sync per call)."""

    @abc.abstractmethod
    def _save_for_flow(self) -> None:
        """Write the checkpoint the callback flow asks for (``control.should_save``)."""

    @abc.abstractmethod
    def _eval_loss(self, examples: list[Example]) -> tuple[float, int]:
        """``(summed cross-entropy, label tokens)`` of held-out samples, parameters unchanged."""

    @abc.abstractmethod
    def _eval_predictions(self, examples: list[Example]) -> Iterable[tuple[Any, Any]]:
        """``(predictions, labels)`` batch by batch for ``compute_metrics``."""

    def _init_shell(self) -> None:
        self._calls = 0  # successful step() calls: seeds the shuffle
        self._generate_calls = 0  # unseeded generate() calls: seeds the sampling
        self._training = False  # between on_train_begin and on_train_end
        self._warned_max_steps = False
        self._skipped_in_a_row = 0
        self._unread: list[UpdateRecord] = []  # dispatched, metrics not on the host yet
        self._call_metrics: list[dict] = []  # host metrics of the current call
        self._window = {"loss_sum": 0.0, "tokens": 0, "input_tokens": 0, "seconds": 0.0}  # since the last log
        self._clock = time.perf_counter()
        self._pending = None  # the low-level API's accumulated, unapplied update (shared.low_level)

    def _record_update(self, metrics: dict, input_tokens: int, padded_tokens: int) -> None:
        self._unread.append(UpdateRecord(metrics, input_tokens, padded_tokens))

    # ------------------------------------------------------------------------------------------------------
    # Counters and callbacks

    def next_generation_call(self) -> int:
        """Index of this unseeded ``generate()`` call (0, 1, ...); advances the counter."""
        index = self._generate_calls
        self._generate_calls += 1
        return index

    def counters(self) -> dict[str, Any]:
        """The shell's counters, JSON-serializable: optimizer updates, step() calls (they seed the shuffle), the log
        history and the tokens seen — what a checkpoint keeps beside the weights and optimizer state."""
        return {"global_step": self.state.global_step, "calls": self._calls,
                "log_history": list(self.state.log_history),
                "num_input_tokens_seen": self.state.num_input_tokens_seen}

    def restore_counters(self, counters: dict[str, Any]) -> None:
        """Set the counters from :meth:`counters`' output, so the next call continues where that one was."""
        self.state.global_step = int(counters["global_step"])
        self._calls = int(counters["calls"])
        self.state.log_history = list(counters.get("log_history", []))
        self.state.num_input_tokens_seen = counters.get("num_input_tokens_seen")

    def add_callback(self, callback: type[TrainerCallback] | TrainerCallback) -> None:
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback):
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback) -> None:
        self.callback_handler.remove_callback(callback)

    def train(self, *args, **kwargs):
        raise NotImplementedError(TRAIN_NOT_SUPPORTED)

    def end_training(self) -> None:
        """Fire ``on_train_end`` (closes the ``report_to`` writers); a later ``step()`` begins a new training."""
        if self._training:
            self._training = False
            self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Append ``logs`` (plus ``epoch`` and ``step``) to ``state.log_history`` and send them to ``on_log``."""
        del start_time  # transformers' signature; speed is logged per window as tokens_per_second
        logs = dict(logs)
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        if counts_input_tokens(self.args):
            logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

    # ------------------------------------------------------------------------------------------------------
    # One step() call

    def _run_call(self, updates: list, run_update: Callable[[Any], UpdateRecord], *, samples: int) -> StepStats:
        """Run a call's planned ``updates`` through ``run_update`` with the callback flow around each one."""
        start = self._clock = time.perf_counter()
        args, handler = self.args, self.callback_handler
        self._calls += 1
        if args.max_steps > 0 and self.state.global_step + len(updates) > args.max_steps and not self._warned_max_steps:
            self._warned_max_steps = True
            logger.warning("step(): max_steps=%d updates reached: the learning-rate schedule is exhausted and further "
                           "updates use its final value (0 for linear/cosine decay). Raise `max_steps`, or use "
                           "max_steps=-1 (warmup, then constant) for open-ended iterative training.", args.max_steps)
        if not self._training:
            self._training = True
            self.control = handler.on_train_begin(args, self.state, self.control)
        self.control.should_training_stop = self.control.should_epoch_stop = False
        self.control = handler.on_epoch_begin(args, self.state, self.control)
        self._call_metrics = []
        padded = seen = ran = 0
        bar = tqdm(total=len(updates), desc="step", unit="update", leave=False,
                   disable=(len(updates) < PROGRESS_BAR_MIN_UPDATES or bool(args.disable_tqdm)
                            or not self.state.is_world_process_zero))  # one bar per run, not per process
        for k, update in enumerate(updates):
            self.control = handler.on_step_begin(args, self.state, self.control)
            # An update and its bookkeeping together: a Ctrl-C lands after them, never between (the call then ends
            # with the updates before it applied and counted).
            with deferred_interrupt():
                record = run_update(update)
                ran += 1
                padded += record.padded_tokens
                seen += record.input_tokens
                self._unread.append(record)
                self.state.global_step += 1  # provisional on the JAX engine until the next sync (skips)
                self.state.epoch = self._calls - 1 + (k + 1) / len(updates)
                self.state.num_input_tokens_seen = (self.state.num_input_tokens_seen or 0) + record.input_tokens
            bar.update(1)
            if self._metrics_on_host and self._sync():
                continue  # skipped: no step completed, nothing is due
            self.control = handler.on_step_end(args, self.state, self.control)
            self._act_on_control()
            if self.control.should_training_stop or self.control.should_epoch_stop:
                if k + 1 < len(updates):
                    logger.warning("step(): a callback stopped training; %d of the call's %d updates were not run",
                                   len(updates) - k - 1, len(updates))
                break
        bar.close()
        self._sync()
        now = time.perf_counter()
        self._window["seconds"] += now - self._clock  # the time between calls is not training time
        self._clock = now
        self.control = handler.on_epoch_end(args, self.state, self.control)
        self._act_on_control()
        return self._call_stats(start, samples=samples, ran=ran, padded=padded, seen=seen)

    def _sync(self) -> int:
        """Read the unread updates' metrics (the JAX engine's host sync), count skipped updates and correct
        ``global_step`` for them; returns how many were skipped."""
        if not self._unread:
            return 0
        fetched = self._fetch([r.metrics for r in self._unread])  # may wait on the device: nothing changed yet
        records, self._unread = self._unread, []
        skipped = 0
        for record, m in zip(records, fetched):
            m = {k: float(v) for k, v in m.items()}
            self._call_metrics.append(m)
            self._window["input_tokens"] += record.input_tokens
            if m.get("skipped", 0):
                skipped += 1
                self._skipped_in_a_row += 1
                self.state.global_step -= 1
                limit = self.args.max_skipped_updates
                if limit is not None and self._skipped_in_a_row >= limit:
                    raise RuntimeError(
                        f"step(): {self._skipped_in_a_row} updates in a row had a non-finite loss or gradient norm "
                        f"(last: loss {m['loss']}, grad norm {m['grad_norm']}) and were skipped "
                        f"(`max_skipped_updates`={limit}); parameters and optimizer state are those of the last "
                        f"finite update. Check the data, the learning rate and the model's weights.")
            else:
                self._skipped_in_a_row = 0
                self._window["loss_sum"] += m["loss"] * m["num_tokens"]
                self._window["tokens"] += int(m["num_tokens"])
        return skipped

    def _act_on_control(self) -> None:
        """Do what ``control`` asks for after an update or a call: log, evaluate, save (transformers' order)."""
        if not (self.control.should_log or self.control.should_evaluate or self.control.should_save):
            return
        if self._sync():  # the update this was due for was skipped: its step number comes again
            self.control.should_log = self.control.should_evaluate = self.control.should_save = False
            return
        self._window["seconds"] += time.perf_counter() - self._clock  # after the sync: the device work is done
        if self.control.should_log:
            self._log_window()
        if self.control.should_evaluate:
            metrics = self.evaluate()
            if enum_name(self.args.save_strategy) == "best":
                self.control.should_save = self._determine_best_metric(metrics=metrics, trial=None)
        if self.control.should_save:
            self._save_for_flow()
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        self._clock = time.perf_counter()  # evaluation and saving are not training time

    def _log_window(self) -> None:
        window = self._window
        if window["tokens"] == 0:  # nothing trained since the last log
            self.control.should_log = False
            return
        last = self._call_metrics[-1]
        seconds = window["seconds"]
        self.log({"loss": window["loss_sum"] / window["tokens"], "grad_norm": last["grad_norm"],
                  "learning_rate": last["learning_rate"], "num_tokens": window["tokens"],
                  "tokens_per_second": window["input_tokens"] / seconds if seconds > 0 else math.inf})
        self._window = {"loss_sum": 0.0, "tokens": 0, "input_tokens": 0, "seconds": 0.0}

    def _call_stats(self, start: float, *, samples: int, ran: int, padded: int, seen: int) -> StepStats:
        host = self._call_metrics
        applied = [m for m in host if not m.get("skipped", 0)]
        skipped = len(host) - len(applied)
        tokens = sum(int(m["num_tokens"]) for m in applied)
        if skipped:
            logger.warning("step(): %d of %d updates had a non-finite loss or gradient norm and were skipped "
                           "(parameters, optimizer state and global_step unchanged by them)", skipped, ran)
        seconds = time.perf_counter() - start
        balanced = [m["aux_loss"] for m in applied if "aux_loss" in m]  # a MoE's load-balancing loss
        extra = {"aux_loss": sum(balanced) / len(balanced)} if balanced else {}
        return StepStats(
            loss=sum(m["loss"] * m["num_tokens"] for m in applied) / tokens if tokens else math.nan,
            learning_rate=host[-1]["learning_rate"] if host else math.nan,
            grad_norm=host[-1]["grad_norm"] if host else math.nan,
            num_tokens=tokens, samples=samples, updates=len(applied), skipped_updates=skipped,
            global_step=int(self.state.global_step), seconds=seconds,
            tokens_per_second=seen / seconds if seconds > 0 else math.inf, padded_tokens=padded,
            **input_token_stats(self.args, self.state), **extra)

    # ------------------------------------------------------------------------------------------------------
    # Evaluation

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", *, input_ids=None,
                 attention_mask=None, labels=None, texts=None, texts_labels=None, prompts=None,
                 completions=None) -> dict[str, float]:
        """Token-weighted mean cross-entropy on held-out samples, without changing the parameters.

        Pass the samples in any ``step()`` input form, or an ``eval_dataset`` (default: the trainer's) — a dict or
        ``datasets.Dataset`` with columns named like ``step()``'s arguments (``input_ids`` [+ ``attention_mask``,
        ``labels``], ``texts``/``text``, or ``prompts``/``prompt`` + ``completions``/``completion``). Returns
        ``{prefix}_loss``, ``{prefix}_num_tokens``, ``{prefix}_samples``, ``{prefix}_seconds`` and, with
        ``compute_metrics``, its results (prefixed); logs them and fires ``on_evaluate``.
        """
        del ignore_keys  # transformers' signature
        if not isinstance(metric_key_prefix, str):
            raise TypeError(f"`metric_key_prefix` must be a str, got {type(metric_key_prefix).__name__}")
        start = time.perf_counter()
        forms = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, texts=texts,
                     texts_labels=texts_labels, prompts=prompts, completions=completions)
        if all(v is None for v in forms.values()):
            forms = dataset_forms(eval_dataset if eval_dataset is not None else self.eval_dataset)
        examples = self._prepare_examples(**forms)
        loss_sum, tokens = self._eval_loss(examples)
        metrics = {f"{metric_key_prefix}_loss": loss_sum / max(tokens, 1), f"{metric_key_prefix}_num_tokens": tokens,
                   f"{metric_key_prefix}_samples": len(examples)}
        if self.compute_metrics is not None and not self.args.prediction_loss_only:
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
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _check_eval_dataset(self) -> None:
        """Prepare the trainer's ``eval_dataset`` once when it is built (then dropped), so a sample evaluate() cannot
        take — ids outside the vocabulary, one longer than the position table — is refused before any update rather
        than at the first evaluation, after updates were applied."""
        if self.eval_dataset is not None:
            self._prepare_examples(**dataset_forms(self.eval_dataset))

    def _compute_metrics(self, examples: list[Example]) -> dict:
        """``compute_metrics(EvalPrediction(predictions, label_ids))``, predictions gathered batch by batch on the
        host (logits ``[N, T, V]``, or what ``preprocess_logits_for_metrics`` makes of them), -100-padded."""
        predictions, label_ids = [], []
        for preds, batch_labels in self._eval_predictions(examples):
            predictions.append(np.asarray(preds))
            label_ids.append(np.asarray(batch_labels))
        return self.compute_metrics(EvalPrediction(predictions=_pad_concat(predictions),
                                                   label_ids=_pad_concat(label_ids)))

    def _eval_batches(self, examples: list[Example], rows: int) -> Iterable[list[Example]]:
        for i in range(0, len(examples), rows):
            yield examples[i:i + rows]
