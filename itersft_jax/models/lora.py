"""LoRA on the JAX engine: adapters attached to a family's linear layers, named as PEFT names them.

``LoRASettings.from_peft(peft_config)`` reads a ``peft.LoraConfig`` (or its dict); ``attach_adapters(model,
hf_config, settings, seed)`` puts two ``LoRAParam`` matrices on every targeted ``nnx.Linear`` —
``lora_a [in, r]`` (PEFT's kaiming-uniform init) and ``lora_b [r, out]`` (zeros) — and ``layers.dense`` adds
``scale * dropout(x) @ lora_a @ lora_b`` to the layer's output. Targets are resolved through the family's HF
checkpoint table (``models.<family>.hf_layout``), so ``target_modules`` takes the Hugging Face module names
(``q_proj``, GPT-2's ``c_attn``, a regex, or ``"all-linear"`` = every linear layer but the LM head, as in PEFT).

``LoRAParam`` is an ``nnx.Param`` subclass: ``nnx.split(model, LoRAParam,
nnx.Param)`` separates the trainable adapters from the frozen base (``core/trainable.py``).

The forward half (``LoRAParam``, ``dropout_rng``, ``adapter_delta``) sits at the top of this file: the model layers
import it. Dropout on the adapters' input runs only inside ``dropout_rng(key)`` (the train step); evaluation and
generation never set it. Each adapted layer draws its mask from ``fold_in(key, layer.lora_id)`` (a number fixed
when the adapters are attached), so masks do not depend on how often a transform traces the forward
(``nnx.remat`` traces it more than once).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["Adapters", "LoRAParam", "LoRASettings", "adapter_delta", "attach_adapters", "dropout_rng", "layer_at",
           "linear_modules", "resolve_targets"]



class LoRAParam(nnx.Param):
    """A trainable LoRA adapter matrix (the base parameters stay ``nnx.Param``)."""


_DROPOUT: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("itersft_lora_dropout", default=None)


@contextlib.contextmanager
def dropout_rng(key: jax.Array | None):
    """Within the block, adapters apply their ``lora_dropout`` with masks drawn from ``key`` (training only)."""
    token = _DROPOUT.set(key)
    try:
        yield
    finally:
        _DROPOUT.reset(token)


def adapter_delta(layer, x_NI: jax.Array, dtype) -> jax.Array | None:
    """``scale * dropout(x) @ A @ B`` for a layer holding adapters (``None`` otherwise), in ``dtype`` with
    fp32 accumulation."""
    lora_a = getattr(layer, "lora_a", None)
    if lora_a is None:
        return None
    rate = float(getattr(layer, "lora_dropout", 0.0))
    key = _DROPOUT.get()
    if rate > 0.0 and key is not None:
        key = jax.random.fold_in(key, layer.lora_id)
        keep = jax.random.bernoulli(key, 1.0 - rate, x_NI.shape)
        x_NI = jnp.where(keep, x_NI / (1.0 - rate), 0).astype(x_NI.dtype)
    a = lora_a[...].astype(dtype)
    b = layer.lora_b[...].astype(dtype)
    low_NR = jnp.dot(x_NI.astype(dtype), a, preferred_element_type=jnp.float32).astype(dtype)
    return (jnp.dot(low_NR, b, preferred_element_type=jnp.float32) * layer.lora_scale).astype(dtype)


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """What the JAX engine honours of a ``LoraConfig``."""

    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    target_modules: Any  # a list of names, a regex string, "all-linear", or None (PEFT's default)
    peft_config: Any = None  # the LoraConfig itself (written back as adapter_config.json)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @classmethod
    def from_peft(cls, peft_config) -> LoRASettings:
        """Validate ``peft_config`` (a ``peft.LoraConfig`` or a dict of its fields); ValueError naming the field
        for what the JAX engine does not implement."""
        try:
            from peft import LoraConfig
        except ImportError as err:
            raise ImportError("`peft_config` needs the peft package: pip install 'itersft[peft]'") from err

        if isinstance(peft_config, dict):
            peft_config = LoraConfig(**peft_config)
        if not isinstance(peft_config, LoraConfig):
            raise TypeError(f"`peft_config` must be a peft.LoraConfig (or its dict) on the JAX engine, got "
                            f"{type(peft_config).__name__}; other PEFT methods need backend='torch'")
        if peft_config.r is None or int(peft_config.r) < 1:
            raise ValueError(f"`peft_config.r` must be a positive integer, got {peft_config.r}")
        if not 0.0 <= float(peft_config.lora_dropout) < 1.0:
            raise ValueError(f"`peft_config.lora_dropout` must be in [0, 1), got {peft_config.lora_dropout}")
        unsupported = {
            "bias": peft_config.bias != "none",
            "use_dora": bool(getattr(peft_config, "use_dora", False)),
            "modules_to_save": bool(peft_config.modules_to_save),
            "layers_to_transform": peft_config.layers_to_transform is not None,
            "rank_pattern": bool(peft_config.rank_pattern),
            "alpha_pattern": bool(peft_config.alpha_pattern),
            "init_lora_weights": peft_config.init_lora_weights not in (True, False),
            "exclude_modules": bool(getattr(peft_config, "exclude_modules", None)),
        }
        bad = [name for name, refused in unsupported.items() if refused]
        if bad:
            raise ValueError(f"`peft_config.{bad[0]}`={getattr(peft_config, bad[0])!r} is not supported by the JAX "
                             f"engine (it trains plain LoRA: bias='none', no DoRA, no modules_to_save, no per-layer "
                             f"patterns, init_lora_weights True/False); use backend='torch' for it")
        targets = peft_config.target_modules  # None: PEFT's default for the architecture (resolve_targets)
        targets = targets if targets is None or isinstance(targets, str) else sorted(targets)
        return cls(r=int(peft_config.r), alpha=float(peft_config.lora_alpha), dropout=float(peft_config.lora_dropout),
                   use_rslora=bool(peft_config.use_rslora), target_modules=targets, peft_config=peft_config)


@dataclasses.dataclass(frozen=True)
class Adapters:
    """The LoRA adapters of a trainer: their settings and the HF module name -> path of each adapted layer."""

    settings: LoRASettings
    targets: dict[str, tuple]


def linear_modules(hf_config) -> dict[str, tuple]:
    """HF module name -> parameter path of the ``nnx.Linear`` for every linear layer of the family (fused HF
    modules map to a tuple of paths)."""
    from itersft_jax.models import get_family

    layout = get_family(hf_config.model_type).hf_layout(hf_config)
    out: dict[str, tuple] = {}
    for row in layout.tensors:
        if row.name.endswith(".weight") and all(path[-1] == "kernel" for path in row.paths):
            paths = tuple(path[:-1] for path in row.paths)
            # the head's module is ``lm_head`` also where the checkpoint says ``embed_out`` (GPT-NeoX on transformers 5)
            name = "lm_head" if paths == (("lm_head",),) else row.name.removesuffix(".weight")
            out[name] = paths[0] if len(paths) == 1 else paths
    return out


def moe_modules(hf_config) -> list[str]:
    """HF module names of a mixture of experts' experts (each expert's projections and their ``experts``
    container) and routers (``mlp.gate``): not LoRA targets on the JAX engine (PEFT reaches them on transformers 5
    by turning such names into ``target_parameters``)."""
    from itersft_jax.models import get_family

    names = set()
    for row in get_family(hf_config.model_type).hf_layout(hf_config).tensors:
        name = row.name.removesuffix(".weight")
        if row.expert is not None:
            names.update((name, name.rsplit(".", 2)[0]))
        elif row.paths[0][-2:] == ("gate", "weight"):
            names.add(name)
    return sorted(names)


def _selects(name: str, target_modules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def resolve_targets(hf_config, target_modules) -> dict[str, tuple]:
    """HF module name -> parameter path of each targeted linear layer, by PEFT's matching rules: a string is a
    full-match regex over the module name (``"all-linear"``: every linear layer but the output head), a list
    matches a module whose name is an item or ends with ``"." + item``. On a mixture of experts, a target that
    selects an expert or a router (``gate_proj`` on Qwen-MoE, ``w1`` on Mixtral, ``gate``, ``"all-linear"``: PEFT
    adapts the experts and routers for those) is refused: PEFT would load the saved adapter onto modules the JAX
    engine never adapted."""
    modules = linear_modules(hf_config)
    experts = moe_modules(hf_config)
    if experts and target_modules is not None:
        if target_modules == "all-linear":
            raise ValueError("`peft_config.target_modules`='all-linear' on a mixture of experts includes the experts "
                             "and routers (as PEFT adapts them), which LoRA on the JAX engine does not adapt: name the "
                             "modules (e.g. ['q_proj', 'k_proj', 'v_proj', 'o_proj']) or use backend='torch'")
        items = [target_modules] if isinstance(target_modules, str) else [[t] for t in target_modules]
        for item in items:
            hits = [name for name in experts if _selects(name, item)]
            if hits:
                raise ValueError(f"`peft_config.target_modules`: {item if isinstance(item, str) else item[0]!r} "
                                 f"selects a mixture of experts' experts or router (e.g. {hits[0]!r}), which LoRA on "
                                 f"the JAX engine does not adapt; target the attention and dense projections (q_proj, "
                                 f"k_proj, v_proj, o_proj, ...) or use backend='torch'")
    if target_modules is None:  # what get_peft_model does on the torch backend: PEFT's default per architecture
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

        target_modules = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(hf_config.model_type)
        if target_modules is None:
            raise ValueError(f"`peft_config.target_modules` is not set and PEFT has no default for model_type "
                             f"{hf_config.model_type!r}: name the modules to adapt (e.g. 'all-linear')")
    if target_modules == "all-linear":
        chosen = [name for name in modules if name.split(".")[-1] != "lm_head"]  # PEFT leaves the output head out
    elif isinstance(target_modules, str):
        chosen = [name for name in modules if re.fullmatch(target_modules, name)]
    else:
        wanted = list(target_modules)
        chosen = [name for name in modules if any(name == t or name.endswith("." + t) for t in wanted)]
    if not chosen:
        kinds = sorted({name.split(".")[-1] for name in modules})
        raise ValueError(f"`peft_config.target_modules`={target_modules!r} matches no linear layer of this "
                         f"{hf_config.model_type} model; its linear layers are named {kinds}")
    fused = [name for name in chosen if isinstance(modules[name][0], tuple)]
    if fused:
        raise ValueError(f"`peft_config.target_modules` selects {fused[0]!r}, which the JAX engine splits into "
                         f"several layers (a fused Hugging Face projection): LoRA on it needs backend='torch'; "
                         f"target the other modules")
    return {name: modules[name] for name in chosen}


def layer_at(model, path: tuple):
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def attach_adapters(model, hf_config, settings: LoRASettings, seed: int = 0) -> dict[str, tuple]:
    """Put ``lora_a``/``lora_b`` on every targeted linear layer of ``model`` (in place), initialized as PEFT does:
    ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (kaiming-uniform, a=sqrt(5)), ``B = 0`` (``init_lora_weights=False``:
    B is left as PEFT leaves it, ``nn.Linear(r, out)``'s default init ``U(-1/sqrt(r), 1/sqrt(r))``). Returns the
    targets (HF module name -> path)."""
    targets = resolve_targets(hf_config, settings.target_modules)
    key = jax.random.key(seed)
    init_b = settings.peft_config is not None and settings.peft_config.init_lora_weights is False
    for i, (_, path) in enumerate(sorted(targets.items())):
        layer = layer_at(model, path)
        d_in, d_out = layer.kernel.shape
        key_a, key_b = jax.random.split(jax.random.fold_in(key, i))
        bound = 1.0 / math.sqrt(d_in)
        layer.lora_a = LoRAParam(jax.random.uniform(key_a, (d_in, settings.r), jnp.float32, -bound, bound))
        bound_b = 1.0 / math.sqrt(settings.r)  # B's fan-in is r
        b = (jax.random.uniform(key_b, (settings.r, d_out), jnp.float32, -bound_b, bound_b) if init_b
             else jnp.zeros((settings.r, d_out), jnp.float32))
        layer.lora_b = LoRAParam(b)
        layer.lora_scale = settings.scale
        layer.lora_dropout = settings.dropout
        layer.lora_id = i  # keys the layer's dropout masks (models.lora)
    return targets
