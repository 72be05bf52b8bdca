"""Which parameters train: the whole model, or LoRA adapters over a frozen base — decided once, here.

``split_trainable(module, adapters)`` splits a module (with its adapters attached, ``io.peft_io.attach_from_source``)
into ``(graphdef, params, frozen)``: ``params`` is what the optimizer trains (fp32 master weights), ``frozen`` the
rest (``None`` for full fine-tuning) — ``TrainState`` holds both and the train step differentiates ``params`` only.
"""

from __future__ import annotations

from typing import Any

from itersft_jax.models.lora import Adapters, LoRAParam


def split_trainable(module, adapters: Adapters | None, *, frozen_dtype=None) -> tuple[Any, Any, Any]:
    """``(graphdef, params, frozen)`` of ``module`` (``frozen_dtype``: the frozen base's storage dtype, e.g. bf16;
    ``None`` keeps the loaded dtype)."""
    import jax
    from flax import nnx

    if adapters is None:
        graphdef, params = nnx.split(module, nnx.Param)
        return graphdef, params, None
    graphdef, params, frozen = nnx.split(module, LoRAParam, nnx.Param)
    if frozen_dtype is not None:
        frozen = jax.tree.map(lambda x: x.astype(frozen_dtype) if x.dtype != frozen_dtype else x, frozen)
    return graphdef, params, frozen
