"""The public methods both ``IterativeSFTTrainer`` classes share, written once over the composed flow.

``TrainerAPI`` is the user-facing half of a trainer: ``step``, ``evaluate``, the low-level API (``forward_backward``,
``forward``, ``forward_backward_custom``, ``optim_step``, ``sample``, ``compute_logprobs``,
``accumulated_gradients``), the counters, ``log`` and the callback management. Each method forwards to one of
three objects the trainer composes in :meth:`TrainerAPI.compose`: ``flow`` (``shared.flow.TrainerFlow``: the call
template, the per-update callback flow, the counters), ``low_level`` (``shared.low_level.LowLevelAPI``) and, through
them, the trainer's ``engine`` (a ``shared.engine.Engine``: ``itersft_jax.engine.JaxEngine`` or
``itersft_torch.engine.TorchEngine``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers.trainer_callback import TrainerCallback

from itersft_jax.shared.engine import Engine
from itersft_jax.shared.flow import TRAIN_NOT_SUPPORTED, StepStats, TrainerFlow
from itersft_jax.shared.low_level import ForwardBackwardOutput, LowLevelAPI


class TrainerAPI:
    """The public methods of both trainers (see the module docstring); ``compose()`` builds what they forward to."""

    engine: Engine
    flow: TrainerFlow
    low_level: LowLevelAPI

    def compose(self, engine: Engine) -> None:
        """Build the flow and the low-level API of this trainer (a ``FlowHost``) over ``engine`` (called by the
        trainer's constructor once ``args`` and ``state`` exist, before its callback handler fires ``on_init_end``)."""
        self.engine = engine
        self.flow = TrainerFlow(self, engine)
        self.low_level = LowLevelAPI(self.flow, engine, self.generate)

    # ------------------------------------------------------------------------------------------------------
    # Training

    def step(self, input_ids=None, attention_mask=None, labels=None, texts=None, texts_labels=None, prompts=None,
             completions=None) -> StepStats:
        """Train on one batch of samples; returns the call's ``StepStats`` (see ``itersft_jax.shared.flow``).

        Exactly one input form: ``input_ids`` (+ ``attention_mask``, ``labels`` with -100 = no loss),
        ``texts`` (+ ``texts_labels`` as decoder targets for encoder-decoder models, PyTorch), or ``prompts`` +
        ``completions`` (loss on completion + EOS). Everything is validated before any state changes. The
        samples are shuffled and cut into updates of ``per_device_train_batch_size`` x
        ``gradient_accumulation_steps``; each update's loss is its token-weighted mean cross-entropy.
        """
        return self.flow.step(input_ids=input_ids, attention_mask=attention_mask, labels=labels, texts=texts,
                              texts_labels=texts_labels, prompts=prompts, completions=completions)

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
        forms = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, texts=texts,
                     texts_labels=texts_labels, prompts=prompts, completions=completions)
        return self.flow.evaluate(forms, eval_dataset, metric_key_prefix)

    def train(self, *args, **kwargs):
        raise NotImplementedError(TRAIN_NOT_SUPPORTED)

    def end_training(self) -> None:
        """Fire ``on_train_end`` (closes the ``report_to`` writers); a later ``step()`` begins a new training."""
        self.flow.end_training()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Append ``logs`` (plus ``epoch`` and ``step``) to ``state.log_history`` and send them to ``on_log``."""
        del start_time  # transformers' signature; speed is logged per window as tokens_per_second
        self.flow.log(logs)

    # ------------------------------------------------------------------------------------------------------
    # Counters and callbacks

    def counters(self) -> dict[str, Any]:
        """The counters, JSON-serializable (``TrainerFlow.counters``): what a checkpoint keeps beside the weights."""
        return self.flow.counters()

    def restore_counters(self, counters: dict[str, Any]) -> None:
        """Set the counters from :meth:`counters`' output, so the next call continues where that one was."""
        self.flow.restore_counters(counters)

    def next_generation_call(self) -> int:
        """Index of this unseeded ``generate()`` call (0, 1, ...); advances the counter."""
        return self.flow.next_generation_call()

    def add_callback(self, callback: type[TrainerCallback] | TrainerCallback) -> None:
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback):
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback) -> None:
        self.callback_handler.remove_callback(callback)

    # ------------------------------------------------------------------------------------------------------
    # The low-level API (shared.low_level)

    def forward_backward(self, data, loss_fn: str = "cross_entropy",
                         loss_fn_config: dict | None = None) -> ForwardBackwardOutput:
        """See ``LowLevelAPI.forward_backward``."""
        return self.low_level.forward_backward(data, loss_fn, loss_fn_config)

    def forward(self, data, loss_fn: str = "cross_entropy",
                loss_fn_config: dict | None = None) -> ForwardBackwardOutput:
        """See ``LowLevelAPI.forward``."""
        return self.low_level.forward(data, loss_fn, loss_fn_config)

    def forward_backward_custom(self, data, fn) -> ForwardBackwardOutput:
        """See ``LowLevelAPI.forward_backward_custom``."""
        return self.low_level.forward_backward_custom(data, fn)

    def optim_step(self) -> dict[str, float]:
        """See ``LowLevelAPI.optim_step``."""
        return self.low_level.optim_step()

    def sample(self, prompts=None, *, input_ids=None, num_samples: int = 1, **generate_kwargs):
        """See ``LowLevelAPI.sample``."""
        return self.low_level.sample(prompts, input_ids=input_ids, num_samples=num_samples, **generate_kwargs)

    def compute_logprobs(self, input_ids) -> list[np.ndarray]:
        """See ``LowLevelAPI.compute_logprobs``."""
        return self.low_level.compute_logprobs(input_ids)

    def accumulated_gradients(self) -> dict[str, np.ndarray]:
        """See ``LowLevelAPI.accumulated_gradients``."""
        return self.low_level.accumulated_gradients()


for _name in ("forward_backward", "forward", "forward_backward_custom", "optim_step", "sample", "compute_logprobs",
              "accumulated_gradients"):  # the user reads the low-level API's own documentation
    getattr(TrainerAPI, _name).__doc__ = getattr(LowLevelAPI, _name).__doc__
