"""``IterativeSFTConfig``: TRL's configuration, fixed, shared by both backends.

It is a ``transformers.TrainingArguments`` (so ``HfArgumentParser`` and every Trainer field work) with
TRL's extra fields and defaults, plus ``backend``. Differences from TRL 0.23.1 are deliberate:

* ``bf16`` left unset means "bf16 where an accelerator supports it": on a CPU-only machine it resolves
  to False instead of crashing (TRL's own quick start raised there). ``bf16=True``, explicit or resolved
  from a JAX accelerator, on a machine without a bf16 torch GPU is honoured on the CPU (``use_cpu=True``
  for the torch backend; the JAX engine computes in bf16 with fp32 master weights).
* ``logging_steps``/``save_steps``/``eval_steps`` given as ratios in (0, 1) are resolved against
  ``max_steps`` here, and refused when ``max_steps`` is not set (TRL never logged at all).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers import TrainingArguments

from itersft_jax.shared.checks import check_seed
from itersft_jax.shared.data import resolve_ratio, validate_truncation
from itersft_jax.shared.mesh_spec import parse_mesh

logger = logging.getLogger(__name__)

BACKENDS = ("jax", "torch")
_SECRET_KWARGS = ("token", "use_auth_token", "hub_token")


def _mask_secrets(kwargs: Any) -> Any:
    """``model_init_kwargs`` with token strings replaced by ``<TOKEN>``-style placeholders."""
    if not isinstance(kwargs, dict):
        return kwargs
    return {k: f"<{k.upper()}>" if k in _SECRET_KWARGS and isinstance(v, str) else v for k, v in kwargs.items()}


def _torch_bf16_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _jax_accelerator_installed() -> bool:
    # Checked without importing jax (the config layer must stay jax-free at import time).
    return any(importlib.util.find_spec(name) is not None
               for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))


def bf16_available() -> bool:
    return _torch_bf16_gpu() or _jax_accelerator_installed()


@dataclass
class IterativeSFTConfig(TrainingArguments):
    """Configuration of ``IterativeSFTTrainer`` (both backends).

    Extra fields beside ``TrainingArguments``: ``model_init_kwargs`` (passed when the model is given as
    an id or directory), ``max_length`` and ``truncation_mode`` (sequence-axis truncation),
    ``optimize_device_cache`` (torch: empty the accelerator cache after each call), ``backend``,
    ``max_skipped_updates`` and ``mesh`` (JAX: the device mesh, see ``itersft_jax.parallel.mesh``).
    """

    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for loading the model from an id or directory "
                          "(revision, torch_dtype/dtype, token, ...)."})
    max_length: int | None = field(
        default=None, metadata={"help": "Maximum tokens per sequence; longer ones are truncated."})
    truncation_mode: str = field(
        default="keep_end",
        metadata={"help": "keep_end keeps the last max_length tokens, keep_start the first.",
                  "choices": ["keep_end", "keep_start"]})
    optimize_device_cache: bool = field(
        default=False, metadata={"help": "Torch backend: empty the accelerator cache after each step() call."})
    backend: str = field(
        default="jax", metadata={"help": "Engine of IterativeSFTTrainer: 'jax' or 'torch'.",
                                 "choices": list(BACKENDS)})
    mesh: str | None = field(
        default=None, metadata={"help": "JAX engine: the device mesh, comma-separated axis:size items over the axes "
                                         "data, fsdp, expert, tensor (e.g. 'fsdp:8', 'data:2,fsdp:4', "
                                         "'fsdp:4,tensor:2', 'fsdp:2,expert:4'; one size may be -1 = the rest). "
                                         "Default: every device on fsdp."})
    max_skipped_updates: int | None = field(
        default=None, metadata={"help": "Raise after this many updates in a row were skipped as non-finite "
                                         "(None: never raise; each skip is counted and warned about)."})

    # TRL's defaults.
    logging_steps: float = field(default=10, metadata={"help": "Log every X optimizer updates (or a ratio "
                                                               "of max_steps when in (0, 1))."})
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Recompute activations in the backward pass to save memory (TRL's "
                                         "default: on; alias of activation_checkpointing in transformers 5)."})
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 compute. Unset: True where an accelerator supports bf16 and fp16 is off; "
                          "False on CPU-only machines."})

    _VALID_DICT_FIELDS: ClassVar[list[str]] = [*TrainingArguments._VALID_DICT_FIELDS, "model_init_kwargs"]

    def __post_init__(self):
        if self.model_init_kwargs is not None and not isinstance(self.model_init_kwargs, (dict, str)):
            raise TypeError(f"`model_init_kwargs` must be a dict (or a JSON object string), got "
                            f"{type(self.model_init_kwargs).__name__}")
        validate_truncation(self.max_length, self.truncation_mode)
        validate_hyperparameters(self)
        parse_mesh(self.mesh)  # syntax only; the device count is checked when the trainer builds the mesh
        if self.backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}, got {self.backend!r}")
        if self.bf16 is None:
            self.bf16 = (not self.fp16) and bf16_available()
        # Also when bf16 resolved on from a JAX accelerator beside a CPU-only torch (TrainingArguments would raise).
        if self.bf16 and not self.use_cpu and not _torch_bf16_gpu():
            logger.info("bf16=True without a bf16-capable torch GPU: the torch backend runs on the CPU")
            self.use_cpu = True
        # TRL's default gradient_checkpointing=True, without tripping transformers 5's deprecation warning.
        if "activation_checkpointing" in {f.name for f in dataclasses.fields(self)}:
            if self.activation_checkpointing is None:  # TRL's name is ours: no deprecation warning for it
                gc = self.gradient_checkpointing
                self.activation_checkpointing = True if gc is None else gc
                self.gradient_checkpointing = None
        elif self.gradient_checkpointing is None:
            self.gradient_checkpointing = True
        for name in ("logging_steps", "save_steps", "eval_steps"):
            value = getattr(self, name)
            if value is not None and 0 < value < 1:
                setattr(self, name, resolve_ratio(value, self.max_steps, name))
        super().__post_init__()
        if isinstance(self.model_init_kwargs, str):  # parsed from JSON by TrainingArguments when "{...}"
            raise TypeError("`model_init_kwargs` must be a dict (or a JSON object string)")

    # Secrets (hub_token, model_init_kwargs' token): the live object keeps them for loading and pushing; every
    # way out of it — str/repr, to_dict/to_json_string, pickling (the torch backend's training_args.bin) —
    # masks or drops them. A config read back from a pickle has no token: set it again to push or download.

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()  # masks the *_token fields
        d["model_init_kwargs"] = _mask_secrets(d.get("model_init_kwargs"))
        return d

    def __str__(self) -> str:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d = {k: f"<{k.upper()}>" if k.endswith("_token") and v is not None else v for k, v in d.items()}
        d["model_init_kwargs"] = _mask_secrets(d["model_init_kwargs"])
        return f"{type(self).__name__}(\n" + "".join(f"{k}={v},\n" for k, v in sorted(d.items())) + ")"

    __repr__ = __str__

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name, value in state.items():
            if name.endswith("_token") and isinstance(value, str):
                state[name] = None
        if isinstance(state.get("model_init_kwargs"), dict):
            state["model_init_kwargs"] = {k: v for k, v in state["model_init_kwargs"].items()
                                          if not (k in _SECRET_KWARGS and isinstance(v, str))}
        return state

    # copy.copy / copy.deepcopy would go through __getstate__: a copy keeps the secrets.
    def __copy__(self) -> IterativeSFTConfig:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict) -> IterativeSFTConfig:
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments, **overrides) -> IterativeSFTConfig:
        """Convert a plain ``TrainingArguments`` (TRL accepted one as ``args``)."""
        if isinstance(args, cls) and not overrides:
            return args
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
        own = {f.name for f in dataclasses.fields(cls) if f.init}
        values = {k: v for k, v in values.items() if k in own}
        values.update(overrides)
        return cls(**values)


def validate_hyperparameters(args: TrainingArguments) -> None:
    """ValueError naming the field for a hyper-parameter no trainer can honour (NaN/inf learning rate, negative
    weight decay, a batch of 0, ...), before anything is built. TrainingArguments accepts all of these."""
    def number(name: str, low: float, below: float | None = None, optional: bool = False) -> None:
        value = getattr(args, name)
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"`{name}` must be a number, got {type(value).__name__}: {value!r}")
        if not (math.isfinite(value) and value >= low and (below is None or value < below)):
            bounds = f">= {low}" if below is None else f"in [{low}, {below})"
            raise ValueError(f"`{name}` must be a finite number {bounds}, got {value!r}")

    check_seed(args.seed, "seed")
    check_seed(getattr(args, "data_seed", None), "data_seed")
    number("learning_rate", 0)
    number("label_smoothing_factor", 0, 1)
    number("neftune_noise_alpha", 0, optional=True)
    number("weight_decay", 0)
    number("adam_beta1", 0, 1)
    number("adam_beta2", 0, 1)
    number("adam_epsilon", 0)
    number("warmup_steps", 0)
    for name in ("logging_steps", "save_steps"):
        number(name, 0)
    number("eval_steps", 0, optional=True)
    if args.max_grad_norm is not None and (math.isnan(args.max_grad_norm) or args.max_grad_norm < 0):
        raise ValueError(f"`max_grad_norm` must be >= 0 (0 or inf: no clipping), got {args.max_grad_norm!r}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
    warmup = max(args.warmup_steps or 0, getattr(args, "warmup_ratio", 0) or 0)  # warmup_ratio: transformers 4.x
    if 0 < warmup < 1 and not args.max_steps > 0:
        name = "warmup_steps" if 0 < (args.warmup_steps or 0) < 1 else "warmup_ratio"
        raise ValueError(f"`{name}`={warmup} is a ratio of `max_steps`, which is not set (the number of updates "
                         f"of an iterative run is open): give `{name}` as a number of updates (>= 1), or set "
                         f"`max_steps`")
    check_scheduler_kwargs(args)
    parse_optim_args(args.optim_args)
    skipped = getattr(args, "max_skipped_updates", None)
    if skipped is not None and (isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 1):
        raise ValueError(f"`max_skipped_updates` must be None or an integer >= 1, got {skipped!r}")


def parse_optim_args(optim_args: Any) -> dict[str, str]:
    """``"key=value,key2=value2"`` (TrainingArguments' ``optim_args``) as a dict; ``ValueError`` naming
    ``optim_args`` for an item that is not ``key=value``."""
    if optim_args is None or optim_args == "":
        return {}
    if not isinstance(optim_args, str):
        raise TypeError(f"`optim_args` must be a string like 'beta1=0.9,beta2=0.95', got {type(optim_args).__name__}")
    parsed = {}
    for item in optim_args.replace(" ", "").split(","):
        key, sep, value = item.partition("=")
        if not (key and sep and value):
            raise ValueError(f"`optim_args`={optim_args!r}: {item!r} is not key=value (e.g. 'beta1=0.9,beta2=0.95')")
        parsed[key] = value
    return parsed


def scheduler_keywords(kind: str) -> set[str] | None:
    """The ``lr_scheduler_kwargs`` keys transformers' schedule ``kind`` takes (its function's own arguments), or
    None when transformers does not know ``kind``."""
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    try:
        function = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(kind)]
    except (ValueError, KeyError):
        return None
    own = ("optimizer", "num_warmup_steps", "num_training_steps", "last_epoch")
    if any(p.kind == p.VAR_KEYWORD for p in inspect.signature(function).parameters.values()):
        return None  # takes anything (reduce_lr_on_plateau hands its kwargs to torch)
    return {name for name, p in inspect.signature(function).parameters.items()
            if name not in own and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_scheduler_kwargs(args) -> None:
    """``ValueError`` naming ``lr_scheduler_kwargs`` for a key its schedule does not take (it would be ignored by
    the JAX engine and crash transformers' scheduler)."""
    kwargs = args.lr_scheduler_kwargs
    if not kwargs:
        return
    if not isinstance(kwargs, dict):
        raise TypeError(f"`lr_scheduler_kwargs` must be a dict, got {type(kwargs).__name__}")
    kind = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    known = scheduler_keywords(kind)
    unknown = sorted(set(kwargs) - known, key=str) if known is not None else []
    if unknown:
        raise ValueError(f"`lr_scheduler_kwargs`: lr_scheduler_type={kind!r} takes {sorted(known) or 'no keys'}, "
                         f"not {unknown}")


def resolve_config(args: TrainingArguments | None) -> IterativeSFTConfig:
    """``None`` -> default config; ``TrainingArguments`` -> converted; anything else -> TypeError."""
    if args is None:
        return IterativeSFTConfig(output_dir="trainer_output")
    if isinstance(args, IterativeSFTConfig):
        return args
    if isinstance(args, TrainingArguments):
        return IterativeSFTConfig.from_training_arguments(args)
    raise TypeError(f"`args` must be an IterativeSFTConfig or TrainingArguments, got {type(args).__name__}")
