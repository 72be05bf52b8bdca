"""The PyTorch engine (``itersft_jax.shared.engine.Engine``): how one update of ``step()``, one pass over ``Datum`` s
and an evaluation run on a ``transformers.PreTrainedModel``.

One update: accumulate the gradient of the summed token cross-entropy over its micro-batches, divided once by the
update's label-token count (DDP averages over ranks), clip, and step the optimizer and the schedule — or skip the
update when its loss or gradient norm is not finite. ``TorchEngine`` works on the components the
``transformers.Trainer`` around it owns (``model`` / ``model_wrapped``, ``optimizer``, ``lr_scheduler``,
``accelerator``), read through ``trainer`` at each call: transformers and accelerate may replace them (wrapping,
``load_state``). It keeps no state of its own beyond the last forward's router outputs. Never imports jax.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer

from itersft_jax.shared.data import (
    IGNORE_INDEX,
    Example,
    collate,
    count_label_tokens,
    prepare_examples,
    training_pad_id,
)
from itersft_jax.shared.datum import check_custom_output
from itersft_jax.shared.engine import Engine, PassResult, UpdateRecord, eval_batches
from itersft_torch import moe
from itersft_torch.distributed import (
    AccelerateState,
    check_same_data,
    check_same_samples,
    gather_pass,
    release_gathered_parameters,
    sum_gradients_across_processes,
    sum_over_processes,
)
from itersft_torch.features import StepFeatures


def _clear_device_cache() -> None:
    try:
        from accelerate.utils.memory import clear_device_cache
    except ImportError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return
    clear_device_cache(garbage_collection=True)


# ----------------------------------------------------------------------------------------------------------
# Loss


def summed_token_ce(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, shift: bool,
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum (not mean) of the token cross-entropy over label tokens, in fp32. ``shift``: causal LMs predict
    token t+1 at position t; seq2seq logits are already aligned with their decoder targets.
    ``label_smoothing`` eps: each token's loss is ``(1 - eps) * nll + eps * mean_v(-log p_v)``, as
    transformers' ``LabelSmoother`` (the caller divides the sum by the label-token count once)."""
    if shift:
        logits_BTV, labels_BT = logits_BTV[:, :-1], labels_BT[:, 1:]
    return F.cross_entropy(logits_BTV.float().reshape(-1, logits_BTV.shape[-1]), labels_BT.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing)


def _label_tokens(examples: list[Example], is_encoder_decoder: bool) -> int:
    if is_encoder_decoder:  # decoder targets are not shifted: every non-ignored label is predicted
        return sum(int(np.count_nonzero(ex.labels != IGNORE_INDEX)) for ex in examples)
    return count_label_tokens([examples])


class _RouterOutputs(NamedTuple):
    """The last forward's router logits (per sparse layer), attention mask and transformers' aux_loss."""

    router_logits: Any
    attention_mask: torch.Tensor
    aux_loss: Any


class _GradientsAside:
    """The gradients already pending, set aside while a low-level pass computes its own: a pass that fails (or is
    interrupted) gives them back untouched (``give_back``); a pass that succeeds adds them to its own (``commit``).
    Only when several forward_backward calls accumulate into one update do both live at once."""

    def __init__(self, parameters: list[torch.nn.Parameter]):
        self.parameters = parameters
        self.pending = {p: p.grad for p in parameters if p.grad is not None}
        for p in parameters:
            p.grad = None

    def give_back(self) -> None:
        for p in self.parameters:
            p.grad = self.pending.get(p)

    def commit(self) -> None:
        for p, grad in self.pending.items():
            p.grad = grad if p.grad is None else grad.add_(p.grad)


# ----------------------------------------------------------------------------------------------------------
# The engine


class TorchEngine(Engine):
    """The PyTorch engine of ``itersft_torch.trainer.IterativeSFTTrainer`` (see the module docstring)."""

    metrics_on_host = True  # an update's metrics are host values as soon as it returns

    def __init__(self, trainer: Trainer, features: StepFeatures):
        """``trainer``: the ``itersft_torch.trainer.IterativeSFTTrainer`` whose components this engine runs;
        ``features``: its Liger / NEFTune switches. Built once the trainer has prepared its model and optimizer."""
        self.trainer, self.features = trainer, features
        self._router: _RouterOutputs | None = None  # the last forward's (a MoE with output_router_logits)
        self._accelerate_state = AccelerateState()  # as built now

    def restore_accelerate_state(self) -> None:
        """accelerate's process-wide state as it was when the engine was built (``AccelerateState``): called at
        each entry point."""
        self._accelerate_state.restore()

    @property
    def args(self):
        return self.trainer.args

    @property
    def accelerator(self):
        return self.trainer.accelerator

    @property
    def position_limit(self) -> int | None:
        return self.trainer.position_limit

    def step_micro_batch_size(self) -> int:
        return self.args.per_device_train_batch_size * self.accelerator.num_processes

    def config_positions(self) -> int | None:
        config = getattr(self.accelerator.unwrap_model(self.trainer.model), "config", None)
        return getattr(config, "max_position_embeddings", None)

    @contextlib.contextmanager
    def training_call(self, updates):
        """The model in training mode for the call's updates, then back in the mode the caller left it (generation
        between calls runs in it)."""
        del updates  # each update is planned in full
        model = self.trainer.model_wrapped
        was_training = model.training
        self.trainer.is_in_train = True
        try:
            yield lambda update: self._update(model, update)
        finally:
            self.trainer.is_in_train = False
            model.train(was_training)
            if self.args.optimize_device_cache:
                _clear_device_cache()

    def prepare_examples(self, **forms) -> list[Example]:
        self.restore_accelerate_state()
        trainer = self.trainer
        examples = prepare_examples(**forms, tokenizer=trainer.text_tokenizer, max_length=self.args.max_length,
                                    truncation_mode=self.args.truncation_mode, vocab_size=trainer.vocab_size,
                                    is_encoder_decoder=trainer.is_encoder_decoder, max_positions=self.position_limit)
        if self.accelerator.num_processes > 1:
            check_same_samples(self.accelerator, examples)
        return examples

    def fetch(self, metrics: list[dict]) -> list[dict]:
        return metrics  # already on the host

    def _update(self, model: torch.nn.Module, micro_batches: list[list[Example]]) -> UpdateRecord:
        """One optimizer update over its micro-batches, skipped (no optimizer or schedule step, so parameters,
        optimizer state and schedule stay bit-identical) when its loss or gradient norm is not finite."""
        args, accelerator = self.args, self.accelerator
        model.train()
        world, rank = accelerator.num_processes, accelerator.process_index
        per_device = args.per_device_train_batch_size
        update_tokens = sum(_label_tokens(mb, self.trainer.is_encoder_decoder) for mb in micro_batches)
        # Each micro-batch contributes sum(CE) / tokens of the whole update, so the accumulated gradient is
        # the gradient of the update's token-weighted mean whatever the split. DDP averages over ranks.
        scale = world / update_tokens
        pad_id = self._pad_id()
        ce_total = torch.zeros((), device=accelerator.device)
        input_tokens = padded_tokens = 0
        model.zero_grad(set_to_none=True)
        balance = moe.balance_of(accelerator.unwrap_model(model))  # MoE with output_router_logits (itersft_torch.moe)
        if balance is not None and world > 1:
            raise NotImplementedError("output_router_logits (the MoE load-balancing loss) on the PyTorch engine runs "
                                      "in one process for now; use the JAX engine or one process")
        totals = self._router_totals(model, micro_batches, pad_id, balance) if balance is not None else None
        aux_total = torch.zeros((), device=accelerator.device)
        for i, micro_batch in enumerate(micro_batches):
            shard = micro_batch[rank * per_device:(rank + 1) * per_device]
            if not shard:  # this rank still joins the collective with a zero-loss sample
                shard = [Example(micro_batch[0].input_ids, np.full_like(micro_batch[0].labels, IGNORE_INDEX))]
            sync = world == 1 or i == len(micro_batches) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                logits, labels, positions = self._forward(model, shard, pad_id, train=True)
                ce_sum = summed_token_ce(logits, labels, shift=not self.trainer.is_encoder_decoder,
                                         label_smoothing=self.args.label_smoothing_factor)
                loss = ce_sum * scale
                if balance is not None:  # one micro-batch: transformers' aux_loss; several: its share of the update's
                    aux = moe.aux_share(self._router, balance, totals)
                    loss = loss + balance.coef * aux
                    aux_total += aux.detach()
                accelerator.backward(loss)
            ce_total += ce_sum.detach()
            input_tokens += sum(len(ex.input_ids) + (len(ex.labels) if self.trainer.is_encoder_decoder else 0)
                                for ex in micro_batch)  # every rank's samples, like JAX
            padded_tokens += positions

        grad_norm = self._clipped_grad_norm(model)
        ce = ce_total.item()
        if world > 1:  # the global sums on every process: the statistics equal one process's
            ce, padded_tokens = sum_over_processes(accelerator, ce, padded_tokens)
            padded_tokens = int(padded_tokens)
        loss = ce / update_tokens
        extra = {}
        if balance is not None:  # the update's loss is transformers': mean CE + coef * aux
            extra["aux_loss"] = aux_total.item()
            loss += balance.coef * extra["aux_loss"]
        lr, skipped = self._optimizer_update(loss, grad_norm)
        metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr, "num_tokens": update_tokens,
                   "skipped": int(skipped), **extra}
        return UpdateRecord(metrics, input_tokens, padded_tokens)

    def _router_totals(self, model, micro_batches, pad_id: int, balance, train: bool = True):
        """``moe.router_totals`` over this engine's forwards."""
        def router_of(micro_batch):
            self._forward(model, micro_batch, pad_id, train=train)
            return self._router

        return moe.router_totals(router_of, micro_batches, balance)

    def _clipped_grad_norm(self, model: torch.nn.Module) -> float:
        """Clip the accumulated gradients to ``max_grad_norm``; their global norm before clipping."""
        args = self.args
        max_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else math.inf
        grad_norm = self.accelerator.clip_grad_norm_(model.parameters(), max_norm)
        return grad_norm.item() if torch.is_tensor(grad_norm) else float(grad_norm)

    def _optimizer_update(self, loss: float, grad_norm: float) -> tuple[float, bool]:
        """Step the optimizer and the schedule on the accumulated gradients, or skip both when ``loss`` or
        ``grad_norm`` is not finite; the gradients are reset. Returns ``(learning rate used, skipped)``."""
        args, accelerator = self.args, self.accelerator
        lr = self.trainer.optimizer.param_groups[0]["lr"]
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not skipped or accelerator.scaler is not None:  # fp16: the scaler skips the step and lowers its scale
            self.trainer.optimizer.step()
            skipped = skipped or accelerator.optimizer_step_was_skipped
        self.trainer.optimizer.zero_grad(set_to_none=True)
        in_schedule = args.max_steps <= 0 or self.trainer.state.global_step < args.max_steps
        if not skipped and in_schedule and not isinstance(self.trainer.lr_scheduler,
                                                          torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.trainer.lr_scheduler.step()
        return float(lr), skipped

    # ------------------------------------------------------------------------------------------------------
    # The low-level API's part of the engine (itersft_jax.shared.low_level)

    def datum_vocab_size(self) -> int | None:
        return self.trainer.vocab_size

    def data_pass(self, data, loss_fn, config, backward, key_offset) -> PassResult:
        """Micro-batches of ``per_device_train_batch_size`` data, right-padded; the logits' fp32 log-softmax gives
        each target's logprob, the loss formula is ``builtin_loss`` (``itersft_torch.rl_losses``)."""
        self.restore_accelerate_state()
        if self.trainer.is_encoder_decoder:
            raise NotImplementedError("the low-level API (forward_backward, ...) trains causal LMs; this model is "
                                      "encoder-decoder: use step()")
        from itersft_jax.shared.datum import LOGPROBS_ONLY
        from itersft_torch.rl_losses import datum_loss

        model = self.trainer.model_wrapped
        unwrapped = self.accelerator.unwrap_model(model)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        # A MoE with output_router_logits: coef * the pass's load-balancing loss joins the summed loss (not for
        # logprobs-only passes), as on the JAX engine.
        balance = None if loss_fn == LOGPROBS_ONLY else moe.balance_of(unwrapped)
        if world > 1:
            if self.trainer.is_fsdp_enabled or balance is not None:
                raise NotImplementedError("the low-level API on several processes runs under DDP (torchrun or "
                                          "accelerate launch without FSDP), for models without output_router_logits")
            check_same_data(self.accelerator, data, loss_fn, config)
        was_training = model.training
        model.train(backward)
        per_device = self.args.per_device_train_batch_size
        loss_sum, padded, logprobs = 0.0, 0, {}
        aside = _GradientsAside([p for p in model.parameters() if p.requires_grad] if backward else [])

        # Several processes (DDP): the micro-batches are dealt out round-robin and each process runs its own through
        # the unwrapped model (no DDP collective: the processes may run different numbers of forwards), then the
        # gradients are summed across processes once — the gradient of the loss summed over all the data, as one
        # process computes it.
        runner = unwrapped if world > 1 else model
        starts = list(range(0, len(data), per_device))[rank::world]
        shards = [[Example(d.model_input, np.full(len(d), IGNORE_INDEX)) for d in data[start:start + per_device]]
                  for start in starts]
        try:
            totals = (self._router_totals(model, shards, self._pad_id(), balance, train=backward)
                      if balance is not None else None)
            no_sync = self.accelerator.no_sync(model) if world > 1 and backward else contextlib.nullcontext()
            with contextlib.nullcontext() if backward else torch.no_grad(), no_sync:
                for start, examples in zip(starts, shards):
                    shard = data[start:start + per_device]
                    logits_BTV, _, positions = self._forward(runner, examples, self._pad_id(), train=backward)
                    loss, logp_BT = datum_loss(logits_BTV, shard, loss_fn, config)
                    if balance is not None:
                        loss = loss + balance.coef * moe.aux_share(self._router, balance, totals)
                    if backward:
                        self.accelerator.backward(loss)
                    loss_sum += float(loss.detach())
                    padded += positions
                    logprobs.update({start + i: logp_BT[i, :len(d)].detach().cpu().numpy()
                                     for i, d in enumerate(shard)})
            if world > 1:
                if backward:
                    sum_gradients_across_processes(aside.parameters)
                loss_sum, padded, ordered = gather_pass(self.accelerator, loss_sum, padded, logprobs)
            else:
                ordered = [logprobs[i] for i in range(len(data))]
        except BaseException:
            aside.give_back()
            raise
        finally:
            model.train(was_training)
        return PassResult(loss_sum, sum(len(d) for d in data), ordered, padded, aside.commit)

    def pending_gradients(self) -> dict[str, np.ndarray]:
        """The accumulated gradients (summed) on the host by parameter name."""
        model = self.accelerator.unwrap_model(self.trainer.model)
        return {name: p.grad.detach().float().cpu().numpy() for name, p in model.named_parameters()
                if p.grad is not None}

    def apply_accumulated(self, loss_sum, num_tokens):
        self.restore_accelerate_state()
        grad_norm = self._clipped_grad_norm(self.trainer.model_wrapped)
        lr, skipped = self._optimizer_update(loss_sum, grad_norm)
        return {"grad_norm": grad_norm, "learning_rate": lr, "skipped": float(skipped)}

    def value_and_grad(self, fn, logprobs_NL, inputs):
        device = self.accelerator.device
        logprobs = torch.tensor(logprobs_NL, device=device, requires_grad=True)
        out = fn(logprobs, {k: torch.from_numpy(v).to(device) for k, v in inputs.items()})
        check_custom_output(out)
        loss, metrics = out
        if not (torch.is_tensor(loss) and loss.requires_grad):
            raise TypeError("`fn` must return its loss as a torch tensor computed from the logprobs (it has no "
                            "gradient with respect to them)")
        loss.backward()
        metrics = {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in (metrics or {}).items()}
        return float(loss.detach()), metrics, logprobs.grad.cpu().numpy()

    def _pad_id(self) -> int:
        return training_pad_id(self.trainer.text_tokenizer)

    def _forward(self, model: torch.nn.Module, shard: list[Example], pad_id: int, train: bool = False):
        """Logits, labels and the number of input positions computed (padding included) of one micro-batch."""
        device = self.accelerator.device
        label_length = max(len(ex.labels) for ex in shard) if self.trainer.is_encoder_decoder else None
        arrays = collate([shard], pad_id=pad_id, label_length=label_length)
        input_ids, attention_mask, labels = (torch.from_numpy(arrays[k][0]).to(device, torch.long)
                                             for k in ("input_ids", "attention_mask", "labels"))
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.trainer.is_encoder_decoder:
            unwrapped = self.accelerator.unwrap_model(self.trainer.model)
            prepare = getattr(unwrapped, "prepare_decoder_input_ids_from_labels", None)
            if prepare is not None:
                inputs["decoder_input_ids"] = prepare(labels=labels)
            else:  # the model shifts its labels itself; its own (mean) loss is ignored
                inputs["labels"] = labels
        # NEFTune: updates only
        noise = self.features.noise(attention_mask) if train else contextlib.nullcontext()
        with self.accelerator.autocast(), noise:
            outputs = model(**inputs)
        logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
        # A MoE model with output_router_logits: its router logits and aux_loss, for step()'s load-balancing loss.
        self._router = _RouterOutputs(getattr(outputs, "router_logits", None), attention_mask,
                                      getattr(outputs, "aux_loss", None))
        return logits, labels, arrays["input_ids"].size

    def extra_counters(self) -> dict[str, Any]:
        return {}

    def restore_extra_counters(self, counters: dict[str, Any]) -> None:
        """The PyTorch engine keeps no counters of its own."""

    # ------------------------------------------------------------------------------------------------------
    # Evaluation (shared.evaluation calls these)

    def _eval_forwards(self, examples: list[Example]):
        """(logits, labels) per batch of ``per_device_eval_batch_size`` samples, in eval mode, without gradients."""
        model = self.trainer.model_wrapped
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in eval_batches(examples, self.args.per_device_eval_batch_size):
                    logits, labels, _ = self._forward(model, batch, self._pad_id())
                    yield logits, labels
        finally:
            model.train(was_training)
            if self.trainer.is_fsdp_enabled:
                release_gathered_parameters(model)

    def eval_loss(self, examples: list[Example]) -> tuple[float, int]:
        smoothing = self.args.label_smoothing_factor
        loss_sum = sum(float(summed_token_ce(logits, labels, shift=not self.trainer.is_encoder_decoder,
                                             label_smoothing=smoothing))
                       for logits, labels in self._eval_forwards(examples))
        return loss_sum, _label_tokens(examples, self.trainer.is_encoder_decoder)

    def eval_predictions(self, examples: list[Example]):
        for logits, labels in self._eval_forwards(examples):
            if self.trainer.preprocess_logits_for_metrics is not None:
                logits = self.trainer.preprocess_logits_for_metrics(logits, labels)
            if logits.is_floating_point():
                logits = logits.float()  # numpy has no bf16
            yield logits.cpu().numpy(), labels.cpu().numpy()
