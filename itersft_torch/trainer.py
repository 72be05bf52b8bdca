"""The PyTorch ``IterativeSFTTrainer``: TRL's API on ``transformers.Trainer``, fed by ``itersft_jax.data``.

One ``step()`` call: validate and prepare the samples (``data.prepare_examples``), plan the optimizer updates
(``data.plan_updates``, the very plan the JAX engine gets), then per update accumulate the gradient of the
summed token cross-entropy over its micro-batches, divided once by the update's label-token count, clip,
step the optimizer and the schedule, log and checkpoint as ``Trainer`` would. Never imports jax.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, Trainer, TrainingArguments

from itersft_jax.config import IterativeSFTConfig, resolve_config
from itersft_jax.data import (
    IGNORE_INDEX,
    Example,
    collate,
    count_label_tokens,
    plan_updates,
    prepare_examples,
)

logger = logging.getLogger(__name__)

# Keys of `model_init_kwargs` that also matter for loading the config (to tell causal from seq2seq).
_CONFIG_KWARGS = ("revision", "trust_remote_code", "token", "cache_dir", "local_files_only", "subfolder",
                  "force_download", "code_revision")


# ----------------------------------------------------------------------------------------------------------
# Model loading and setup


def _resolve_dtype(value: Any) -> Any:
    """``"bfloat16"`` / ``"torch.float16"`` -> ``torch.dtype``; ``"auto"``, ``None`` and dtypes pass through."""
    if value is None or isinstance(value, torch.dtype) or value == "auto":
        return value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    raise ValueError(f"`model_init_kwargs` dtype must be 'auto', a torch.dtype or its name (e.g. 'bfloat16'), "
                     f"got {value!r}")


def _dtype_key() -> str:
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def load_model(model_id: str, model_init_kwargs: dict[str, Any] | None) -> PreTrainedModel:
    """Load ``model_id`` (hub id or directory) as a causal LM, or as a seq2seq LM when its config says
    ``is_encoder_decoder``, with ``model_init_kwargs`` (dtype strings resolved; the caller's dict is not
    changed)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    kwargs = dict(model_init_kwargs or {})
    dtypes = {k: kwargs.pop(k) for k in ("dtype", "torch_dtype") if k in kwargs}
    if len(dtypes) == 2 and _resolve_dtype(dtypes["dtype"]) != _resolve_dtype(dtypes["torch_dtype"]):
        raise ValueError(f"`model_init_kwargs` sets both dtype and torch_dtype, differently: {dtypes}")
    if dtypes:
        kwargs[_dtype_key()] = _resolve_dtype(next(iter(dtypes.values())))
    config = AutoConfig.from_pretrained(model_id, **{k: kwargs[k] for k in _CONFIG_KWARGS if k in kwargs})
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    return auto.from_pretrained(model_id, **kwargs)


def _is_peft_model(model: Any) -> bool:
    peft = sys.modules.get("peft")  # peft is an optional extra: a PeftModel means it is imported already
    return peft is not None and isinstance(model, peft.PeftModel)


def _checkpointing_requested(args: TrainingArguments) -> bool:
    value = getattr(args, "activation_checkpointing", None)  # transformers >= 5 name; older: gradient_*
    return bool(args.gradient_checkpointing if value is None else value)


def enable_checkpointing(model: torch.nn.Module, args: TrainingArguments) -> None:
    """Turn on activation (gradient) checkpointing as ``Trainer.train`` does, non-reentrant by default
    (TRL's trainer never called it, so ``gradient_checkpointing=True`` saved no memory)."""
    kwargs = dict(getattr(args, "activation_checkpointing_kwargs", None)
                  or args.gradient_checkpointing_kwargs or {})
    kwargs.setdefault("use_reentrant", False)
    extra = {k: kwargs.pop(k) for k in ("every_n_layers", "offload") if k in kwargs}
    try:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **extra)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **extra)
        else:
            raise ValueError(f"{type(model).__name__} has no gradient_checkpointing_enable()")
    except ValueError as err:  # `gradient_checkpointing=True` is the default: say so, and train without
        logger.warning("gradient checkpointing not enabled: %s. Training keeps all activations "
                       "(set gradient_checkpointing=False to silence this).", err)
        return
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = False  # a KV cache is useless with recomputation and warns on every forward


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


# ----------------------------------------------------------------------------------------------------------
# The trainer


class IterativeSFTTrainer(Trainer):
    """TRL's ``IterativeSFTTrainer`` on ``transformers.Trainer``: the user's loop owns the data and calls
    ``step(...)`` with each batch that survived generation and filtering.

    ``model`` is a hub id or directory (loaded with ``args.model_init_kwargs`` as a causal LM, or a seq2seq
    LM when its config is encoder-decoder), a ``PreTrainedModel`` or a ``peft.PeftModel``.
    ``processing_class`` defaults to ``AutoTokenizer`` of the model's ``name_or_path``; it is read, never
    changed. ``data_collator`` and ``eval_dataset`` serve ``evaluate()`` only: ``step()`` batches with
    ``itersft_jax.data``. ``optimizers`` replaces the optimizer and/or the schedule (default: ``Trainer``'s
    optimizer with its weight-decay mask).

    Schedule: with ``max_steps > 0``, ``Trainer``'s schedule over ``max_steps`` updates. Once ``max_steps``
    updates are done, further calls still train: a warning says so once, and the learning rate stays at the
    schedule's final value (0 for linear/cosine decay, so the parameters stop moving; the schedule is never
    restarted nor run past its end, where cosine would climb again). With ``max_steps <= 0`` (the default)
    the schedule cannot know its length: schedules that need it (``linear``, ``cosine``, ...) become warmup
    (``warmup_steps`` as a count) then constant — TRL's linear default gave LR 0 from the first update.

    ``train()`` raises: TRL inherited ``Trainer.train``, which needs a ``train_dataset`` that this trainer
    never takes; training on a dataset is ``transformers.Trainer``'s or ``trl.SFTTrainer``'s job.
    """

    def __init__(
        self,
        model: str | PreTrainedModel | torch.nn.Module,
        args: IterativeSFTConfig | TrainingArguments | None = None,
        data_collator=None,
        eval_dataset=None,
        processing_class=None,
        optimizers: tuple = (None, None),
        preprocess_logits_for_metrics=None,
        compute_metrics=None,
    ):
        args = resolve_config(args)
        if isinstance(model, str):
            model = load_model(model, args.model_init_kwargs)
        elif not isinstance(model, torch.nn.Module):
            raise TypeError(f"`model` must be a model id, a directory, a PreTrainedModel or a PeftModel, "
                            f"got {type(model).__name__}")
        elif args.model_init_kwargs:
            logger.warning("`model_init_kwargs` are ignored: the model is already instantiated")
        if processing_class is None:
            processing_class = self._load_tokenizer(model, args)
        optimizer, scheduler = optimizers
        if scheduler is not None and optimizer is None:
            raise ValueError("`optimizers` gives a scheduler without its optimizer; pass (optimizer, scheduler)")

        self.is_peft_model = _is_peft_model(model)
        self.is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        if _checkpointing_requested(args):  # before Trainer.__init__: DDP's find_unused_parameters reads it
            enable_checkpointing(model, args)

        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=None, eval_dataset=eval_dataset,
            processing_class=processing_class, compute_metrics=compute_metrics, optimizers=(optimizer, None),
            preprocess_logits_for_metrics=preprocess_logits_for_metrics)
        if self.is_deepspeed_enabled:
            raise NotImplementedError("IterativeSFTTrainer (torch) does not support DeepSpeed yet; use FSDP/DDP")

        # Optimizer, accelerate wrapping (DDP/FSDP, mixed-precision forward), then the schedule: the order of
        # Trainer._prepare_for_training, done once here because step() is the only entry point.
        if self.is_fsdp_enabled:
            self.model_wrapped = self.accelerator.prepare(self.model)
            self.create_optimizer(self.model_wrapped)
            self.optimizer = self.accelerator.prepare(self.optimizer)
            self.model = self.model_wrapped
        else:
            self.create_optimizer()
            self.model_wrapped, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.lr_scheduler = scheduler if scheduler is not None else self._create_step_scheduler()
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))

        self.state.max_steps = max(args.max_steps, 0)
        self.state.train_batch_size = args.per_device_train_batch_size
        self.state.compute_steps(args, max(args.max_steps, 0))
        self._num_calls = 0  # successful step() calls: seeds the shuffle, like the JAX engine
        self._log_loss_sum, self._log_tokens = 0.0, 0
        self._warned_exhausted = False

    @staticmethod
    def _load_tokenizer(model: torch.nn.Module, args: IterativeSFTConfig):
        from transformers import AutoTokenizer

        path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
        if not path:
            logger.warning("no `processing_class` and the model has no name_or_path: step() takes `input_ids` "
                           "only (texts and prompts/completions need a tokenizer)")
            return None
        kwargs = {k: v for k, v in (args.model_init_kwargs or {}).items() if k in _CONFIG_KWARGS}
        return AutoTokenizer.from_pretrained(path, **kwargs)

    def _create_step_scheduler(self):
        """Trainer's schedule when ``max_steps > 0``; otherwise one that needs no total length."""
        from transformers import get_scheduler

        args = self.args
        if args.max_steps > 0:
            return self.create_scheduler(num_training_steps=args.max_steps, optimizer=self.optimizer)
        warmup = args.warmup_steps
        if 0 < warmup < 1:
            logger.warning("`warmup_steps`=%s is a ratio of `max_steps`, which is not set: no warmup", warmup)
            warmup = 0
        try:
            return get_scheduler(args.lr_scheduler_type, optimizer=self.optimizer, num_warmup_steps=int(warmup),
                                 num_training_steps=None, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
        except ValueError as err:
            if "num_training_steps" not in str(err):
                raise
        name = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
        log = logger.info if name == "linear" else logger.warning  # linear is the default: no alarm
        log("lr_scheduler_type=%r needs `max_steps`, which is not set: using %d warmup updates, then a "
            "constant learning rate", name, int(warmup))
        return get_scheduler("constant_with_warmup", optimizer=self.optimizer, num_warmup_steps=int(warmup))

    def generate(self, prompts=None, input_ids=None, **kwargs):
        """Sample completions with the current model; the JAX engine's signature and ``GenerationOutput``
        (see ``itersft_torch.generation.generate``)."""
        from .generation import generate

        return generate(self, prompts, input_ids, **kwargs)

    def train(self, *args, **kwargs):
        raise NotImplementedError(
            "IterativeSFTTrainer trains through `step(...)`, one call per batch your loop produces "
            "(input_ids / texts / prompts+completions). To train on a dataset, use transformers.Trainer or "
            "trl.SFTTrainer.")

    # ------------------------------------------------------------------------------------------------------
    # step()

    @property
    def _tokenizer(self):
        from transformers import PreTrainedTokenizerBase

        pc = self.processing_class  # a multimodal processor carries its tokenizer
        return pc if pc is None or isinstance(pc, PreTrainedTokenizerBase) else getattr(pc, "tokenizer", pc)

    def step(self, input_ids=None, attention_mask=None, labels=None, texts=None, texts_labels=None,
             prompts=None, completions=None) -> dict[str, float]:
        """Train on one batch of samples; returns the call's statistics.

        Exactly one input form: ``input_ids`` (+ ``attention_mask``, ``labels`` with -100 = no loss),
        ``texts`` (+ ``texts_labels`` as decoder targets for encoder-decoder models), or ``prompts`` +
        ``completions`` (loss on completion + EOS). Everything is validated before any state changes. The
        samples are shuffled and cut into updates of ``per_device_train_batch_size`` x
        ``gradient_accumulation_steps``; each update's loss is its token-weighted mean cross-entropy.

        Returns ``loss`` (mean token CE over the call, before each update), ``learning_rate`` and
        ``grad_norm`` (pre-clip) of the last update, ``num_tokens`` (label tokens), ``samples``, ``updates``,
        ``seconds``, ``tokens_per_second`` (non-padding tokens), ``padded_tokens`` (input positions computed,
        padding included) and ``global_step``.
        """
        start = time.perf_counter()
        args = self.args
        unwrapped = self.accelerator.unwrap_model(self.model)
        embeddings = unwrapped.get_input_embeddings() if hasattr(unwrapped, "get_input_embeddings") else None
        vocab_size = getattr(embeddings, "num_embeddings", None) or getattr(unwrapped.config, "vocab_size", None)
        examples = prepare_examples(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, texts=texts,
            texts_labels=texts_labels, prompts=prompts, completions=completions, tokenizer=self._tokenizer,
            max_length=args.max_length, truncation_mode=args.truncation_mode, vocab_size=vocab_size,
            is_encoder_decoder=self.is_encoder_decoder)
        world = self.accelerator.num_processes
        updates = plan_updates(examples, micro_batch_size=args.per_device_train_batch_size * world,
                               gradient_accumulation_steps=args.gradient_accumulation_steps, seed=args.seed,
                               call_index=self._num_calls)
        self._num_calls += 1

        model = self.model_wrapped
        was_training = model.training
        model.train()
        self.is_in_train = True
        loss_sum, tokens, seen = 0.0, 0, 0
        self._call_padded_tokens = 0
        lr = grad_norm = float("nan")
        try:
            for k, update in enumerate(updates):
                update_loss, update_tokens, lr, grad_norm = self._update(model, update)
                # One "epoch" = one pass over a call's samples: epoch counts step() calls.
                self.state.epoch = self._num_calls - 1 + (k + 1) / len(updates)
                loss_sum += update_loss
                tokens += update_tokens
                seen += sum(len(ex.input_ids) + (len(ex.labels) if self.is_encoder_decoder else 0)
                            for mb in update for ex in mb)
                self._log_loss_sum += update_loss
                self._log_tokens += update_tokens
                self._after_update(lr, grad_norm, end_of_call=False)
            self._after_update(lr, grad_norm, end_of_call=True)
        finally:
            self.is_in_train = False
            model.train(was_training)  # generation between calls runs in the mode the caller left
            if args.optimize_device_cache:
                _clear_device_cache()
        seconds = time.perf_counter() - start
        return {
            "loss": loss_sum / tokens,
            "learning_rate": float(lr),
            "grad_norm": float(grad_norm),
            "num_tokens": int(tokens),
            "samples": len(examples),
            "updates": len(updates),
            "seconds": seconds,
            "tokens_per_second": seen / seconds if seconds > 0 else float("inf"),
            "padded_tokens": self._call_padded_tokens,
            "global_step": int(self.state.global_step),
        }

    def _update(self, model: torch.nn.Module, micro_batches: list[list[Example]]) -> tuple[float, int, float, float]:
        """One optimizer update over its micro-batches: returns (summed CE, label tokens, LR, pre-clip norm)."""
        args, accelerator = self.args, self.accelerator
        if args.max_steps > 0 and self.state.global_step >= args.max_steps and not self._warned_exhausted:
            self._warned_exhausted = True
            logger.warning("max_steps=%d updates reached: the learning-rate schedule is exhausted; step() keeps "
                           "training at its final learning rate %.3g. Raise `max_steps` to continue the "
                           "schedule.", args.max_steps, self.optimizer.param_groups[0]["lr"])
        world, rank = accelerator.num_processes, accelerator.process_index
        per_device = args.per_device_train_batch_size
        update_tokens = sum(_label_tokens(mb, self.is_encoder_decoder) for mb in micro_batches)
        # Each micro-batch contributes sum(CE) / tokens of the whole update, so the accumulated gradient is
        # the gradient of the update's token-weighted mean whatever the split. DDP averages over ranks.
        scale = world / update_tokens
        pad_id = getattr(self._tokenizer, "pad_token_id", None) or 0
        ce_total = torch.zeros((), device=accelerator.device)
        model.zero_grad(set_to_none=True)
        for i, micro_batch in enumerate(micro_batches):
            shard = micro_batch[rank * per_device:(rank + 1) * per_device]
            if not shard:  # this rank still joins the collective with a zero-loss sample
                shard = [Example(micro_batch[0].input_ids, np.full_like(micro_batch[0].labels, IGNORE_INDEX))]
            sync = world == 1 or i == len(micro_batches) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                ce_sum = self._micro_batch_ce(model, shard, pad_id)
                accelerator.backward(ce_sum * scale)
            ce_total += ce_sum.detach()
            self.state.num_input_tokens_seen += sum(len(ex.input_ids) for ex in shard)

        max_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else math.inf
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        stepped = not accelerator.optimizer_step_was_skipped  # fp16 overflow skips the step
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        in_schedule = args.max_steps <= 0 or self.state.global_step <= args.max_steps
        if stepped and in_schedule and not isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.lr_scheduler.step()
        if world > 1:
            ce_total = accelerator.reduce(ce_total, reduction="sum")
        grad_norm = grad_norm.item() if torch.is_tensor(grad_norm) else float(grad_norm)
        return ce_total.item(), update_tokens, float(lr), grad_norm

    def _micro_batch_ce(self, model: torch.nn.Module, shard: list[Example], pad_id: int) -> torch.Tensor:
        device = self.accelerator.device
        label_length = max(len(ex.labels) for ex in shard) if self.is_encoder_decoder else None
        arrays = collate([shard], pad_id=pad_id, label_length=label_length)
        self._call_padded_tokens += arrays["input_ids"].size  # input positions computed, padding included
        input_ids, attention_mask, labels = (torch.from_numpy(arrays[k][0]).to(device, torch.long)
                                             for k in ("input_ids", "attention_mask", "labels"))
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.is_encoder_decoder:
            prepare = getattr(self.accelerator.unwrap_model(self.model), "prepare_decoder_input_ids_from_labels", None)
            if prepare is not None:
                inputs["decoder_input_ids"] = prepare(labels=labels)
            else:  # the model shifts its labels itself; its own (mean) loss is ignored
                inputs["labels"] = labels
        with self.accelerator.autocast():
            outputs = model(**inputs)
        logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
        return summed_token_ce(logits, labels, shift=not self.is_encoder_decoder,
                               label_smoothing=self.args.label_smoothing_factor)

    def _after_update(self, lr: float, grad_norm: float, end_of_call: bool) -> None:
        """Trainer's log / evaluate / save flow, counted in updates. An "epoch" strategy means "at the end of
        each step() call" (one pass over the call's samples)."""
        args, state = self.args, self.state
        step = state.global_step

        def due(strategy, every) -> bool:
            if end_of_call:
                return strategy == "epoch"
            return strategy == "steps" and bool(every) and every > 0 and step % every == 0

        should_log = due(args.logging_strategy, state.logging_steps) or (
            not end_of_call and step == 1 and args.logging_first_step)
        if should_log and self._log_tokens > 0:
            self.log({"loss": self._log_loss_sum / self._log_tokens, "grad_norm": grad_norm,
                      "learning_rate": lr})
            self._log_loss_sum, self._log_tokens = 0.0, 0
        should_save = due(args.save_strategy, state.save_steps) or (
            not end_of_call and args.save_strategy == "steps" and step == args.max_steps)
        if due(args.eval_strategy, state.eval_steps) and args.eval_delay <= step:
            metrics = self.evaluate()
            self.model_wrapped.train()
            if args.save_strategy == "best":
                should_save = self._determine_best_metric(metrics=metrics, trial=None)
        if should_save:
            self._save_checkpoint(self.model_wrapped, trial=None)
            self.control = self.callback_handler.on_save(args, state, self.control)
