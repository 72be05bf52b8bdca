"""What each engine does with every ``TrainingArguments`` field: honoured, refused, or not applicable.

``IterativeSFTConfig`` is a ``transformers.TrainingArguments``, so a script ported from TRL sets fields and
trusts them. A field that is accepted and dropped makes the user's experiment not the one they ran, so
every field has an explicit decision here, per engine:

* honoured — the note says where;
* refused — a non-default value raises ``ValueError`` naming the field and what to use instead;
* not applicable — the field has no meaning for ``step()``-driven training; the note says why.

``check_fields(args, engine)`` runs in each trainer's constructor. A field missing from the table (a newer
transformers) is refused when set, and ``tests/test_fields.py`` fails on it. The table in docs/configuration.md is
``python -m itersft_jax.shared.fields --markdown``. jax- and torch-free at import time.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ENGINES = ("jax", "torch")
HONOURED, REFUSED, NOT_APPLICABLE = "honoured", "refused", "n/a"


@dataclass(frozen=True)
class Rule:
    """One engine's decision for one field. ``refuse(value, args, platform)`` returns why a value is refused (or None);
    it is called only for values that differ from the field's default."""

    status: str
    note: str
    refuse: Callable[[Any, Any, str | None], str | None] | None = None


def honoured(note: str, refuse: Callable[[Any, Any, str | None], str | None] | None = None) -> Rule:
    return Rule(HONOURED, note, refuse)


def refused(instead: str, accepts: Callable[[Any], bool] = lambda value: False) -> Rule:
    return Rule(REFUSED, instead, lambda value, args, platform=None: None if accepts(value) else instead)


def not_applicable(why: str) -> Rule:
    return Rule(NOT_APPLICABLE, why)


def both(rule: Rule) -> dict[str, Rule]:
    return {"jax": rule, "torch": rule}


def each(jax: Rule, torch: Rule) -> dict[str, Rule]:
    return {"jax": jax, "torch": torch}


# ----------------------------------------------------------------------------------------------------------
# Checks of values that are honoured only in part


def enum_name(value) -> str:
    """A ``TrainingArguments`` enum field (``OptimizerNames``, ``SchedulerType``, ``IntervalStrategy``, ...) or a
    plain string, as its string value: the one reader of such fields for every module."""
    return str(getattr(value, "value", value))


def _optim_name(args) -> str:
    return enum_name(args.optim)


def _optim_args_keys(value) -> set[str]:
    return {item.split("=")[0].strip() for item in str(value).split(",") if item.strip()}


def _jax_optim_args(value, args, platform=None) -> str | None:
    """The JAX optimizers read these ``optim_args`` keys (optim.py); any other key would be dropped."""
    optim = _optim_name(args)
    known = {"sgd": {"momentum", "dampening", "nesterov"}, "adafactor": set()}.get(optim, {"beta1", "beta2"})
    unknown = sorted(_optim_args_keys(value) - known)
    if unknown:
        return (f"the JAX {optim} reads only {sorted(known) or 'no keys'} from optim_args, not {unknown}; "
                "pass optimizers=(optax_transformation, schedule) for anything else, or use backend='torch'")
    return None


# The optim_args keys transformers' Trainer reads for the optimizers it builds without an extra package
# (trainer_optimizer.py); for these a key outside the list would be dropped without a word. Other optimizers
# (bitsandbytes, GaLore, AnyPrecision, ...) read their own keys and are passed through.
_TORCH_OPTIM_ARGS = {"adamw_torch": set(), "adamw_torch_fused": set(), "adafactor": set(),
                     "sgd": {"momentum", "dampening", "weight_decay", "nesterov"},
                     "adagrad": {"lr_decay", "weight_decay", "eps"},
                     "rmsprop": {"momentum", "alpha", "eps", "weight_decay", "centered"}}


def _torch_optim_args(value, args, platform=None) -> str | None:
    optim = _optim_name(args)
    known = _TORCH_OPTIM_ARGS.get(optim)
    unknown = sorted(_optim_args_keys(value) - known) if known is not None else []
    if unknown:
        betas = " (AdamW's betas and eps are adam_beta1, adam_beta2, adam_epsilon)" if "adamw" in optim else ""
        return (f"transformers' {optim} reads only {sorted(known) or 'no keys'} from optim_args, not {unknown}"
                f"{betas}; pass optimizers=(optimizer, scheduler) for anything else")
    return None


def _jax_checkpointing_kwargs(value, args, platform=None) -> str | None:
    """nnx.remat of every decoder layer with a ``policy`` (what it saves; its names are checked where the model is
    built, against ``models.remat.REMAT_POLICIES``, the one table); ``use_reentrant`` (a torch implementation
    switch) and ``every_n_layers=1`` describe it too; nothing else does."""
    extra = {k: v for k, v in dict(value or {}).items()
             if k not in ("use_reentrant", "policy") and not (k == "every_n_layers" and v == 1)}
    if extra:
        return (f"the JAX engine rematerializes every decoder layer (nnx.remat) and has no {sorted(extra)}; "
                f"it takes 'policy' and use_reentrant, or use backend='torch'")
    return None


def _jax_gradient_checkpointing_kwargs(value, args, platform=None) -> str | None:
    if hasattr(args, "activation_checkpointing_kwargs"):
        return None  # transformers >= 5 mirrors it there: checked once, under the new name
    return _jax_checkpointing_kwargs(value, args, platform)


def _torch_schedule(value, args, platform=None) -> str | None:
    name = enum_name(value)
    if name in ("reduce_lr_on_plateau", "greedy"):
        return (f"lr_scheduler_type={name!r} steps on evaluation metrics, which step() never feeds to the "
                "scheduler; use a step-driven schedule (linear, cosine, constant_with_warmup, ...)")
    return None


def _jax_full_determinism(value, args, platform=None) -> str | None:
    """XLA is deterministic on CPU and TPU; on GPU only with ``--xla_gpu_deterministic_ops``, a flag read when
    jax starts its backend — too late to set here."""
    if not value:
        return None
    deterministic_flag = "--xla_gpu_deterministic_ops=true" in os.environ.get("XLA_FLAGS", "")
    if platform == "gpu" and not deterministic_flag:
        return ("on a GPU, XLA is deterministic only with XLA_FLAGS=--xla_gpu_deterministic_ops=true set before "
                "jax starts; set it in the environment of the process")
    return None


def _num_train_epochs_is_one(value) -> bool:
    return value == 1


# ----------------------------------------------------------------------------------------------------------
# The table. Order: the installed transformers' TrainingArguments, then IterativeSFTConfig's own fields.

_SHELL = "trainer flow: "  # JAX cadences and integrations kept by itersft_jax/shared/flow.py
_NO_DATALOADER = ("step() takes the samples of each call and evaluate() its samples or eval_dataset columns "
                  "(shared.evaluation, both engines): there is no dataloader")
_ONE_PROCESS = ("the JAX engine's processes run one program over every device (jax.distributed) and process 0 logs "
                "and writes; there are no per-node replicas to configure")
_TORCH_COMPILE_SETTING = each(not_applicable("torch.compile setting; XLA compiles the JAX steps"),
                              honoured("accelerate's TorchDynamoPlugin"))
_REPORTING = each(honoured(_SHELL + "logging integrations"), honoured("Trainer's integration callbacks"))
_TRACKIO = each(honoured(_SHELL + "Trackio integration"), honoured("Trackio callback"))
_HUB = each(honoured(_SHELL + "push_to_hub"), honoured("Trainer"))
_NO_DDP = "no torch DDP: the JAX engine shards with one jax.sharding.Mesh"
_INFORMATIONAL = "informational: transformers' own Trainer does not read it either (for your scripts)"

FIELDS: dict[str, dict[str, Rule]] = {
    "output_dir": both(honoured("checkpoints and save_model()'s default directory")),
    "per_device_train_batch_size": both(honoured("micro-batch size of step() (data.plan_updates), per device")),
    "num_train_epochs": both(refused(
        "step() makes one pass over the samples it is given (state.epoch counts calls); for more passes, call "
        "step() again or repeat the samples", accepts=_num_train_epochs_is_one)),
    "max_steps": both(honoured("length of the LR schedule; updates past it keep its final LR, with a warning")),
    "learning_rate": both(honoured("the schedule's peak")),
    "lr_scheduler_type": each(
        honoured("optim.build_schedule (jnp transcription of transformers'); unsupported types raise there"),
        honoured("Trainer.create_scheduler; without max_steps: warmup then constant",
                 refuse=_torch_schedule)),
    "lr_scheduler_kwargs": both(honoured("passed to the schedule")),
    "warmup_steps": both(honoured("count, or ratio of max_steps when in (0, 1)")),
    "optim": each(
        honoured("optim.build_optimizer: adamw_* (torch-exact AdamW; quantized/fused variants as fp32 AdamW), "
                 "sgd, adafactor; others raise there"),
        honoured("Trainer.create_optimizer")),
    "optim_args": each(honoured("optim.build_optimizer (adamw: beta1/beta2; sgd: momentum/dampening/nesterov)",
                                refuse=_jax_optim_args),
                       honoured("Trainer.create_optimizer (sgd, adagrad, rmsprop: their keys; adamw_torch: none)",
                                refuse=_torch_optim_args)),
    "weight_decay": both(honoured("decoupled (AdamW) or coupled (SGD) decay, HF's mask: no decay on biases "
                                  "and norms")),
    "adam_beta1": both(honoured("AdamW")),
    "adam_beta2": both(honoured("AdamW")),
    "adam_epsilon": both(honoured("AdamW")),
    "optim_target_modules": each(
        refused("GaLore/APOLLO-style optimizers exist only on the torch backend: use backend='torch'"),
        honoured("Trainer.create_optimizer (GaLore, APOLLO, ...)")),
    "gradient_accumulation_steps": both(honoured("micro-batches per optimizer update, token-weighted")),
    "average_tokens_across_devices": both(honoured(
        "always: an update's loss is its summed CE over every label token on every device / their count",
        refuse=lambda value, args, platform=None: None if value else (
            "both engines always normalise by the label tokens of the whole update across devices "
            "(per-device means would weight tokens unequally); leave it True"))),
    "max_grad_norm": both(honoured("global-norm clipping with torch's formula; 0 disables it")),
    "label_smoothing_factor": both(honoured("token-weighted label-smoothed CE in the loss (= transformers' "
                                            "LabelSmoother)")),
    "bf16": each(honoured("bf16 compute, fp32 master weights, fp32 softmax and loss"),
                 honoured("accelerate's bf16 autocast")),
    "fp16": each(refused("the JAX engine has no fp16 loss scaling: use bf16=True (same memory, fp32 range)"),
                 honoured("accelerate's fp16 autocast with a GradScaler; overflowing updates are skipped")),
    "bf16_full_eval": both(refused(
        "evaluate() runs at the training precision (transformers would cast the model in place, and the next "
        "step() would train the cast weights); use bf16=True")),
    "fp16_full_eval": both(refused(
        "evaluate() runs at the training precision (transformers would cast the model in place, and the next "
        "step() would train the cast weights)")),
    "tf32": each(honoured("fp32 matmuls at XLA's default precision (TF32 on GPUs) instead of 'highest'"),
                 honoured("TrainingArguments enables TF32 in torch's CUDA backends")),
    "activation_checkpointing": each(honoured("nnx.remat of every decoder layer (policy: *_kwargs)"),
                                     honoured("model.activation_checkpointing_enable, non-reentrant")),
    "activation_checkpointing_kwargs": each(honoured("'policy': full | dots | offload (models.remat); "
                                                     "use_reentrant accepted (no JAX meaning)",
                                                     refuse=_jax_checkpointing_kwargs),
                                            honoured("passed to the model's checkpointing")),
    "gradient_checkpointing": each(honoured("alias of activation_checkpointing: nnx.remat of every decoder layer"),
                                   honoured("alias of activation_checkpointing")),
    "gradient_checkpointing_kwargs": each(honoured("alias of activation_checkpointing_kwargs",
                                                   refuse=_jax_gradient_checkpointing_kwargs),
                                          honoured("alias of activation_checkpointing_kwargs")),
    "torch_compile": each(not_applicable("the train and eval steps are always compiled by XLA (jax.jit)"),
                          honoured("accelerate compiles the model that step() and evaluate() run; generate() "
                                   "runs the uncompiled one")),
    "torch_compile_backend": _TORCH_COMPILE_SETTING,
    "torch_compile_mode": _TORCH_COMPILE_SETTING,
    "use_liger_kernel": each(
        honoured("by design: the loss is computed in chunks from the hidden states (never the [N, V] fp32 "
                 "logits, which Liger's fused linear cross-entropy avoids) and XLA fuses norms and activations"),
        honoured("itersft_torch.features: Liger's kernels patched into the model (needs liger-kernel and a "
                 "CUDA GPU; a clear error otherwise)")),
    "liger_kernel_config": each(not_applicable("Liger is a set of Triton kernels for torch models"),
                                honoured("passed to Liger")),
    "use_cache": each(not_applicable("training forwards never build a KV cache; generate() always uses one"),
                      honoured("Trainer sets model.config.use_cache (training forwards)")),
    "neftune_noise_alpha": each(
        honoured("train_step: uniform noise of size alpha/sqrt(L*d) on the input embeddings of step()'s updates "
                 "only (L = each sample's length; models.layers.neftune_noise); never in generate()/evaluate()"),
        honoured("itersft_torch.features: uniform noise of size alpha/sqrt(L*d) on the input embeddings of "
                 "step()'s forwards only (L = each sample's length); never in generate()/evaluate()")),
    "torch_empty_cache_steps": each(
        not_applicable("XLA's allocator has no cache to empty"),
        refused("step() does not empty the cache every N updates; use optimize_device_cache=True (after each "
                "step() call)")),
    "auto_find_batch_size": both(refused(
        "step() does not retry with smaller batches on out-of-memory; set per_device_train_batch_size")),
    "logging_strategy": each(honoured(_SHELL + "log cadence in updates"),
                             honoured("log cadence in updates; 'epoch' = end of each step() call")),
    "logging_steps": both(honoured("log every N updates (ratio of max_steps when in (0, 1))")),
    "logging_first_step": each(honoured(_SHELL + "log after the first update"),
                               honoured("log after the first update")),
    "log_on_each_node": each(not_applicable(_ONE_PROCESS), honoured("Trainer's log levels per node")),
    "logging_nan_inf_filter": both(not_applicable(
        "logged losses are never filtered: a non-finite loss is logged as it is, so a diverging run shows")),
    "include_num_input_tokens_seen": each(
        honoured("step() returns num_input_tokens_seen: the samples' input tokens, padding excluded, for 'all' "
                 "and 'non_padding' alike (state.num_input_tokens_seen always counts them)"),
        honoured("step() returns num_input_tokens_seen, same definition as the JAX engine; Trainer.log adds it "
                 "to the logs")),
    "log_level": each(honoured("level of the itersft_jax logger (and transformers' verbosity)"),
                      honoured("Trainer sets transformers' verbosity")),
    "log_level_replica": each(not_applicable(_ONE_PROCESS), honoured("Trainer sets replicas' verbosity")),
    "disable_tqdm": each(honoured("step()'s progress bar (calls of at least 8 updates)"),
                         honoured("evaluate()'s progress bar; step() shows none")),
    "report_to": _REPORTING,
    "run_name": _REPORTING,
    "project": _TRACKIO,
    "trackio_space_id": _TRACKIO,
    "trackio_bucket_id": _TRACKIO,
    "trackio_static_space_id": _TRACKIO,
    "eval_strategy": each(honoured(_SHELL + "evaluate() every eval_steps updates"),
                          honoured("evaluate() every eval_steps updates; 'epoch' = end of each step() call")),
    "eval_steps": each(honoured(_SHELL + "evaluation cadence in updates"), honoured("evaluation cadence in updates")),
    "eval_delay": each(honoured(_SHELL + "no evaluation before this update"),
                       honoured("no evaluation before this update")),
    "per_device_eval_batch_size": both(honoured("samples per evaluate() batch (x devices on JAX)")),
    "prediction_loss_only": both(honoured("evaluate() skips compute_metrics (shared.evaluation)")),
    "eval_on_start": both(refused("there is no start of training in step(): call trainer.evaluate() before the "
                                  "first step()")),
    "eval_do_concat_batches": both(refused("evaluate() always concatenates the batches' predictions for "
                                           "compute_metrics; leave it True")),
    "eval_use_gather_object": both(refused("evaluate() gathers no Python objects across processes")),
    "eval_accumulation_steps": both(not_applicable("evaluate() moves predictions to the host after every batch")),
    "include_for_metrics": both(refused("EvalPrediction carries predictions and label_ids only")),
    "batch_eval_metrics": both(refused("compute_metrics is called once on the whole eval set")),
    "save_only_model": each(refused("JAX checkpoints always hold the whole train state (exact resume); "
                                    "trainer.save_model() writes the model alone"),
                            honoured("Trainer._save_checkpoint")),
    "save_strategy": each(honoured("checkpoint cadence (trainer flow); 'best' refused (no best-metric tracking)",
                                   lambda value, args, platform=None: "it has no best-metric tracking; use 'steps' "
                                   "or 'epoch'" if enum_name(value) == "best" else None),
                          honoured("checkpoint cadence; 'epoch' = end of each step() call")),
    "save_steps": both(honoured("checkpoint every N updates")),
    "save_on_each_node": each(not_applicable(_ONE_PROCESS), honoured("Trainer._save_checkpoint")),
    "save_total_limit": both(honoured("older checkpoints are rotated out")),
    "enable_jit_checkpoint": both(refused(
        "checkpoint on SIGTERM is a Trainer.train() callback that step() does not run; use save_steps")),
    "push_to_hub": each(honoured(_SHELL + "push checkpoints and save_model()"), honoured("Trainer")),
    "hub_token": _HUB,
    "hub_private_repo": _HUB,
    "hub_model_id": _HUB,
    "hub_strategy": _HUB,
    "hub_always_push": _HUB,
    "hub_revision": _HUB,
    "load_best_model_at_end": both(refused(
        "step() has no end of training to load it at; load the best checkpoint yourself "
        "(save_strategy='best' keeps it)")),
    "metric_for_best_model": each(not_applicable("save_strategy='best' is refused on the JAX engine"),
                                  honoured("with save_strategy='best'")),
    "greater_is_better": each(not_applicable("save_strategy='best' is refused on the JAX engine"),
                              honoured("with save_strategy='best'")),
    "ignore_data_skip": both(not_applicable("step() has no dataset to skip into when resuming")),
    "restore_callback_states_from_checkpoint": both(refused(
        "callback states are not saved in checkpoints; resume restores the train state and counters")),
    "full_determinism": each(
        honoured("XLA is deterministic on CPU and TPU; on GPU it needs XLA_FLAGS=--xla_gpu_deterministic_ops=true",
                 refuse=_jax_full_determinism),
        honoured("Trainer.__init__ calls enable_full_determinism(seed)")),
    "seed": each(honoured("train-state RNG, generate()'s default seed, and the shuffle when data_seed is unset"),
                 honoured("set_seed at construction (dropout, NEFTune noise); the shuffle when data_seed is unset")),
    "data_seed": both(honoured("seeds the shuffle of step()'s samples (with the call counter); seed otherwise")),
    "use_cpu": each(not_applicable(
        "the JAX engine runs on jax.devices() (use JAX_PLATFORMS=cpu); the config sets use_cpu for the torch "
        "backend when bf16 is asked for without a bf16 GPU"), honoured("accelerate's device")),
    "accelerator_config": each(not_applicable("accelerate settings; the JAX engine does not use accelerate"),
                               honoured("accelerate")),
    "parallelism_config": both(refused(
        "tensor/context parallelism is not supported by step(); data parallel (and FSDP on torch) only")),
    "dataloader_drop_last": both(not_applicable(_NO_DATALOADER)),
    "dataloader_num_workers": both(not_applicable(_NO_DATALOADER)),
    "dataloader_pin_memory": both(not_applicable(_NO_DATALOADER)),
    "dataloader_persistent_workers": both(not_applicable(_NO_DATALOADER)),
    "dataloader_prefetch_factor": both(not_applicable(_NO_DATALOADER)),
    "dataloader_multiprocessing_context": both(not_applicable(_NO_DATALOADER)),
    "dataloader_in_order": both(not_applicable(_NO_DATALOADER)),
    "remove_unused_columns": both(not_applicable("evaluate() reads only step()'s columns")),
    "label_names": both(not_applicable("evaluate() reads the `labels` column")),
    "train_sampling_strategy": both(refused(
        "step() shuffles each call's samples (seeded by data_seed or seed) and sorts each update by length; "
        "leave it 'random'")),
    "length_column_name": both(not_applicable("read only by train_sampling_strategy='group_by_length', refused")),
    "ddp_find_unused_parameters": each(not_applicable(_NO_DDP), honoured("accelerate's DDP")),
    "ddp_bucket_cap_mb": each(not_applicable(_NO_DDP), honoured("accelerate's DDP")),
    "ddp_broadcast_buffers": each(not_applicable(_NO_DDP), honoured("accelerate's DDP")),
    "ddp_static_graph": each(not_applicable(_NO_DDP), honoured("accelerate's DDP")),
    "ddp_backend": each(not_applicable(_NO_DDP), honoured("accelerate's process group")),
    "ddp_timeout": each(not_applicable(_NO_DDP), honoured("accelerate's process group")),
    "fsdp": each(refused("the JAX engine is data parallel over one Mesh; use backend='torch' for FSDP"),
                 honoured("accelerate's FSDP")),
    "fsdp_config": each(refused("the JAX engine is data parallel over one Mesh; use backend='torch' for FSDP"),
                        honoured("accelerate's FSDP")),
    "deepspeed": both(refused("DeepSpeed is not supported; use FSDP or DDP on backend='torch'")),
    "debug": both(refused("transformers' debug options hook into Trainer.train(), which step() does not run")),
    "skip_memory_metrics": each(refused("the JAX engine reports no memory metrics; leave it True"),
                                honoured("evaluate()'s memory metrics")),
    "do_train": both(not_applicable(_INFORMATIONAL)),
    "do_eval": both(not_applicable(_INFORMATIONAL)),
    "do_predict": both(not_applicable(_INFORMATIONAL)),
    "resume_from_checkpoint": both(not_applicable(
        _INFORMATIONAL + "; the JAX engine resumes with trainer.resume_from_checkpoint(path)")),
    "local_rank": each(not_applicable("set by torch launchers; JAX multi-host uses jax.distributed"),
                       honoured("torch.distributed launch")),
    # IterativeSFTConfig's own fields.
    "model_init_kwargs": each(honoured("hub kwargs, dtype, config overrides; trust_remote_code and "
                                       "quantization_config are refused, torch-only loading kwargs (device_map, "
                                       "attn_implementation, ...) have no JAX meaning (weights.load_model)"),
                              honoured("from_pretrained kwargs")),
    "max_length": both(honoured("sequence-axis truncation (data.prepare_examples)")),
    "truncation_mode": both(honoured("keep_end | keep_start")),
    "optimize_device_cache": each(not_applicable("XLA's allocator has no cache to empty"),
                                  honoured("empties the accelerator cache after each step() call")),
    "backend": both(honoured("picks the engine (IterativeSFTTrainer facade)")),
    "max_skipped_updates": both(honoured("raise after this many non-finite updates in a row (shared.flow)")),
    "mesh": each(honoured("the device mesh: data / fsdp / expert / tensor axes (itersft_jax.parallel.mesh, "
                          "parallel.sharding)"),
                 refused("the torch backend's parallelism is set by its launcher (accelerate launch / torchrun, "
                         "an accelerate config for FSDP)")),
}
# transformers 4.x's name for a warmup ratio, still read by optim.get_warmup_steps (JAX) and Trainer (torch).
FIELDS["warmup_ratio"] = both(honoured("ratio of max_steps (transformers 4.x)"))


# ----------------------------------------------------------------------------------------------------------


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _empty(value) -> bool:
    return value is None or (isinstance(value, (str, list, tuple, dict)) and len(value) == 0)


def is_default(f: dataclasses.Field, value: Any) -> bool:
    """``value`` is the field's default, or what ``__post_init__`` resolves the default to: enums equal their
    string values, and an unset value normalised to ``[]``/``""``/``None`` (``debug``, ``report_to``, ...)."""
    default = _default(f)
    try:
        if value == default:
            return True
    except Exception:  # noqa: BLE001 - exotic values (arrays) are simply not the default
        return False
    if _empty(default) and _empty(value):
        return True
    if f.name == "include_num_input_tokens_seen":  # False -> "no" in __post_init__
        return value in ("no", False)
    return False


def _show(name: str, value: Any) -> str:
    if name.endswith("token") or name.endswith("_token_id"):
        return "<set>"  # never print secrets
    if isinstance(value, list):
        return repr([enum_name(v) if hasattr(v, "value") else v for v in value])
    return repr(enum_name(value) if hasattr(value, "value") else value)


def refusals(args, engine: str, platform: str | None = None) -> list[str]:
    """Every refused field of ``args`` on ``engine``, as messages naming the field (empty: all accepted).
    ``platform``: the engine's device platform (``"cpu"``, ``"gpu"``, ``"tpu"``; None: unknown), for the rules that
    depend on it — the engine passes it, this layer imports no jax."""
    if engine not in ENGINES:
        raise ValueError(f"`engine` must be one of {ENGINES}, got {engine!r}")
    label = {"jax": "the JAX engine", "torch": "the torch backend"}[engine]
    messages = []
    for f in dataclasses.fields(args):
        if not f.init:
            continue
        value = getattr(args, f.name)
        default = is_default(f, value)
        rules = FIELDS.get(f.name)
        if rules is None:
            if not default:
                messages.append(f"`{f.name}={_show(f.name, value)}`: itersft has no decision for this field of "
                                "the installed transformers, so it cannot honour it; leave it unset")
            continue
        rule = rules[engine]
        if rule.refuse is None or default:
            continue
        why = rule.refuse(value, args, platform)
        if why:
            messages.append(f"`{f.name}={_show(f.name, value)}` is not supported by {label}: {why}")
    return messages


def check_fields(args, engine: str, platform: str | None = None) -> None:
    """Raise ``ValueError`` listing every field of ``args`` that ``engine`` refuses (called by each trainer's
    constructor, before any state is built)."""
    messages = refusals(args, engine, platform)
    if messages:
        raise ValueError("IterativeSFTConfig: " + "\n".join(messages) if len(messages) == 1
                         else "IterativeSFTConfig:\n- " + "\n- ".join(messages))


def shuffle_seed(args) -> int:
    """The seed of step()'s shuffle on both engines: ``data_seed`` when set, else ``seed``."""
    return int(args.data_seed if getattr(args, "data_seed", None) is not None else args.seed)


def counts_input_tokens(args) -> bool:
    """Whether ``include_num_input_tokens_seen`` asks for ``num_input_tokens_seen`` in step()'s result and the logs
    (the one reader of the field: False becomes "no" in transformers' ``__post_init__``)."""
    return enum_name(getattr(args, "include_num_input_tokens_seen", "no")) not in ("no", "False")


def input_token_stats(args, state) -> dict[str, int]:
    """step()'s ``num_input_tokens_seen`` when ``include_num_input_tokens_seen`` asks for it (else nothing)."""
    if not counts_input_tokens(args):
        return {}
    return {"num_input_tokens_seen": int(state.num_input_tokens_seen or 0)}


# ----------------------------------------------------------------------------------------------------------
# The table of docs/configuration.md


def _cell(rule: Rule) -> str:
    label = {HONOURED: "honoured", REFUSED: "**refused** unless default", NOT_APPLICABLE: "n/a"}[rule.status]
    if rule.status == HONOURED and rule.refuse is not None:
        label = "honoured (other values refused)"
    return f"{label}: {rule.note}".replace("|", "\\|")


def markdown_table() -> str:
    """The field table as Markdown, one row per field (docs/configuration.md embeds it)."""
    lines = ["| field | JAX engine | torch backend |", "|---|---|---|"]
    for name, rules in FIELDS.items():
        jax, torch = rules["jax"], rules["torch"]
        lines.append(f"| `{name}` | {_cell(jax)} | {_cell(torch)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the field table of docs/configuration.md")
    if parser.parse_args().markdown:
        print(markdown_table(), end="")
