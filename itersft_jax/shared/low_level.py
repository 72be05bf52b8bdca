"""The low-level training API both engines share (Tinker's semantics), written once above the engines' hooks.

``forward_backward(data, loss_fn)`` accumulates the gradient of a summed loss over ``Datum`` s, ``forward`` computes
the same without gradients, ``forward_backward_custom(data, fn)`` trains any differentiable function of the
per-token logprobs, ``optim_step()`` applies what was accumulated (the configured optimizer, schedule, clipping and
non-finite guard; one optimizer update: ``global_step`` + 1 and the callback flow of one update), and
``compute_logprobs`` scores sequences. An engine implements three hooks: ``_data_pass`` (one pass over checked data,
accumulating gradients or not), ``_apply_accumulated`` (the optimizer update) and ``_value_and_grad`` (a custom
function's value and its gradient with respect to the logprobs).

``forward_backward_custom`` follows Tinker: a forward pass gives the logprobs, ``fn``'s gradient ``g`` with respect
to them is taken, and a second pass back-propagates ``sum(g * logp)`` — the cross_entropy loss with weights ``-g``
— so a custom loss runs through the same compiled core as the built-in ones, and ``fn`` may couple the data
(group-normalised advantages) however it likes.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import time
from collections.abc import Callable

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
from itersft_jax.shared.interrupts import deferred_interrupt
from itersft_jax.shared.outputs import MAX_RETURN_SEQUENCES


@dataclasses.dataclass
class ForwardBackwardOutput:
    """What ``forward_backward`` / ``forward`` / ``forward_backward_custom`` return: ``loss_fn_outputs``, one dict per
    datum (``{"logprobs": fp32 array as long as its model_input}``), and ``metrics`` (``"loss:sum"``, the summed loss;
    ``"num_tokens"``, target positions; the RL losses' diagnostics, ``datum.loss_metrics``; a custom function's own
    metrics beside them)."""

    loss_fn_outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, float]


@dataclasses.dataclass
class PendingUpdate:
    """What ``forward_backward`` calls accumulated since the last ``optim_step``."""

    loss_sum: float = 0.0
    num_tokens: int = 0
    input_tokens: int = 0
    padded_tokens: int = 0
    micro_batches: int = 0  # numbers the random keys of later calls (JAX: NEFTune, LoRA dropout)


class LowLevelAPI(abc.ABC):
    """Mixed into ``TrainerShell``: the low-level API over three engine hooks (see the module docstring)."""

    _pending: PendingUpdate | None = None

    @abc.abstractmethod
    def save_state(self, path: str) -> str:
        """Weights, optimizer state, counters and RNG, atomically and verified; refused while gradients are pending."""

    @abc.abstractmethod
    def load_state(self, path: str) -> str:
        """Restore what ``save_state`` wrote (verified first): later results are bit-identical."""

    @abc.abstractmethod
    def accumulated_gradients(self) -> dict[str, np.ndarray]:
        """The pending gradients on the host, by parameter name (empty when none are pending)."""

    @abc.abstractmethod
    def _record_update(self, metrics: dict, input_tokens: int, padded_tokens: int) -> None:
        """Queue an applied update's metrics for the shell's sync (``TrainerShell``)."""

    @abc.abstractmethod
    def _datum_vocab_size(self) -> int | None:
        """Token ids must be below this."""

    @property
    @abc.abstractmethod
    def position_limit(self) -> int | None:
        """The model's learned position count (GPT-2, OPT), or None: longer sequences are refused."""

    @abc.abstractmethod
    def _data_pass(self, data: list[Datum], loss_fn: str, config: dict[str, float],
                   backward: bool) -> tuple[float, int, list[np.ndarray], int, Callable[[], None]]:
        """``(summed loss, target positions, per-datum logprobs, positions computed, commit)``. With ``backward`` the
        gradient of the summed loss is computed (its random keys numbered after ``self._pending.micro_batches``, or
        from 0 when nothing is pending) but the engine's accumulator is left as it was until ``commit()`` adds it
        (and advances ``micro_batches``): a pass that raises — a bad batch, an out-of-memory error, a Ctrl-C —
        changes nothing. ``commit`` runs with Ctrl-C held (``shared.interrupts``): it only assigns. ``loss_fn`` may
        also be ``LOGPROBS_ONLY``: the logprobs alone (loss 0)."""

    @abc.abstractmethod
    def _apply_accumulated(self, loss_sum: float, num_tokens: int) -> dict[str, float]:
        """Apply and reset the accumulated gradients; host metrics ``grad_norm``, ``learning_rate``, ``skipped``."""

    @abc.abstractmethod
    def _value_and_grad(self, fn, logprobs_NL: np.ndarray, inputs: dict[str, np.ndarray]):
        """``(loss, metrics, d loss / d logprobs_NL)`` of a custom function, as host values."""

    # ------------------------------------------------------------------------------------------------------

    def forward_backward(self, data, loss_fn: str = "cross_entropy",
                         loss_fn_config: dict | None = None) -> ForwardBackwardOutput:
        """Add the gradient of ``loss_fn`` summed over ``data`` (a list of ``Datum``) to the accumulator; returns each
        datum's per-token logprobs and the loss sum. Built-in losses: ``cross_entropy``, ``importance_sampling``,
        ``ppo``, ``cispo`` (``itersft_jax.shared.datum.builtin_loss``); ``loss_fn_config`` holds ppo's and cispo's
        ``clip_low_threshold`` / ``clip_high_threshold`` (0.8 / 1.2). Everything is checked first."""
        config = check_loss_fn(loss_fn, loss_fn_config)
        data = check_data(data, LOSS_INPUTS[loss_fn], self._datum_vocab_size(), self.position_limit)
        return self._pass(data, loss_fn, config, backward=True)

    def forward(self, data, loss_fn: str = "cross_entropy",
                loss_fn_config: dict | None = None) -> ForwardBackwardOutput:
        """``forward_backward`` without gradients: the loss and logprobs at the current parameters."""
        config = check_loss_fn(loss_fn, loss_fn_config)
        data = check_data(data, LOSS_INPUTS[loss_fn], self._datum_vocab_size(), self.position_limit)
        return self._pass(data, loss_fn, config, backward=False)

    def forward_backward_custom(self, data, fn) -> ForwardBackwardOutput:
        """Accumulate the gradient of ``fn(logprobs, inputs) -> (loss, metrics)``, where ``logprobs`` is ``[N, L]``
        (datum ``i``'s per-token logprobs, right-padded) and ``inputs`` its ``loss_fn_inputs`` padded alike, plus
        ``mask`` (1 on real positions). JAX: ``fn`` is a pure ``jax.numpy`` function (jitted, once per shape);
        PyTorch: a torch function. ``metrics``: a dict of scalars."""
        if not callable(fn):
            raise TypeError(f"`fn` must be callable, got {type(fn).__name__}")
        data = check_data(data, (TARGETS,), self._datum_vocab_size(), self.position_limit)
        logprobs = self._data_pass(data, LOGPROBS_ONLY, {}, backward=False)[2]
        inputs = padded_inputs(data)
        logprobs_NL = np.zeros(inputs["mask"].shape, np.float32)
        for i, lp in enumerate(logprobs):
            logprobs_NL[i, :len(lp)] = lp
        loss, metrics, grad_NL = self._value_and_grad(fn, logprobs_NL, inputs)
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
        pending = self._pending
        if pending is None:
            raise RuntimeError("optim_step(): no gradients accumulated; call forward_backward(...) first")
        args, handler = self.args, self.callback_handler
        if not self._training:
            self._training = True
            self.control = handler.on_train_begin(args, self.state, self.control)
        self.control = handler.on_step_begin(args, self.state, self.control)
        self._call_metrics = []
        with deferred_interrupt():  # the update and its bookkeeping together, or neither
            metrics = self._apply_accumulated(pending.loss_sum, pending.num_tokens)
            self._pending = None
            mean = pending.loss_sum / max(pending.num_tokens, 1)  # the window's token-weighted loss, as step() logs
            self._record_update({**metrics, "loss": mean, "num_tokens": pending.num_tokens}, pending.input_tokens,
                                pending.padded_tokens)
            self.state.global_step += 1
            self.state.num_input_tokens_seen = (self.state.num_input_tokens_seen or 0) + pending.input_tokens
        if not self._sync():
            self.control = handler.on_step_end(args, self.state, self.control)
            self._act_on_control()
        return {"loss": pending.loss_sum, "num_tokens": pending.num_tokens, "grad_norm": metrics["grad_norm"],
                "learning_rate": metrics["learning_rate"], "skipped": int(metrics["skipped"]),
                "global_step": int(self.state.global_step)}

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
        sequences = token_sequences(input_ids, "input_ids", vocab_size=self._datum_vocab_size())
        for i, seq in enumerate(sequences):
            if len(seq) < 2:
                raise ValueError(f"`input_ids[{i}]` has {len(seq)} token: logprobs need a sequence of at least 2")
        check_positions([len(s) for s in sequences], self.position_limit, "input_ids")
        data = [Datum(seq[:-1], {TARGETS: seq[1:]}) for seq in sequences]
        return self._data_pass(data, LOGPROBS_ONLY, {}, backward=False)[2]

    def _pass(self, data: list[Datum], loss_fn: str, config: dict, backward: bool) -> ForwardBackwardOutput:
        started = time.perf_counter()
        loss_sum, count, logprobs, padded, commit = self._data_pass(data, loss_fn, config, backward)
        if backward:  # nothing changed so far: the accumulator and its bookkeeping change together here
            with deferred_interrupt():
                if self._pending is None:
                    self._pending = PendingUpdate()
                    self._clock = started  # the update's training time starts with its first pass
                commit()
                pending = self._pending
                pending.loss_sum += loss_sum
                pending.num_tokens += count
                pending.input_tokens += sum(len(d) for d in data)
                pending.padded_tokens += padded
        metrics = {"loss:sum": loss_sum, "num_tokens": count, **loss_metrics(loss_fn, data, logprobs, config)}
        return ForwardBackwardOutput([{"logprobs": lp} for lp in logprobs], metrics)

    def _refuse_while_pending(self, what: str) -> None:
        if self._pending is not None:
            raise RuntimeError(f"{what} while forward_backward gradients are accumulated and not applied: call "
                               f"optim_step() first")


def _with_weights(datum: Datum, weights: np.ndarray) -> Datum:
    return Datum(datum.model_input, {TARGETS: datum.loss_fn_inputs[TARGETS], "weights": weights})


def loss_inputs(data: list[Datum], loss_fn: str) -> list[Datum]:
    """The data reduced to what ``loss_fn`` reads (other arrays need not travel to the device)."""
    keys = LOSS_INPUTS.get(loss_fn, (TARGETS,))
    return [Datum(d.model_input, {k: d.loss_fn_inputs[k] for k in keys}) for d in data]

