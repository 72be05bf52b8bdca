"""The backend-neutral trainer flow, written once: the call template of ``step()``, the per-update callback flow
(shared by ``step()`` and the low-level ``optim_step()``), the host sync of update metrics, logging, the evaluation and
checkpoint cadence, and the counters.

``TrainerFlow`` drives two objects through declared protocols (``shared.engine``): the trainer, a ``FlowHost`` (the
configuration, transformers' ``TrainerState`` / ``TrainerControl``, the callback handler, checkpoints on the cadence),
and its engine, an ``Engine`` (``itersft_jax.engine.JaxEngine``, ``itersft_torch.engine.TorchEngine``: how updates,
passes and evaluations run). It owns the flow's own state: ``step()`` calls (they seed the
shuffle), unseeded ``generate()`` calls, the updates dispatched and not yet read, the logging window, the
non-finite guard's count and the low-level API's pending update.

* :class:`StepStats`, the dict ``step()`` returns;
* :class:`IterativeFlowCallback`, transformers' ``DefaultFlowCallback`` for ``step()``-driven training: the rules
  that say when a log, an evaluation or a checkpoint is due;
* the event flow of transformers' ``TrainerCallback`` protocol, driven by a real ``CallbackHandler``,
  ``TrainerState`` and ``TrainerControl`` (so ``report_to`` integrations and user callbacks work on both engines).

Events, in order: ``on_init_end`` when the trainer is built; ``on_train_begin`` at the first ``step()`` call
(and the first one after ``end_training()``); per call ``on_epoch_begin`` (an "epoch" is one ``step()`` call: one
pass over its samples), per update ``on_step_begin`` / ``on_step_end`` followed by whatever the flags of
``control`` ask for — ``on_log``, ``on_evaluate``, ``on_save`` in that order —, then ``on_epoch_end`` (and what it
asks for); ``on_train_end`` at ``end_training()``.

Imports neither jax nor torch itself (``transformers.TrainingArguments`` already imports torch when installed).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, TrainerCallback

from itersft_jax.shared.data import plan_updates, warn_beyond_positions
from itersft_jax.shared.engine import Engine, FlowHost, PendingUpdate, UpdateRecord
from itersft_jax.shared.evaluation import Evaluator, dataset_forms
from itersft_jax.shared.fields import counts_input_tokens, enum_name, input_token_stats, shuffle_seed
from itersft_jax.shared.interrupts import deferred_interrupt

logger = logging.getLogger(__name__)

PROGRESS_BAR_MIN_UPDATES = 8  # a call making at least this many updates shows a tqdm bar
TRAIN_NOT_SUPPORTED = (
    "IterativeSFTTrainer trains through `step(...)`, one call per batch your loop produces (input_ids / texts / "
    "prompts+completions). To train on a dataset, use transformers.Trainer or trl.SFTTrainer.")


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


def validate_flow_args(args, eval_dataset) -> None:
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


class TrainerFlow:
    """The flow of training of ``host`` (a trainer) over its ``engine`` (see the module docstring)."""

    def __init__(self, host: FlowHost, engine: Engine):
        self.host, self.engine = host, engine
        self.evaluator = Evaluator(host, engine)
        self.calls = 0  # successful step() calls: seeds the shuffle
        self.generate_calls = 0  # unseeded generate() calls: seeds the sampling
        self.training = False  # between on_train_begin and on_train_end
        self.pending: PendingUpdate | None = None  # the low-level API's accumulated, unapplied update
        self.clock = time.perf_counter()  # when the current stretch of training time began
        self._warned_max_steps = False
        self._skipped_in_a_row = 0
        self._unread: list[UpdateRecord] = []  # dispatched, metrics not on the host yet
        self._call_metrics: list[dict] = []  # host metrics of the current call (or optim_step)
        self._window = {"loss_sum": 0.0, "tokens": 0, "input_tokens": 0, "seconds": 0.0}  # since the last log

    # ------------------------------------------------------------------------------------------------------
    # Counters

    def next_generation_call(self) -> int:
        """Index of this unseeded ``generate()`` call (0, 1, ...); advances the counter."""
        index = self.generate_calls
        self.generate_calls += 1
        return index

    def counters(self) -> dict[str, Any]:
        """The counters, JSON-serializable: optimizer updates, step() calls (they seed the shuffle), the log history,
        the tokens seen and the engine's own — what a checkpoint keeps beside the weights and optimizer state."""
        state = self.host.state
        return {"global_step": state.global_step, "calls": self.calls, "log_history": list(state.log_history),
                "num_input_tokens_seen": state.num_input_tokens_seen, **self.engine.extra_counters()}

    def restore_counters(self, counters: dict[str, Any]) -> None:
        """Set the counters from :meth:`counters`' output, so the next call continues where that one was."""
        state = self.host.state
        state.global_step = int(counters["global_step"])
        self.calls = int(counters["calls"])
        state.log_history = list(counters.get("log_history", []))
        state.num_input_tokens_seen = counters.get("num_input_tokens_seen")
        self.engine.restore_extra_counters(counters)

    def refuse_while_pending(self, what: str) -> None:
        if self.pending is not None:
            raise RuntimeError(f"{what} while forward_backward gradients are accumulated and not applied: call "
                               f"optim_step() first")

    # ------------------------------------------------------------------------------------------------------
    # Events

    def _event(self, name: str, *args) -> None:
        """Fire callback event ``name``; the handler's ``control`` becomes the trainer's."""
        host = self.host
        host.control = getattr(host.callback_handler, name)(host.args, host.state, host.control, *args)

    def begin_training(self) -> None:
        if not self.training:
            self.training = True
            self._event("on_train_begin")

    def end_training(self) -> None:
        """Fire ``on_train_end`` (closes the ``report_to`` writers); a later ``step()`` begins a new training."""
        if self.training:
            self.training = False
            self._event("on_train_end")

    def log(self, logs: dict[str, float]) -> None:
        """Append ``logs`` (plus ``epoch`` and ``step``) to ``state.log_history`` and send them to ``on_log``."""
        state = self.host.state
        logs = dict(logs)
        if state.epoch is not None:
            logs["epoch"] = state.epoch
        if counts_input_tokens(self.host.args):
            logs["num_input_tokens_seen"] = state.num_input_tokens_seen
        state.log_history.append({**logs, "step": state.global_step})
        self._event("on_log", logs)

    def evaluate(self, forms: dict, eval_dataset=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """One evaluation (``shared.evaluation.Evaluator``), logged, then ``on_evaluate``."""
        metrics = self.evaluator.run(forms, eval_dataset, metric_key_prefix)
        self.log(metrics)
        self._event("on_evaluate", metrics)
        return metrics

    # ------------------------------------------------------------------------------------------------------
    # One step() call

    def step(self, **forms) -> StepStats:
        """The call template of ``step()``: refuse while low-level gradients are pending, prepare the samples
        (``Engine.prepare_examples``), plan the call's updates (the seeded shuffle), run them."""
        self.refuse_while_pending("step()")
        engine, args = self.engine, self.host.args
        examples = engine.prepare_examples(**forms)
        warn_beyond_positions(examples, engine.config_positions(), engine)
        updates = plan_updates(examples, micro_batch_size=engine.step_micro_batch_size(),
                               gradient_accumulation_steps=args.gradient_accumulation_steps,
                               seed=shuffle_seed(args), call_index=self.calls)
        with engine.training_call(updates) as run_update:
            return self._run_call(updates, run_update, samples=len(examples))

    def update(self, run: Callable[[], UpdateRecord], *, epoch: float | None = None,
               sync: bool = True) -> tuple[UpdateRecord, bool]:
        """The per-update callback flow, shared by ``step()`` and ``optim_step()``: ``on_step_begin``, the update
        ``run()`` and its bookkeeping (together: a Ctrl-C lands after them, never between), then — unless the update
        was skipped (read now with ``sync``, else at the next sync) — ``on_step_end`` and what ``control`` asks for.
        Returns the update's record and whether its step completed."""
        state = self.host.state
        self._event("on_step_begin")
        with deferred_interrupt():
            record = run()
            self._unread.append(record)
            state.global_step += 1  # provisional on the JAX engine until the next sync (skips)
            if epoch is not None:
                state.epoch = epoch
            state.num_input_tokens_seen = (state.num_input_tokens_seen or 0) + record.input_tokens
        if sync and self.sync():
            return record, False  # skipped: no step completed, nothing is due
        self._event("on_step_end")
        self.act_on_control()
        return record, True

    def _run_call(self, updates: list, run_update: Callable[[Any], UpdateRecord], *, samples: int) -> StepStats:
        """Run a call's planned ``updates`` through ``run_update`` with the callback flow around each one."""
        host = self.host
        args, state = host.args, host.state
        start = self.clock = time.perf_counter()
        self.calls += 1
        if args.max_steps > 0 and state.global_step + len(updates) > args.max_steps and not self._warned_max_steps:
            self._warned_max_steps = True
            logger.warning("step(): max_steps=%d updates reached: the learning-rate schedule is exhausted and further "
                           "updates use its final value (0 for linear/cosine decay). Raise `max_steps`, or use "
                           "max_steps=-1 (warmup, then constant) for open-ended iterative training.", args.max_steps)
        self.begin_training()
        host.control.should_training_stop = host.control.should_epoch_stop = False
        self._event("on_epoch_begin")
        self._call_metrics = []
        padded = seen = ran = 0
        bar = tqdm(total=len(updates), desc="step", unit="update", leave=False,
                   disable=(len(updates) < PROGRESS_BAR_MIN_UPDATES or bool(args.disable_tqdm)
                            or not state.is_world_process_zero))  # one bar per run, not per process
        for k, update in enumerate(updates):
            record, completed = self.update(functools.partial(run_update, update),
                                            epoch=self.calls - 1 + (k + 1) / len(updates),
                                            sync=self.engine.metrics_on_host)
            ran += 1
            padded += record.padded_tokens
            seen += record.input_tokens
            bar.update(1)
            if not completed:
                continue
            if host.control.should_training_stop or host.control.should_epoch_stop:
                if k + 1 < len(updates):
                    logger.warning("step(): a callback stopped training; %d of the call's %d updates were not run",
                                   len(updates) - k - 1, len(updates))
                break
        bar.close()
        self.sync()
        now = time.perf_counter()
        self._window["seconds"] += now - self.clock  # the time between calls is not training time
        self.clock = now
        self._event("on_epoch_end")
        self.act_on_control()
        return self._call_stats(start, samples=samples, ran=ran, padded=padded, seen=seen)

    def apply_pending(self) -> dict[str, float]:
        """``optim_step()``: the pending low-level update applied through the per-update flow of ``step()``."""
        pending = self.pending
        if pending is None:
            raise RuntimeError("optim_step(): no gradients accumulated; call forward_backward(...) first")
        self.begin_training()
        self._call_metrics = []

        def run() -> UpdateRecord:
            metrics = self.engine.apply_accumulated(pending.loss_sum, pending.num_tokens)
            self.pending = None
            mean = pending.loss_sum / max(pending.num_tokens, 1)  # the window's token-weighted loss, as step() logs
            return UpdateRecord({**metrics, "loss": mean, "num_tokens": pending.num_tokens}, pending.input_tokens,
                                pending.padded_tokens)

        record, _ = self.update(run, sync=True)
        metrics = record.metrics
        return {"loss": pending.loss_sum, "num_tokens": pending.num_tokens, "grad_norm": metrics["grad_norm"],
                "learning_rate": metrics["learning_rate"], "skipped": int(metrics["skipped"]),
                "global_step": int(self.host.state.global_step)}

    def sync(self) -> int:
        """Read the unread updates' metrics (the JAX engine's host sync), count skipped updates and correct
        ``global_step`` for them; returns how many were skipped."""
        if not self._unread:
            return 0
        fetched = self.engine.fetch([r.metrics for r in self._unread])  # may wait on the device: nothing changed yet
        records, self._unread = self._unread, []
        skipped = 0
        for record, m in zip(records, fetched):
            m = {k: float(v) for k, v in m.items()}
            self._call_metrics.append(m)
            self._window["input_tokens"] += record.input_tokens
            if m.get("skipped", 0):
                skipped += 1
                self._skipped_in_a_row += 1
                self.host.state.global_step -= 1
                limit = self.host.args.max_skipped_updates
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

    def act_on_control(self) -> None:
        """Do what ``control`` asks for after an update or a call: log, evaluate, save (transformers' order)."""
        host = self.host
        control = host.control
        if not (control.should_log or control.should_evaluate or control.should_save):
            return
        if self.sync():  # the update this was due for was skipped: its step number comes again
            control.should_log = control.should_evaluate = control.should_save = False
            return
        self._window["seconds"] += time.perf_counter() - self.clock  # after the sync: the device work is done
        if host.control.should_log:
            self._log_window()
        if host.control.should_evaluate:
            metrics = self.evaluate({})
            if enum_name(host.args.save_strategy) == "best":
                host.control.should_save = host.is_best_metric(metrics)
        if host.control.should_save:
            host.save_for_flow()
            self._event("on_save")
        self.clock = time.perf_counter()  # evaluation and saving are not training time

    def _log_window(self) -> None:
        window = self._window
        if window["tokens"] == 0:  # nothing trained since the last log
            self.host.control.should_log = False
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
            global_step=int(self.host.state.global_step), seconds=seconds,
            tokens_per_second=seen / seconds if seconds > 0 else math.inf, padded_tokens=padded,
            **input_token_stats(self.host.args, self.host.state), **extra)
