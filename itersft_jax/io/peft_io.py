"""PEFT adapter directories <-> the JAX engine's LoRA adapters.

An adapter directory is what ``peft`` writes: ``adapter_config.json`` (the ``LoraConfig``, with the base model's
``base_model_name_or_path``) and ``adapter_model.safetensors`` with ``base_model.model.<HF module>.lora_A.weight``
``[r, in]`` and ``.lora_B.weight`` ``[out, r]`` per adapted module (the same for GPT-2's Conv1D layers). The JAX
adapters are ``lora_a [in, r]`` and ``lora_b [r, out]`` on the layer at the module's parameter path.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from itersft_jax.models.lora import Adapters, LoRASettings, attach_adapters, layer_at
from itersft_jax.shared.model_source import ADAPTER_CONFIG, is_adapter_dir, is_peft_model

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where the base comes from (``load_model``'s source), and the adapters to attach (or ``None``)."""

    base: Any
    settings: LoRASettings | None = None
    adapter_tensors: dict | None = None  # existing PEFT adapter weights to start from


def resolve_model_source(model: Any, peft_config: Any = None) -> ModelSource:
    """The base and the adapters of ``model`` (a model, a ``PeftModel`` or an adapter directory) with
    ``peft_config``; ValueError/TypeError naming the argument for conflicts, before anything is loaded."""
    existing = is_peft_model(model) or is_adapter_dir(model)
    if existing and peft_config is not None:
        raise ValueError("`peft_config` given with a model that already holds a PEFT adapter (a PeftModel or an "
                         "adapter directory): its own adapter config is used; drop `peft_config`")
    if existing:
        base, config, tensors = read_adapter(model)
        return ModelSource(base, LoRASettings.from_peft(config), tensors)
    if peft_config is None:
        return ModelSource(model)
    return ModelSource(model, LoRASettings.from_peft(peft_config))


def attach_from_source(module, hf_config, source: ModelSource, *, seed: int = 0) -> Adapters | None:
    """The adapters ``source`` asks for, attached to ``module`` (and set from its PEFT tensors when it holds
    some); ``None`` for full fine-tuning."""
    if source.settings is None:
        return None
    targets = attach_adapters(module, hf_config, source.settings, seed=seed)
    if source.adapter_tensors is not None:
        load_adapter_tensors(module, targets, source.adapter_tensors)
    return Adapters(source.settings, targets)


def read_adapter(source) -> tuple[Any, Any, dict[str, np.ndarray]]:
    """``(base model source, LoraConfig, adapter tensors)`` of a ``peft.PeftModel`` (its active adapter) or an
    adapter directory (base: its ``base_model_name_or_path``, a hub id or a directory)."""
    if is_peft_model(source):
        from peft.utils import get_peft_model_state_dict

        from itersft_jax.io.weights import state_dict_to_numpy

        name = source.active_adapter if isinstance(source.active_adapter, str) else source.active_adapter[0]
        config = source.peft_config[name]
        tensors = {k: np.asarray(v.detach().cpu().float().numpy())
                   for k, v in get_peft_model_state_dict(source, adapter_name=name).items()}
        base = source.get_base_model()
        base_tensors = {_base_name(k): v for k, v in state_dict_to_numpy(base).items() if ".lora_" not in k}
        return (base.config, base_tensors), config, tensors
    from peft import LoraConfig
    from safetensors.numpy import load_file

    path = os.fspath(source)
    config = LoraConfig.from_pretrained(path)
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise ValueError(f"adapter directory {path}: {ADAPTER_WEIGHTS} is missing (a .bin adapter is not read; "
                         f"re-save it with a current peft)")
    if not config.base_model_name_or_path:
        raise ValueError(f"adapter directory {path}: {ADAPTER_CONFIG} names no base_model_name_or_path")
    return config.base_model_name_or_path, config, load_file(weights)


def _base_name(key: str) -> str:
    """A PEFT-wrapped base's state-dict name -> the plain one (``q_proj.base_layer.weight`` -> ``q_proj.weight``)."""
    return key.replace(".base_layer.", ".")


def load_adapter_tensors(model, targets: dict[str, tuple], tensors: dict[str, np.ndarray]) -> None:
    """Set the adapters of ``model`` (attached for ``targets``) from PEFT tensors; ValueError naming the tensor
    on a missing, extra or misshapen one."""
    wanted = set()
    for module, path in targets.items():
        layer = layer_at(model, path)
        for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            key = f"{_PREFIX}{module}.{theirs}.weight"
            wanted.add(key)
            if key not in tensors:
                raise ValueError(f"adapter weights lack {key} (target_modules selects {module})")
            array = np.asarray(tensors[key], dtype=np.float32).T
            variable = getattr(layer, ours)
            if array.shape != tuple(variable.shape):
                raise ValueError(f"adapter tensor {key}: shape {array.shape[::-1]}, the model expects "
                                 f"{tuple(variable.shape)[::-1]}")
            variable[...] = array
    extra = sorted(set(tensors) - wanted)
    if extra:
        raise ValueError(f"adapter weights hold {len(extra)} tensors this model's targets do not take, e.g. "
                         f"{extra[:3]}")


def adapter_tensors(model, targets: dict[str, tuple]) -> dict[str, np.ndarray]:
    """The PEFT tensors of ``model``'s adapters (fp32, contiguous)."""
    from itersft_jax.parallel.distributed import host_copy
    arrays = {}
    for module, path in targets.items():
        layer = layer_at(model, path)
        for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            arrays[f"{_PREFIX}{module}.{theirs}.weight"] = getattr(layer, ours)[...]
    return {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32).T) for k, v in host_copy(arrays).items()}


def save_adapter(model, targets: dict[str, tuple], peft_config, hf_config, output_dir: str, tokenizer=None,
                 base_name: str | None = None) -> str:
    """Write ``model``'s adapters as a PEFT adapter directory that ``PeftModel.from_pretrained(base, dir)`` loads
    (every process gathers; process 0 writes);
    ``base_model_name_or_path``: the config's own, else ``base_name`` (the hub id or directory the base came
    from), else the HF config's ``_name_or_path``."""
    import copy

    import safetensors.numpy

    from itersft_jax.parallel.distributed import is_main_process
    from itersft_jax.shared.atomic_dir import check_model_target

    output_dir = check_model_target(output_dir, "output_dir")  # never among a user's files
    tensors = adapter_tensors(model, targets)
    if not is_main_process():
        return output_dir
    os.makedirs(output_dir, exist_ok=True)
    config = copy.deepcopy(peft_config)
    config.base_model_name_or_path = (config.base_model_name_or_path or base_name
                                      or getattr(hf_config, "_name_or_path", None))
    config.inference_mode = True
    if config.target_modules is None:  # PEFT's per-architecture default, as get_peft_model records it
        config.target_modules = sorted({module.rsplit(".", 1)[-1] for module in targets})
    config.save_pretrained(output_dir)
    safetensors.numpy.save_file(tensors, os.path.join(output_dir, ADAPTER_WEIGHTS),
                                metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return output_dir


def merged_params(model, targets: dict[str, tuple]):
    """The base parameters with every adapter folded in (``kernel + scale * A @ B``), as the pure dict of
    ``nnx.state(model, nnx.Param)`` without the adapters (what ``weights.save_pretrained`` writes)."""
    import jax.numpy as jnp
    from flax import nnx

    from itersft_jax.models.lora import LoRAParam

    _, _, base = nnx.split(model, LoRAParam, nnx.Param)
    pure = nnx.to_pure_dict(base)
    for path in targets.values():
        layer = layer_at(model, path)
        delta = (jnp.asarray(layer.lora_a[...], jnp.float32) @ jnp.asarray(layer.lora_b[...], jnp.float32)
                 * layer.lora_scale)
        node = pure
        for key in path:
            node = node[key]
        node["kernel"] = (jnp.asarray(node["kernel"], jnp.float32) + delta).astype(node["kernel"].dtype)
    from itersft_jax.parallel.distributed import host_copy

    return host_copy(pure)
