"""The two protocols of the backend-neutral trainer flow (``shared.flow``, ``shared.low_level``, ``shared.evaluation``):
everything the flow asks of an engine and of the trainer around it, declared and documented here — nothing is
reached by convention.

* :class:`Engine` is what differs between JAX and PyTorch: how an update runs and how its metrics reach the host,
  how held-out samples are scored, how one pass over ``Datum`` s computes its loss and gradient. Implemented by
  ``itersft_jax.engine.JaxEngine`` and ``itersft_torch.engine.TorchEngine``, each its own object.
* :class:`FlowHost` is the trainer the flow runs for (``itersft_jax.trainer.IterativeSFTTrainer``,
  ``itersft_torch.trainer.IterativeSFTTrainer``, a ``transformers.Trainer``): the configuration, transformers'
  ``TrainerState`` / ``TrainerControl`` and callback handler, and the checkpoint the cadence asks for.

The flow owns the counters and the callback flow and calls only the members below.

Adding an engine method: declare it here (abstract, with what it returns and what it may change), implement it
in both engines, then call it from the flow.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from itersft_jax.shared.data import Example
from itersft_jax.shared.datum import Datum


@dataclasses.dataclass
class UpdateRecord:
    """One dispatched update: ``metrics`` (``loss``, ``grad_norm``, ``learning_rate``, ``num_tokens``, ``skipped``;
    device arrays on the JAX engine until the next sync) and what the host already knows."""

    metrics: dict[str, Any]
    input_tokens: int  # non-padding input tokens
    padded_tokens: int  # input positions computed, padding included


def nothing_to_commit() -> None:
    """The commit of a pass that changes no state."""


@dataclasses.dataclass
class PassResult:
    """What one pass over ``Datum`` s gives (``Engine.data_pass``): the summed loss, the target positions, each
    datum's per-token logprobs, the input positions computed (padding included), and ``commit``, which adds the
    pass's gradient to the engine's accumulator (run with Ctrl-C held: it only assigns); ``micro_batches``: how
    many micro-batch random keys the pass used (the next pass of the same update numbers its keys after them)."""

    loss_sum: float
    num_tokens: int
    logprobs: list[np.ndarray]
    padded_tokens: int
    commit: Callable[[], None] = nothing_to_commit
    micro_batches: int = 0


class FlowHost(abc.ABC):
    """The members a trainer provides to the flow.

    Attributes (set by the trainer's constructor): ``args`` (the ``IterativeSFTConfig``), ``state`` and ``control``
    (transformers' ``TrainerState`` / ``TrainerControl``, which the flow advances), ``callback_handler``,
    ``eval_dataset``, ``compute_metrics``.
    """

    @abc.abstractmethod
    def save_for_flow(self) -> None:
        """Write the checkpoint the callback flow asks for (``control.should_save``)."""

    @abc.abstractmethod
    def is_best_metric(self, metrics: dict[str, float]) -> bool:
        """``save_strategy="best"``: whether ``metrics`` are the best so far (a checkpoint is then due)."""


class Engine(abc.ABC):
    """The members an engine provides to the flow. ``metrics_on_host``: whether an update's metrics are host values
    as soon as it returns (PyTorch) or device values read at the next sync (JAX)."""

    metrics_on_host: bool = True

    # ------------------------------------------------------------------------------------------------------
    # step()

    @abc.abstractmethod
    def prepare_examples(self, **forms) -> list[Example]:
        """``step()``'s input forms -> checked, tokenized, truncated ``Example`` s (the shared data layer)."""

    @abc.abstractmethod
    def step_micro_batch_size(self) -> int:
        """Samples per micro-batch of ``step()`` over all data-parallel devices or processes."""

    @abc.abstractmethod
    def config_positions(self) -> int | None:
        """The model config's ``max_position_embeddings`` (longer samples are trained with a warning)."""

    @abc.abstractmethod
    def training_call(self, updates: list) -> contextlib.AbstractContextManager[Callable[[Any], UpdateRecord]]:
        """A context for one ``step()`` call over its planned ``updates`` that yields ``run_update(update) ->
        UpdateRecord``: one optimizer update (dispatched; skipped inside when non-finite)."""

    @abc.abstractmethod
    def fetch(self, metrics: list[dict]) -> list[dict]:
        """Dispatched updates' metrics as host values (the JAX engine's one device -> host sync per call)."""

    @abc.abstractmethod
    def extra_counters(self) -> dict[str, Any]:
        """The engine's own counters, kept in checkpoints beside the flow's (JSON-serializable)."""

    @abc.abstractmethod
    def restore_extra_counters(self, counters: dict[str, Any]) -> None:
        """Set the engine's counters from a checkpoint's (see :meth:`extra_counters`)."""

    # ------------------------------------------------------------------------------------------------------
    # Evaluation

    @abc.abstractmethod
    def eval_loss(self, examples: list[Example]) -> tuple[float, int]:
        """``(summed cross-entropy, label tokens)`` of held-out samples, parameters unchanged."""

    @abc.abstractmethod
    def eval_predictions(self, examples: list[Example]) -> Iterable[tuple[Any, Any]]:
        """``(predictions, labels)`` batch by batch for ``compute_metrics``."""

    # ------------------------------------------------------------------------------------------------------
    # The low-level API

    @abc.abstractmethod
    def datum_vocab_size(self) -> int | None:
        """Token ids must be below this."""

    @property
    @abc.abstractmethod
    def position_limit(self) -> int | None:
        """The model's learned position count (GPT-2, OPT), or None: longer sequences are refused."""

    @abc.abstractmethod
    def data_pass(self, data: list[Datum], loss_fn: str, config: dict[str, float], backward: bool,
                  key_offset: int) -> PassResult:
        """One pass over checked data (reduced to the ``loss_fn_inputs`` that ``loss_fn`` reads). With ``backward``
        the gradient of the summed loss is computed (its random keys numbered from ``key_offset``) but the
        accumulator is left as it was until ``PassResult.commit()``: a pass that raises — a bad batch, an
        out-of-memory error, a Ctrl-C — changes nothing. ``loss_fn`` may also be ``LOGPROBS_ONLY``: the logprobs
        alone (loss 0)."""

    @abc.abstractmethod
    def apply_accumulated(self, loss_sum: float, num_tokens: int) -> dict[str, float]:
        """Apply and reset the accumulated gradients; host metrics ``grad_norm``, ``learning_rate``, ``skipped``."""

    @abc.abstractmethod
    def value_and_grad(self, fn, logprobs_NL: np.ndarray, inputs: dict[str, np.ndarray]):
        """``(loss, metrics, d loss / d logprobs_NL)`` of a custom function, as host values."""

    @abc.abstractmethod
    def pending_gradients(self) -> dict[str, np.ndarray]:
        """The accumulated gradients on the host, by parameter name."""


def eval_batches(examples: list[Example], rows: int) -> Iterator[list[Example]]:
    """``examples`` cut into batches of ``rows`` (both engines' evaluation order)."""
    for i in range(0, len(examples), rows):
        yield examples[i:i + rows]


@dataclasses.dataclass
class PendingUpdate:
    """What ``forward_backward`` calls accumulated since the last ``optim_step``."""

    loss_sum: float = 0.0
    num_tokens: int = 0
    input_tokens: int = 0
    padded_tokens: int = 0
    micro_batches: int = 0  # numbers the random keys of later calls (JAX: NEFTune, LoRA dropout)
