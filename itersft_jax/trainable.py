"""Which parameters train: the whole model, or LoRA adapters over a frozen base.

``resolve_model_source(model, peft_config)`` says where the base weights come from and which adapters to put on
them (a ``peft_config``, an existing ``peft.PeftModel``, or a PEFT adapter directory); ``make_trainable(module,
...)`` attaches them and splits the module into ``(graphdef, params, frozen)``: ``params`` is what the optimizer
trains (fp32 master weights), ``frozen`` the rest (``None`` for full fine-tuning) — ``TrainState`` holds both and
the train step differentiates ``params`` only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from itersft_jax import peft_io
from itersft_jax.lora import LoRAParam, LoRASettings, attach_adapters


@dataclasses.dataclass(frozen=True)
class Adapters:
    """The LoRA adapters of a trainer: their settings and the HF module name -> path of each adapted layer."""

    settings: LoRASettings
    targets: dict[str, tuple]


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where the base comes from (``load_model``'s source), and the adapters to attach (or ``None``)."""

    base: Any
    settings: LoRASettings | None = None
    adapter_tensors: dict | None = None  # existing PEFT adapter weights to start from


def resolve_model_source(model: Any, peft_config: Any = None) -> ModelSource:
    """ValueError/TypeError naming the argument for conflicts, before anything is loaded."""
    existing = peft_io.is_peft_model(model) or peft_io.is_adapter_dir(model)
    if existing and peft_config is not None:
        raise ValueError("`peft_config` given with a model that already holds a PEFT adapter (a PeftModel or an "
                         "adapter directory): its own adapter config is used; drop `peft_config`")
    if existing:
        base, config, tensors = peft_io.read_adapter(model)
        return ModelSource(base, LoRASettings.from_peft(config), tensors)
    if peft_config is None:
        return ModelSource(model)
    return ModelSource(model, LoRASettings.from_peft(peft_config))


def make_trainable(module, hf_config, source: ModelSource, *, seed: int = 0, frozen_dtype=None):
    """``(graphdef, params, frozen, adapters)``: the module split into what trains and what stays frozen
    (``frozen_dtype``: the frozen base's storage dtype, e.g. bf16; ``None`` keeps the loaded dtype)."""
    import jax
    from flax import nnx

    if source.settings is None:
        graphdef, params = nnx.split(module, nnx.Param)
        return graphdef, params, None, None
    targets = attach_adapters(module, hf_config, source.settings, seed=seed)
    if source.adapter_tensors is not None:
        peft_io.load_adapter_tensors(module, targets, source.adapter_tensors)
    graphdef, params, frozen = nnx.split(module, LoRAParam, nnx.Param)
    if frozen_dtype is not None:
        frozen = jax.tree.map(lambda x: x.astype(frozen_dtype) if x.dtype != frozen_dtype else x, frozen)
    return graphdef, params, frozen, Adapters(source.settings, targets)
