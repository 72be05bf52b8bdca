"""The low-level training API both engines share (Tinker's semantics), written once above the engines' hooks.

``forward_backward(data, loss_fn)`` accumulates the gradient of a summed loss over ``Datum`` s, ``forward`` computes
the same without gradients, ``forward_backward_custom(data, fn)`` trains any differentiable function of the
per-token logprobs, ``optim_step()`` applies what was accumulated (the configured optimizer, schedule, clipping and
non-finite guard; one optimizer update: ``global_step`` + 1 and the callback flow of one update, ``shared.flow``), and
``compute_logprobs`` scores sequences. The engine's part is declared in ``shared.engine.Engine``: ``data_pass`` (one
pass over checked data, accumulating gradients or not), ``apply_accumulated`` (the optimizer update),
``value_and_grad`` (a custom function's value and its gradient with respect to the logprobs) and
``pending_gradients``.

``forward_backward_custom`` follows Tinker: a forward pass gives the logprobs, ``fn``'s gradient ``g`` with respect
to them is taken, and a second pass back-propagates ``sum(g * logp)`` — the cross_entropy loss with weights ``-g``
— so a custom loss runs through the same compiled core as the built-in ones, and ``fn`` may couple the data
(group-normalised advantages) however it likes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from itersft_jax.shared.checks import check_int
from itersft_jax.shared.data import check_positions, token_sequences
from itersft_jax.shared.datum import (
    LOGPROBS_ONLY,
    LOSS_INPUTS,
    TARGETS,
    Datum,
    check_data,
    check_loss_fn,
    loss_metrics,
    padded_inputs,
)
from itersft_jax.shared.engine import Engine, PassResult, PendingUpdate
from itersft_jax.shared.interrupts import deferred_interrupt
from itersft_jax.shared.outputs import MAX_RETURN_SEQUENCES

if TYPE_CHECKING:  # the flow imports transformers' callbacks (and torch): not at run time from here
    from itersft_jax.shared.flow import TrainerFlow


@dataclasses.dataclass
class ForwardBackwardOutput:
    """What ``forward_backward`` / ``forward`` / ``forward_backward_custom`` return: ``loss_fn_outputs``, one dict per
    datum (``{"logprobs": fp32 array as long as its model_input}``), and ``metrics`` (``"loss:sum"``, the summed loss;
    ``"num_tokens"``, target positions; the RL losses' diagnostics, ``datum.loss_metrics``; a custom function's own
    metrics beside them)."""

    loss_fn_outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, float]


class LowLevelAPI:
    """The low-level API over an engine (see the module docstring): ``flow`` keeps the pending update and runs
    ``optim_step`` through the per-update callback flow; ``engine`` runs the passes; ``generate`` samples."""

    def __init__(self, flow: TrainerFlow, engine: Engine, generate: Callable[..., Any]):
        self.flow, self.engine, self.generate = flow, engine, generate

    def _checked(self, data, keys) -> list[Datum]:
        return check_data(data, keys, self.engine.datum_vocab_size(), self.engine.position_limit)

    def forward_backward(self, data, loss_fn: str = "cross_entropy",
                         loss_fn_config: dict | None = None) -> ForwardBackwardOutput:
        """Add the gradient of ``loss_fn`` summed over ``data`` (a list of ``Datum``) to the accumulator; returns each
        datum's per-token logprobs and the loss sum. Built-in losses: ``cross_entropy``, ``importance_sampling``,
        ``ppo``, ``cispo`` (``itersft_jax.shared.datum.builtin_loss``); ``loss_fn_config`` holds ppo's and cispo's
        ``clip_low_threshold`` / ``clip_high_threshold`` (0.8 / 1.2). Everything is checked first."""
        config = check_loss_fn(loss_fn, loss_fn_config)
        return self._pass(self._checked(data, LOSS_INPUTS[loss_fn]), loss_fn, config, backward=True)

    def forward(self, data, loss_fn: str = "cross_entropy",
                loss_fn_config: dict | None = None) -> ForwardBackwardOutput:
        """``forward_backward`` without gradients: the loss and logprobs at the current parameters."""
        config = check_loss_fn(loss_fn, loss_fn_config)
        return self._pass(self._checked(data, LOSS_INPUTS[loss_fn]), loss_fn, config, backward=False)

    def forward_backward_custom(self, data, fn) -> ForwardBackwardOutput:
        """Accumulate the gradient of ``fn(logprobs, inputs) -> (loss, metrics)``, where ``logprobs`` is ``[N, L]``
        (datum ``i``'s per-token logprobs, right-padded) and ``inputs`` its ``loss_fn_inputs`` padded alike, plus
        ``mask`` (1 on real positions). JAX: ``fn`` is a pure ``jax.numpy`` function (jitted, once per shape);
        PyTorch: a torch function. ``metrics``: a dict of scalars."""
        if not callable(fn):
            raise TypeError(f"`fn` must be callable, got {type(fn).__name__}")
        data = self._checked(data, (TARGETS,))
        inputs = padded_inputs(data)
        # The forward pass changes nothing of the trainer: an `fn` whose output is refused (a vector, no
        # (loss, metrics) pair, a non-finite loss) leaves it as it was
        logprobs = self._data_pass(data, LOGPROBS_ONLY, {}, backward=False).logprobs
        logprobs_NL = np.zeros(inputs["mask"].shape, np.float32)
        for i, lp in enumerate(logprobs):
            logprobs_NL[i, :len(lp)] = lp
        loss, metrics, grad_NL = self.engine.value_and_grad(fn, logprobs_NL, inputs)
        if not (math.isfinite(loss) and np.all(np.isfinite(grad_NL))):
            raise ValueError(f"forward_backward_custom: `fn` gave a non-finite loss ({loss}) or gradient; nothing "
                             f"was accumulated")
        surrogate = [_with_weights(d, -grad_NL[i, :len(d)]) for i, d in enumerate(data)]
        out = self._pass(surrogate, "cross_entropy", {}, backward=True)
        out.metrics.update({"loss:sum": loss, **metrics})
        return out

    def optim_step(self) -> dict[str, float]:
        """Apply the accumulated gradients (summed, not normalised) with the configured optimizer, schedule, clipping
        and non-finite guard, reset the accumulator: one optimizer update (``global_step`` + 1 unless skipped,
        ``on_step_begin`` / ``on_step_end`` and whatever logging, evaluation or saving is due). Returns
        ``loss`` (the accumulated loss sum), ``num_tokens``, ``grad_norm``, ``learning_rate``, ``skipped``,
        ``global_step``."""
        return self.flow.apply_pending()

    def sample(self, prompts=None, *, input_ids=None, num_samples: int = 1, **generate_kwargs):
        """``num_samples`` completions per prompt with each token's log-probability under the current parameters at
        temperature 1 — ``generate(..., num_return_sequences=num_samples, return_logprobs=True)``, so the sampler's
        settings (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``, ``seed``) apply. The
        logprobs are what ``importance_sampling``, ``ppo`` and ``cispo`` take as the sampler's (``samples_to_data``
        builds the data); at another temperature or with top-k/top-p they are the temperature-1 policy's, not the
        warped distribution's (``docs/sampler.md``)."""
        if "num_return_sequences" in generate_kwargs:
            raise TypeError("sample() takes `num_samples`, not `num_return_sequences`")
        check_int(num_samples, "num_samples", 1, MAX_RETURN_SEQUENCES)
        if num_samples > 1 and generate_kwargs.get("do_sample", False) is False:
            raise ValueError(f"`num_samples`={num_samples} with greedy decoding gives {num_samples} identical "
                             f"completions per prompt; pass do_sample=True")
        if generate_kwargs.pop("return_logprobs", True) is not True:
            raise ValueError("`return_logprobs`: sample() always returns logprobs; call generate() for none")
        return self.generate(prompts, input_ids=input_ids, num_return_sequences=num_samples, return_logprobs=True,
                             **generate_kwargs)

    def compute_logprobs(self, input_ids) -> list[np.ndarray]:
        """Each sequence's per-token log-probabilities under the current parameters (temperature 1, fp32): entry
        ``t`` is ``log p(ids[t + 1] | ids[:t + 1])``, so a sequence of ``L`` tokens gives ``L - 1`` values —
        the quantity ``forward_backward`` trains and the sampler reports."""
        sequences = token_sequences(input_ids, "input_ids", vocab_size=self.engine.datum_vocab_size())
        for i, seq in enumerate(sequences):
            if len(seq) < 2:
                raise ValueError(f"`input_ids[{i}]` has {len(seq)} token: logprobs need a sequence of at least 2")
        check_positions([len(s) for s in sequences], self.engine.position_limit, "input_ids")
        data = [Datum(seq[:-1], {TARGETS: seq[1:]}) for seq in sequences]
        return self._data_pass(data, LOGPROBS_ONLY, {}, backward=False).logprobs

    def accumulated_gradients(self) -> dict[str, np.ndarray]:
        """The gradients ``forward_backward`` accumulated since the last ``optim_step`` (summed), on the host by
        parameter name (JAX with LoRA: by the adapters' paths); empty when none are pending."""
        return {} if self.flow.pending is None else self.engine.pending_gradients()

    def _data_pass(self, data: list[Datum], loss_fn: str, config: dict, backward: bool,
                   key_offset: int = 0) -> PassResult:
        """``Engine.data_pass`` of the data reduced to what ``loss_fn`` reads (other arrays need not travel)."""
        return self.engine.data_pass(loss_inputs(data, loss_fn), loss_fn, config, backward, key_offset=key_offset)

    def _pass(self, data: list[Datum], loss_fn: str, config: dict, backward: bool) -> ForwardBackwardOutput:
        started = time.perf_counter()
        flow = self.flow
        # Random keys of this pass numbered after those of the passes already pending (from 0 when none is).
        offset = flow.pending.micro_batches if flow.pending is not None else 0
        result = self._data_pass(data, loss_fn, config, backward, key_offset=offset)
        if backward:  # nothing changed so far: the accumulator and its bookkeeping change together here
            with deferred_interrupt():
                if flow.pending is None:
                    flow.pending = PendingUpdate()
                    flow.clock = started  # the update's training time starts with its first pass
                result.commit()
                pending = flow.pending
                pending.loss_sum += result.loss_sum
                pending.num_tokens += result.num_tokens
                pending.input_tokens += sum(len(d) for d in data)
                pending.padded_tokens += result.padded_tokens
                pending.micro_batches += result.micro_batches
        metrics = {"loss:sum": result.loss_sum, "num_tokens": result.num_tokens,
                   **loss_metrics(loss_fn, data, result.logprobs, config)}
        return ForwardBackwardOutput([{"logprobs": lp} for lp in result.logprobs], metrics)


def _with_weights(datum: Datum, weights: np.ndarray) -> Datum:
    return Datum(datum.model_input, {TARGETS: datum.loss_fn_inputs[TARGETS], "weights": weights})


def loss_inputs(data: list[Datum], loss_fn: str) -> list[Datum]:
    """The data reduced to what ``loss_fn`` reads (other arrays need not travel to the device)."""
    keys = LOSS_INPUTS.get(loss_fn, (TARGETS,))
    return [Datum(d.model_input, {k: d.loss_fn_inputs[k] for k in keys}) for d in data]

