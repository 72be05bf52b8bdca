"""The PyTorch ``IterativeSFTTrainer``: TRL's API on ``transformers.Trainer``, fed by ``itersft_jax.shared.data``.

The trainer loads the model and tokenizer, lets ``transformers.Trainer`` and accelerate build and wrap the model,
optimizer and schedule, and composes the rest: its engine (``itersft_torch.engine.TorchEngine``: how an update, a
``Datum`` pass and an evaluation run) and, written once in ``itersft_jax.shared`` and shared with the JAX engine,
``step()``'s call template, statistics, the log / evaluate / save cadence, the callback flow and the low-level API
(``flow``, ``low_level``, ``evaluation``, ``api``). It is the flow's ``FlowHost``: it holds the configuration,
transformers' state and control, and writes the checkpoints the cadence asks for. Never imports jax.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer, TrainingArguments

from itersft_jax.shared.api import TrainerAPI
from itersft_jax.shared.atomic_dir import check_model_target
from itersft_jax.shared.config import IterativeSFTConfig, resolve_config
from itersft_jax.shared.engine import FlowHost
from itersft_jax.shared.fields import check_fields, enum_name
from itersft_jax.shared.flow import check_trainer_arguments, make_callback_handler, validate_flow_args
from itersft_jax.shared.model_source import is_adapter_dir, is_peft_model, load_tokenizer
from itersft_torch.distributed import check_distributed_setup
from itersft_torch.engine import TorchEngine
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


# ----------------------------------------------------------------------------------------------------------
# The trainer


class IterativeSFTTrainer(TrainerAPI, FlowHost, Trainer):
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
        # the engine (it takes accelerate's state as built now), the flow, the low-level API (shared.api)
        self.compose(TorchEngine(self, features=self._features))
        # The flow's handler replaces Trainer's: the step()-driven flow rules instead of DefaultFlowCallback,
        # and no progress/printer callback (step() shows its own bar), so both engines run the same callbacks.
        self.callback_handler = make_callback_handler(
            args, callbacks, model=self.model, processing_class=self.processing_class, optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler)
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

    def generate(self, prompts=None, input_ids=None, **kwargs):
        """Sample completions with the current model; the JAX engine's signature and ``GenerationOutput``
        (see ``itersft_torch.generation.generate``)."""
        self.engine.restore_accelerate_state()
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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` (the main process writes; under FSDP every process joins the gathering), then
        every process waits until the files are written, so none reads them too early. A directory holding files a
        model save does not write (a user's), the working directory and those above it or above ``output_dir``, and
        a file are refused before anything is written (``atomic_dir.check_model_target``)."""
        self.engine.restore_accelerate_state()
        output_dir = check_model_target(self.args.output_dir if output_dir is None else output_dir, "output_dir",
                                        output_dir=self.args.output_dir)
        Trainer.save_model(self, output_dir, _internal_call=_internal_call)
        self.accelerator.wait_for_everyone()

    def save_for_flow(self) -> None:
        self._save_checkpoint(self.model_wrapped, trial=None)  # Trainer's: pushes to the Hub with push_to_hub
        self.accelerator.wait_for_everyone()  # on_save callbacks see the whole checkpoint on every process

    def is_best_metric(self, metrics: dict[str, float]) -> bool:
        return self._determine_best_metric(metrics=metrics, trial=None)  # Trainer's, which records the best

    def save_state(self, path: str) -> str:
        """Weights, optimizer and schedule state, RNG and counters, atomically (``itersft_torch.state``): a later
        :meth:`load_state` continues bit for bit. Refused while gradients are pending."""
        self.flow.refuse_while_pending("save_state()")
        self.engine.restore_accelerate_state()
        from itersft_torch.state import save_state

        return save_state(self, path)

    def load_state(self, path: str) -> str:
        """Restore what :meth:`save_state` wrote (verified first)."""
        self.flow.refuse_while_pending("load_state()")
        self.engine.restore_accelerate_state()
        from itersft_torch.state import load_state

        return load_state(self, path)
