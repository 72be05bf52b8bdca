"""The PyTorch ``IterativeSFTTrainer``: TRL's API on ``transformers.Trainer``, fed by ``itersft_jax.shared.data``.

One ``step()`` call: validate and prepare the samples (``data.prepare_examples``), plan the optimizer updates
(``data.plan_updates``, the very plan the JAX engine gets), then per update accumulate the gradient of the
summed token cross-entropy over its micro-batches, divided once by the update's label-token count, clip,
and step the optimizer and the schedule — or skip the update when its loss or gradient norm is not finite.
The engine protocol (``itersft_jax.shared.engine.Engine``) is implemented here; ``step()``'s call template,
statistics, the log / evaluate / save cadence, the callback flow and the low-level API are written once in
``itersft_jax.shared`` (``flow``, ``low_level``, ``evaluation``, ``api``) and shared with the JAX engine. Never imports
jax.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, Trainer, TrainingArguments

from itersft_jax.shared.api import TrainerAPI
from itersft_jax.shared.atomic_dir import check_model_target
from itersft_jax.shared.config import IterativeSFTConfig, resolve_config
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
from itersft_jax.shared.fields import check_fields, enum_name
from itersft_jax.shared.flow import check_trainer_arguments, make_callback_handler, validate_flow_args
from itersft_jax.shared.model_source import is_adapter_dir, is_peft_model, load_tokenizer
from itersft_torch import moe
from itersft_torch.distributed import check_distributed_setup, check_same_samples, release_gathered_parameters
from itersft_torch.features import StepFeatures

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


def load_model(model_id: str | os.PathLike, model_init_kwargs: dict[str, Any] | None) -> PreTrainedModel:
    """Load ``model_id`` (hub id or directory) as a causal LM, or as a seq2seq LM when its config says
    ``is_encoder_decoder``, with ``model_init_kwargs`` (dtype strings resolved; the caller's dict is not
    changed)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from itersft_jax.shared.model_source import check_model_path

    model_id = check_model_path(model_id)  # a missing local path: FileNotFoundError, not "invalid repo id"
    from itersft_jax.shared.weight_files import is_flax_only

    if is_flax_only(model_id):  # transformers v5 has no Flax classes and no from_flax
        raise ValueError(f"{model_id} holds only Flax weights (flax_model.msgpack), which transformers v5 cannot "
                         "load; use backend=\"jax\", which reads them (and can save safetensors for this backend)")
    kwargs = dict(model_init_kwargs or {})
    dtypes = {k: kwargs.pop(k) for k in ("dtype", "torch_dtype") if k in kwargs}
    if len(dtypes) == 2 and _resolve_dtype(dtypes["dtype"]) != _resolve_dtype(dtypes["torch_dtype"]):
        raise ValueError(f"`model_init_kwargs` sets both dtype and torch_dtype, differently: {dtypes}")
    if dtypes:
        kwargs[_dtype_key()] = _resolve_dtype(next(iter(dtypes.values())))
    config = AutoConfig.from_pretrained(model_id, **{k: kwargs[k] for k in _CONFIG_KWARGS if k in kwargs})
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        return auto.from_pretrained(model_id, **kwargs)
    except TypeError as err:  # a key that is neither a loading option nor a config field reaches the model class
        if "unexpected keyword argument" in str(err):
            raise ValueError(f"`model_init_kwargs`: {err} (neither a from_pretrained option nor a field of the "
                             f"model's config)") from None
        raise
    except Exception as err:  # safetensors' own error does not say which file: name it
        if type(err).__name__ == "SafetensorError" and os.path.isdir(model_id):
            from itersft_jax.shared.weight_files import check_safetensors_files

            check_safetensors_files(model_id)
        raise


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


def _check_torch_optimizers(optimizers) -> None:
    """``TypeError`` naming ``optimizers`` unless it is ``(torch optimizer or None, scheduler or None)``."""
    if optimizers is None:
        return
    optimizer, scheduler = optimizers
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`optimizers[0]` must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}: "
                        f"{optimizer!r}"[:300])
    if scheduler is not None and not (callable(getattr(scheduler, "step", None))
                                      and callable(getattr(scheduler, "state_dict", None))):
        raise TypeError(f"`optimizers[1]` must be a torch learning-rate scheduler or None, got "
                        f"{type(scheduler).__name__}: {scheduler!r}"[:300])


def _accelerate_state_snapshot() -> tuple[dict, dict]:
    """accelerate's process-wide state (``PartialState``, ``AcceleratorState``) as this trainer built it."""
    from accelerate.state import AcceleratorState, PartialState

    return dict(PartialState._shared_state), dict(AcceleratorState._shared_state)


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


# ----------------------------------------------------------------------------------------------------------
# The trainer


class IterativeSFTTrainer(TrainerAPI, Engine, Trainer):
    """TRL's ``IterativeSFTTrainer`` on ``transformers.Trainer``: the user's loop owns the data and calls
    ``step(...)`` with each batch that survived generation and filtering.

    ``model`` is a hub id or directory (loaded with ``args.model_init_kwargs`` as a causal LM, or a seq2seq
    LM when its config is encoder-decoder), a ``PreTrainedModel`` or a ``peft.PeftModel``.
    ``processing_class`` defaults to ``AutoTokenizer`` of the model's ``name_or_path``; it is read, never
    changed. ``data_collator`` is unused (the shared data layer batches); ``eval_dataset``, ``compute_metrics``,
    ``preprocess_logits_for_metrics`` and ``callbacks`` work as on the JAX engine (``itersft_jax.shared.flow``).
    ``optimizers`` replaces the optimizer and/or the schedule (default: ``Trainer``'s optimizer with its
    weight-decay mask).

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
        callbacks=None,
        peft_config=None,
    ):
        args = resolve_config(args)
        check_fields(args, "torch")
        validate_flow_args(args, eval_dataset)
        check_trainer_arguments(processing_class=processing_class, callbacks=callbacks, optimizers=optimizers,
                                peft_config=peft_config, eval_dataset=eval_dataset)
        _check_torch_optimizers(optimizers)
        if peft_config is not None and (is_peft_model(model) or is_adapter_dir(model)):
            raise ValueError("`peft_config` given with a model that already holds a PEFT adapter (a PeftModel or an "
                             "adapter directory): its own adapter config is used; drop `peft_config`")
        if is_adapter_dir(model):  # a PEFT adapter directory: its base plus the adapter, trainable
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(model, is_trainable=True, **(args.model_init_kwargs or {}))
        elif isinstance(model, (str, os.PathLike)):
            model = load_model(model, args.model_init_kwargs)
        elif not isinstance(model, torch.nn.Module):
            raise TypeError(f"`model` must be a model id, a directory, a PreTrainedModel or a PeftModel, "
                            f"got {type(model).__name__}")
        elif args.model_init_kwargs:
            logger.warning("`model_init_kwargs` are ignored: the model is already instantiated")
        if peft_config is not None:  # TRL's trainers wrap the model with peft the same way
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if processing_class is None:
            processing_class = load_tokenizer(model, **{k: v for k, v in (args.model_init_kwargs or {}).items()
                                                        if k in _CONFIG_KWARGS})
        optimizer, scheduler = optimizers
        if scheduler is not None and optimizer is None:
            raise ValueError("`optimizers` gives a scheduler without its optimizer; pass (optimizer, scheduler)")

        self.is_peft_model = is_peft_model(model)
        if not any(p.requires_grad for p in model.parameters()):  # else step() fails deep inside backward()
            hint = (" PeftModel.from_pretrained loads adapters frozen unless is_trainable=True." if self.is_peft_model
                    else "")
            raise ValueError(f"`model` has no trainable parameter (every requires_grad is False).{hint}")
        self.is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        if _checkpointing_requested(args):  # before Trainer.__init__: DDP's find_unused_parameters reads it
            enable_checkpointing(model, args)
        self._features = StepFeatures(model, args)  # Liger kernels, NEFTune: before accelerate wraps the model
        self._position_limit = False  # not looked up yet (see position_limit)

        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=None, eval_dataset=eval_dataset,
            processing_class=processing_class, compute_metrics=compute_metrics, optimizers=(optimizer, None),
            preprocess_logits_for_metrics=preprocess_logits_for_metrics)
        if self.is_deepspeed_enabled:
            raise NotImplementedError("IterativeSFTTrainer (torch) does not support DeepSpeed yet; use FSDP/DDP")
        check_distributed_setup(self.accelerator, args)
        self._prepare_model_and_optimizer()
        self.lr_scheduler = scheduler if scheduler is not None else self._create_step_scheduler()

        self.state.max_steps = max(args.max_steps, 0)
        self.state.train_batch_size = args.per_device_train_batch_size
        self.state.compute_steps(args, max(args.max_steps, 0))
        self.compose()  # the flow, the low-level API (itersft_jax.shared.api)
        # The flow's handler replaces Trainer's: the step()-driven flow rules instead of DefaultFlowCallback,
        # and no progress/printer callback (step() shows its own bar), so both engines run the same callbacks.
        self.callback_handler = make_callback_handler(
            args, callbacks, model=self.model, processing_class=self.processing_class, optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler)
        self._accelerate_state = _accelerate_state_snapshot()
        self.flow.evaluator.check_dataset()
        self.control = self.callback_handler.on_init_end(args, self.state, self.control)

    def _prepare_model_and_optimizer(self) -> None:
        """Optimizer and accelerate's wrapping (DDP/FSDP, mixed-precision forward) in the order of
        ``Trainer._prepare_for_training``, done once here because step() is the only entry point: FSDP1 builds the
        optimizer on the wrapped model's flat parameters; FSDP2 (``fully_shard``) takes model and optimizer in one
        ``prepare`` call, which swaps the optimizer's parameters for the sharded ones."""
        accelerator = self.accelerator
        if self.is_fsdp_enabled and getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) == 1:
            self.model = self.model_wrapped = accelerator.prepare(self.model)
            self.create_optimizer(self.model_wrapped)
            self.optimizer = accelerator.prepare(self.optimizer)
            return
        self.create_optimizer()
        self.model_wrapped, self.optimizer = accelerator.prepare(self.model, self.optimizer)
        if self.is_fsdp_enabled:
            self.model = self.model_wrapped

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
        name = enum_name(args.lr_scheduler_type)
        log = logger.info if name == "linear" else logger.warning  # linear is the default: no alarm
        log("lr_scheduler_type=%r needs `max_steps`, which is not set: using %d warmup updates, then a "
            "constant learning rate", name, int(warmup))
        return get_scheduler("constant_with_warmup", optimizer=self.optimizer, num_warmup_steps=int(warmup))

    def _restore_accelerate_state(self) -> None:
        """Put back accelerate's process-wide state when something emptied it since this trainer was built: every new
        ``TrainingArguments`` that sets up its devices resets it (transformers' ``_setup_devices``), which left this
        trainer's ``accelerator`` without ``num_processes`` — a config built for another trainer, or a constructor
        that refused its arguments, broke a working trainer. Called at each entry point."""
        from accelerate.state import AcceleratorState, PartialState

        partial, accelerator = self._accelerate_state
        if not PartialState._shared_state:
            PartialState._shared_state.update(partial)
        if not AcceleratorState._shared_state:
            AcceleratorState._shared_state.update(accelerator)

    def generate(self, prompts=None, input_ids=None, **kwargs):
        """Sample completions with the current model; the JAX engine's signature and ``GenerationOutput``
        (see ``itersft_torch.generation.generate``)."""
        self._restore_accelerate_state()
        from itersft_torch.generation import generate

        return generate(self, prompts, input_ids, **kwargs)

    # ------------------------------------------------------------------------------------------------------
    # step()

    @property
    def text_tokenizer(self):
        """The tokenizer for texts and prompts (a multimodal processor's ``tokenizer``), or None."""
        from transformers import PreTrainedTokenizerBase

        pc = self.processing_class
        return pc if pc is None or isinstance(pc, PreTrainedTokenizerBase) else getattr(pc, "tokenizer", pc)

    @property
    def vocab_size(self) -> int | None:
        """Rows of the input embedding (token ids must be below it)."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        embeddings = unwrapped.get_input_embeddings() if hasattr(unwrapped, "get_input_embeddings") else None
        return getattr(embeddings, "num_embeddings", None) or getattr(unwrapped.config, "vocab_size", None)

    @property
    def position_limit(self) -> int | None:
        """Positions of the model's learned position table (GPT-2's ``wpe``, OPT's and BART's ``embed_positions``:
        their rows less the table's ``offset``), or None when it has none (RoPE, ALiBi, relative positions): a longer
        sequence would index past the table, so step(), the low-level API, evaluate() and generate() refuse it."""
        if self._position_limit is False:
            limits = [module.num_embeddings - int(getattr(module, "offset", 0))
                      for name, module in self.accelerator.unwrap_model(self.model).named_modules()
                      if isinstance(module, torch.nn.Embedding)
                      and name.rsplit(".", 1)[-1] in ("wpe", "embed_positions", "position_embeddings")]
            self._position_limit = min(limits) if limits else None
        return self._position_limit

    def step_micro_batch_size(self) -> int:
        return self.args.per_device_train_batch_size * self.accelerator.num_processes

    def config_positions(self) -> int | None:
        config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        return getattr(config, "max_position_embeddings", None)

    @contextlib.contextmanager
    def training_call(self, updates):
        """The model in training mode for the call's updates, then back in the mode the caller left it (generation
        between calls runs in it)."""
        del updates  # each update is planned in full
        model = self.model_wrapped
        was_training = model.training
        self.is_in_train = True
        try:
            yield lambda update: self._update(model, update)
        finally:
            self.is_in_train = False
            model.train(was_training)
            if self.args.optimize_device_cache:
                _clear_device_cache()

    def prepare_examples(self, **forms) -> list[Example]:
        self._restore_accelerate_state()
        examples = prepare_examples(**forms, tokenizer=self.text_tokenizer, max_length=self.args.max_length,
                                    truncation_mode=self.args.truncation_mode, vocab_size=self.vocab_size,
                                    is_encoder_decoder=self.is_encoder_decoder, max_positions=self.position_limit)
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
        update_tokens = sum(_label_tokens(mb, self.is_encoder_decoder) for mb in micro_batches)
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
                ce_sum = summed_token_ce(logits, labels, shift=not self.is_encoder_decoder,
                                         label_smoothing=self.args.label_smoothing_factor)
                loss = ce_sum * scale
                if balance is not None:  # one micro-batch: transformers' aux_loss; several: its share of the update's
                    aux = self._aux_share(balance, totals)
                    loss = loss + balance.coef * aux
                    aux_total += aux.detach()
                accelerator.backward(loss)
            ce_total += ce_sum.detach()
            input_tokens += sum(len(ex.input_ids) + (len(ex.labels) if self.is_encoder_decoder else 0)
                                for ex in micro_batch)  # every rank's samples, like JAX
            padded_tokens += positions

        grad_norm = self._clipped_grad_norm(model)
        if world > 1:  # the global sums on every process: the statistics equal one process's
            totals = torch.stack([ce_total.double(), torch.tensor(float(padded_tokens), dtype=torch.float64,
                                                                  device=ce_total.device)])
            ce_total, padded_tokens = accelerator.reduce(totals, reduction="sum")
            padded_tokens = int(padded_tokens.item())
        loss = ce_total.item() / update_tokens
        extra = {}
        if balance is not None:  # the update's loss is transformers': mean CE + coef * aux
            extra["aux_loss"] = aux_total.item()
            loss += balance.coef * extra["aux_loss"]
        lr, skipped = self._optimizer_update(loss, grad_norm)
        metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr, "num_tokens": update_tokens,
                   "skipped": int(skipped), **extra}
        return UpdateRecord(metrics, input_tokens, padded_tokens)

    def _aux_share(self, balance, totals):
        """The last forward's share of the load-balancing loss: transformers' own ``aux_loss`` when it is the only
        micro-batch (``totals`` None), else its probabilities against the whole update's counts."""
        router = self._router
        if totals is None:
            return router.aux_loss
        return moe.share(moe.router_sums(router.router_logits, router.attention_mask, balance)[0], *totals, balance)

    def _router_totals(self, model, micro_batches, pad_id: int, balance, train: bool = True):
        """The update's top-k assignments and real tokens x sparse layers (a first pass without gradients), or None
        for an update of one micro-batch (its forward counts its own)."""
        if len(micro_batches) == 1:
            return None
        counts_E = tokens = 0.0
        with torch.no_grad():
            for micro_batch in micro_batches:
                self._forward(model, micro_batch, pad_id, train=train)
                _, counts, n = moe.router_sums(self._router.router_logits, self._router.attention_mask, balance)
                counts_E, tokens = counts_E + counts, tokens + n
        return counts_E, tokens

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
        lr = self.optimizer.param_groups[0]["lr"]
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not skipped or accelerator.scaler is not None:  # fp16: the scaler skips the step and lowers its scale
            self.optimizer.step()
            skipped = skipped or accelerator.optimizer_step_was_skipped
        self.optimizer.zero_grad(set_to_none=True)
        in_schedule = args.max_steps <= 0 or self.state.global_step < args.max_steps
        if not skipped and in_schedule and not isinstance(self.lr_scheduler,
                                                          torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.lr_scheduler.step()
        return float(lr), skipped

    # ------------------------------------------------------------------------------------------------------
    # The low-level API's part of the engine (itersft_jax.shared.low_level)

    def datum_vocab_size(self) -> int | None:
        return self.vocab_size

    def data_pass(self, data, loss_fn, config, backward, key_offset) -> PassResult:
        """Micro-batches of ``per_device_train_batch_size`` data, right-padded; the logits' fp32 log-softmax gives
        each target's logprob, the loss formula is ``builtin_loss`` (``itersft_torch.rl_losses``)."""
        self._restore_accelerate_state()
        if self.is_encoder_decoder:
            raise NotImplementedError("the low-level API (forward_backward, ...) trains causal LMs; this model is "
                                      "encoder-decoder: use step()")
        if self.accelerator.num_processes > 1:
            raise NotImplementedError("the low-level API runs in one process on the PyTorch engine for now")
        from itersft_jax.shared.datum import LOGPROBS_ONLY
        from itersft_torch.rl_losses import datum_loss

        model = self.model_wrapped
        was_training = model.training
        model.train(backward)
        per_device = self.args.per_device_train_batch_size
        loss_sum, count, padded, logprobs = 0.0, 0, 0, []
        # The gradients already pending are set aside while this pass computes its own: a pass that fails (or is
        # interrupted) gives them back untouched; a pass that succeeds adds them in commit(). Only when several
        # forward_backward calls accumulate into one update do both live at once.
        parameters = [p for p in model.parameters() if p.requires_grad] if backward else []
        pending = {p: p.grad for p in parameters if p.grad is not None}
        for p in parameters:
            p.grad = None

        def restore():
            for p in parameters:
                p.grad = pending.get(p)

        def commit():
            for p, grad in pending.items():
                p.grad = grad if p.grad is None else grad.add_(p.grad)

        shards = [[Example(d.model_input, np.full(len(d), IGNORE_INDEX)) for d in data[start:start + per_device]]
                  for start in range(0, len(data), per_device)]
        # A MoE with output_router_logits: coef * the pass's load-balancing loss joins the summed loss (not for
        # logprobs-only passes), as on the JAX engine.
        balance = None if loss_fn == LOGPROBS_ONLY else moe.balance_of(self.accelerator.unwrap_model(model))
        try:
            totals = (self._router_totals(model, shards, self._pad_id(), balance, train=backward)
                      if balance is not None else None)
            with contextlib.nullcontext() if backward else torch.no_grad():
                for start, examples in zip(range(0, len(data), per_device), shards):
                    shard = data[start:start + per_device]
                    logits_BTV, _, positions = self._forward(model, examples, self._pad_id(), train=backward)
                    loss, logp_BT = datum_loss(logits_BTV, shard, loss_fn, config)
                    if balance is not None:
                        loss = loss + balance.coef * self._aux_share(balance, totals)
                    if backward:
                        self.accelerator.backward(loss)
                    loss_sum += float(loss.detach())
                    count += sum(len(d) for d in shard)
                    padded += positions
                    logprobs += [logp_BT[i, :len(d)].detach().cpu().numpy() for i, d in enumerate(shard)]
        except BaseException:
            restore()
            raise
        finally:
            model.train(was_training)
        return PassResult(loss_sum, count, logprobs, padded, commit)

    def pending_gradients(self) -> dict[str, np.ndarray]:
        """The accumulated gradients (summed) on the host by parameter name."""
        model = self.accelerator.unwrap_model(self.model)
        return {name: p.grad.detach().float().cpu().numpy() for name, p in model.named_parameters()
                if p.grad is not None}

    def apply_accumulated(self, loss_sum, num_tokens):
        self._restore_accelerate_state()
        grad_norm = self._clipped_grad_norm(self.model_wrapped)
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
        return training_pad_id(self.text_tokenizer)

    def _forward(self, model: torch.nn.Module, shard: list[Example], pad_id: int, train: bool = False):
        """Logits, labels and the number of input positions computed (padding included) of one micro-batch."""
        device = self.accelerator.device
        label_length = max(len(ex.labels) for ex in shard) if self.is_encoder_decoder else None
        arrays = collate([shard], pad_id=pad_id, label_length=label_length)
        input_ids, attention_mask, labels = (torch.from_numpy(arrays[k][0]).to(device, torch.long)
                                             for k in ("input_ids", "attention_mask", "labels"))
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.is_encoder_decoder:
            prepare = getattr(self.accelerator.unwrap_model(self.model), "prepare_decoder_input_ids_from_labels", None)
            if prepare is not None:
                inputs["decoder_input_ids"] = prepare(labels=labels)
            else:  # the model shifts its labels itself; its own (mean) loss is ignored
                inputs["labels"] = labels
        noise = self._features.noise(attention_mask) if train else contextlib.nullcontext()  # NEFTune: updates only
        with self.accelerator.autocast(), noise:
            outputs = model(**inputs)
        logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
        # A MoE model with output_router_logits: its router logits and aux_loss, for step()'s load-balancing loss.
        self._router = _RouterOutputs(getattr(outputs, "router_logits", None), attention_mask,
                                      getattr(outputs, "aux_loss", None))
        return logits, labels, arrays["input_ids"].size

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` (the main process writes; under FSDP every process joins the gathering), then
        every process waits until the files are written, so none reads them too early. A directory holding files a
        model save does not write (a user's), the working directory and those above it or above ``output_dir``, and
        a file are refused before anything is written (``atomic_dir.check_model_target``)."""
        self._restore_accelerate_state()
        output_dir = check_model_target(self.args.output_dir if output_dir is None else output_dir, "output_dir",
                                        output_dir=self.args.output_dir)
        Trainer.save_model(self, output_dir, _internal_call=_internal_call)
        self.accelerator.wait_for_everyone()

    def save_for_flow(self) -> None:
        self._save_checkpoint(self.model_wrapped, trial=None)  # Trainer's: pushes to the Hub with push_to_hub
        self.accelerator.wait_for_everyone()  # on_save callbacks see the whole checkpoint on every process

    def is_best_metric(self, metrics: dict[str, float]) -> bool:
        return self._determine_best_metric(metrics=metrics, trial=None)  # Trainer's, which records the best

    def extra_counters(self) -> dict[str, Any]:
        return {}

    def restore_extra_counters(self, counters: dict[str, Any]) -> None:
        """The PyTorch engine keeps no counters of its own."""

    def save_state(self, path: str) -> str:
        """Weights, optimizer and schedule state, RNG and counters, atomically (``itersft_torch.state``): a later
        :meth:`load_state` continues bit for bit. Refused while gradients are pending."""
        self.flow.refuse_while_pending("save_state()")
        self._restore_accelerate_state()
        from itersft_torch.state import save_state

        return save_state(self, path)

    def load_state(self, path: str) -> str:
        """Restore what :meth:`save_state` wrote (verified first)."""
        self.flow.refuse_while_pending("load_state()")
        self._restore_accelerate_state()
        from itersft_torch.state import load_state

        return load_state(self, path)

    # ------------------------------------------------------------------------------------------------------
    # Evaluation (shared.evaluation calls these)

    def _eval_forwards(self, examples: list[Example]):
        """(logits, labels) per batch of ``per_device_eval_batch_size`` samples, in eval mode, without gradients."""
        model = self.model_wrapped
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in eval_batches(examples, self.args.per_device_eval_batch_size):
                    logits, labels, _ = self._forward(model, batch, self._pad_id())
                    yield logits, labels
        finally:
            model.train(was_training)
            if self.is_fsdp_enabled:
                release_gathered_parameters(model)

    def eval_loss(self, examples: list[Example]) -> tuple[float, int]:
        smoothing = self.args.label_smoothing_factor
        loss_sum = sum(float(summed_token_ce(logits, labels, shift=not self.is_encoder_decoder,
                                             label_smoothing=smoothing))
                       for logits, labels in self._eval_forwards(examples))
        return loss_sum, _label_tokens(examples, self.is_encoder_decoder)

    def eval_predictions(self, examples: list[Example]):
        for logits, labels in self._eval_forwards(examples):
            if self.preprocess_logits_for_metrics is not None:
                logits = self.preprocess_logits_for_metrics(logits, labels)
            if logits.is_floating_point():
                logits = logits.float()  # numpy has no bf16
            yield logits.cpu().numpy(), labels.cpu().numpy()
