"""Hugging Face checkpoints <-> Flax NNX models, for every family in ``itersft_jax.models``.

Sources: a local directory, a hub id (through ``huggingface_hub.snapshot_download``, which honours
``HF_HUB_OFFLINE`` and the HF cache), or a ``transformers.PreTrainedModel`` already in memory (through its
``state_dict``). Safetensors are read with numpy only — no torch on that path — including bf16 tensors
(as ``ml_dtypes.bfloat16``). The family modules own the name mapping (``params_from_hf`` /
``params_to_hf``); this module owns files, dtypes and building the module without random init.
"""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any

import numpy as np

from itersft_jax.shared.weight_files import MODEL_DIR_PATTERNS, read_safetensors_file, read_sharded

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


# model_init_kwargs that only mean something to a torch model; accepted and ignored here.
_TORCH_ONLY_KWARGS = ("device_map", "low_cpu_mem_usage", "use_cache",
                      "max_memory", "offload_folder", "use_safetensors")

_DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}

# ----------------------------------------------------------------------------- arguments


def _split_kwargs(model_init_kwargs: dict | None) -> tuple[dict, Any, dict]:
    """-> (hub kwargs, requested dtype or None, remaining config overrides); refuses remote code.
    ``attn_implementation`` stays out of the overrides: ``load_model`` reads it."""
    kwargs = dict(model_init_kwargs or {})
    if kwargs.pop("trust_remote_code", False):
        raise ValueError(
            "trust_remote_code=True: the JAX backend runs only its own Flax implementations and cannot "
            "execute a checkpoint's remote modeling code. Use backend='torch' for remote-code models.")
    if kwargs.get("quantization_config") is not None:
        raise ValueError("quantization_config is not supported by the JAX backend; use backend='torch'.")
    kwargs.pop("quantization_config", None)
    hub = {k: kwargs.pop(k) for k in ("revision", "token", "cache_dir", "local_files_only", "force_download")
           if k in kwargs}
    dtype = kwargs.pop("dtype", None)
    torch_dtype = kwargs.pop("torch_dtype", None)
    dtype = dtype if dtype is not None else torch_dtype
    for key in (*_TORCH_ONLY_KWARGS, "attn_implementation"):
        kwargs.pop(key, None)
    return hub, dtype, kwargs


def _dtype_name(dtype) -> str:
    """A dtype given as a string, torch/numpy/jax dtype -> ``float32`` / ``bfloat16`` / ``float16``."""
    name = str(getattr(dtype, "name", None) or dtype).removeprefix("torch.").lower()
    if name.startswith("<class"):  # jnp.float32 and friends are classes
        name = np.dtype(dtype).name
    if name not in _DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {dtype!r}; use 'float32', 'bfloat16', 'float16' or 'auto'")
    return _DTYPE_NAMES[name]


def jnp_dtype(dtype):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[_dtype_name(dtype)]


# ----------------------------------------------------------------------------- reading


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None, token=None,
                      cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                      force_download: bool = False) -> str:
    """A local directory as is; anything else is a hub id fetched (or found in the cache) by
    ``huggingface_hub.snapshot_download`` — config, safetensors, index, tokenizer and generation config; the Flax
    msgpack files only when the repository has no safetensors (a second, fallback download)."""
    from itersft_jax.shared.model_source import check_model_path

    path = check_model_path(name_or_path)  # a local path that does not exist: FileNotFoundError, not a hub error
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    from itersft_jax.io.flax_weights import hub_fallback_patterns

    kwargs = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only,
                  force_download=force_download)
    model_dir = snapshot_download(path, allow_patterns=MODEL_DIR_PATTERNS, **kwargs)
    patterns = hub_fallback_patterns(os.listdir(model_dir), MODEL_DIR_PATTERNS)
    return model_dir if patterns is None else snapshot_download(path, allow_patterns=patterns, **kwargs)


def load_hf_config(model_name_or_path: str | os.PathLike, **model_init_kwargs):
    """The ``transformers`` config of a directory or hub id. Keys of ``model_init_kwargs`` that are not hub
    or dtype options override config attributes, as in ``from_pretrained``."""

    hub, _, overrides = _split_kwargs(model_init_kwargs)
    model_dir = resolve_model_dir(model_name_or_path, **hub)
    return config_with_overrides(model_dir, overrides)


def config_with_overrides(model_dir: str, overrides: dict):
    """``AutoConfig.from_pretrained(model_dir, **overrides)``, refusing an override that is no field of the config
    (transformers drops it without a word)."""
    from transformers import AutoConfig

    config, unused = AutoConfig.from_pretrained(model_dir, return_unused_kwargs=True, **overrides)
    if unused:
        raise ValueError(f"`model_init_kwargs`: {sorted(unused)} are neither loading options of the JAX engine nor "
                         f"fields of the {config.model_type} config")
    return config


def read_safetensors(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``."""
    model_dir = os.fspath(model_dir)
    index_path = os.path.join(model_dir, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index_path):
        index_path, weight_map, tensors = read_sharded(model_dir, SAFE_WEIGHTS_INDEX_NAME, read_safetensors_file)
        missing = set(weight_map) - set(tensors)
        if missing:
            raise ValueError(f"{index_path} lists tensors no shard holds, e.g. {sorted(missing)[:5]}")
        return tensors
    single = os.path.join(model_dir, SAFE_WEIGHTS_NAME)
    if os.path.isfile(single):
        return read_safetensors_file(single)
    found = sorted(os.listdir(model_dir))
    raise FileNotFoundError(
        f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {model_dir} (found: {found[:10]}). The JAX "
        "backend reads safetensors or Flax msgpack (flax_model.msgpack): re-save the model with transformers' "
        "save_pretrained, or pass the loaded transformers model object instead of its path.")


def state_dict_to_numpy(torch_model) -> dict[str, np.ndarray]:
    """The ``state_dict`` of an in-memory torch model as numpy arrays (bf16 as ``ml_dtypes.bfloat16``)."""
    import ml_dtypes
    import torch

    out = {}
    for name, tensor in torch_model.state_dict().items():
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            out[name] = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[name] = tensor.numpy()
    return out


def _is_torch_model(source) -> bool:
    return hasattr(source, "state_dict") and hasattr(source, "config") and not isinstance(source, (str, os.PathLike))


# ----------------------------------------------------------------------------- building


def build_abstract(family, hf_config, *, dtype, param_dtype, remat: bool | str = False,
                   attn_implementation: str | None = "auto"):
    """The family's module with abstract (shape-only) parameters: nothing random is computed."""
    from flax import nnx

    return nnx.eval_shape(lambda: family.CausalLM(hf_config, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                                  attn_implementation=attn_implementation, rngs=nnx.Rngs(0)))


# gradient_checkpointing_kwargs keys that only mean something to torch's checkpointing.
_TORCH_ONLY_CHECKPOINTING_KWARGS = ("use_reentrant", "preserve_rng_state", "determinism_check", "debug")


def remat_setting(remat: bool | str, gradient_checkpointing_kwargs: dict | None) -> bool | str:
    """``remat`` with ``gradient_checkpointing_kwargs={"policy": ...}`` applied when remat is on (a policy name
    given as ``remat`` itself wins). torch-only keys (``use_reentrant``, ...) are accepted and ignored."""
    from itersft_jax.models.remat import REMAT_POLICIES

    kwargs = dict(gradient_checkpointing_kwargs or {})
    for key in _TORCH_ONLY_CHECKPOINTING_KWARGS:
        kwargs.pop(key, None)
    policy = kwargs.pop("policy", None)
    names = ", ".join(repr(name) for name in REMAT_POLICIES)  # the one table of policies
    if kwargs:
        raise ValueError(f"gradient_checkpointing_kwargs: unknown keys {sorted(kwargs)} for the JAX backend "
                         f"(it takes 'policy': {names}).")
    if policy is not None and (not isinstance(policy, str) or policy not in REMAT_POLICIES):
        raise ValueError(f"gradient_checkpointing_kwargs: `policy`={policy!r} is not a remat policy of the JAX "
                         f"engine; it takes {names}")
    return policy if remat is True and policy is not None else remat


def _checkpoint_dtype(tensors: dict[str, np.ndarray]) -> str:
    for array in tensors.values():
        if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
            return _dtype_name(array.dtype.name)
    return "float32"


def load_model(source, *, dtype=None, param_dtype=None, remat: bool | str = False,
               gradient_checkpointing_kwargs: dict | None = None, attn_implementation: str | None = None,
               model_init_kwargs: dict | None = None, mesh=None):
    """Load an HF causal LM as a Flax NNX module. Returns ``(model, hf_config)``.

    ``source``: a directory, a hub id, or a ``transformers.PreTrainedModel``. ``dtype`` is the compute
    dtype (default float32). Parameters are stored in ``param_dtype``; when that is ``None``,
    ``model_init_kwargs['dtype' or 'torch_dtype']`` decides ("auto": the checkpoint's own dtype), else
    float32. ``model_init_kwargs`` may also hold ``revision``, ``token``, ``cache_dir`` (passed to
    ``snapshot_download``), ``attn_implementation`` and config overrides; ``trust_remote_code=True`` is refused.
    ``remat``: False, True or a policy name ("full", "dots", "offload"); with True,
    ``gradient_checkpointing_kwargs={"policy": ...}`` picks the policy (default "full").
    ``attn_implementation`` (or ``model_init_kwargs["attn_implementation"]``): "auto" (default), "xla" or a
    kernel name; transformers' names are accepted ("eager" is "xla", "sdpa"/"flash_attention_2" are "auto").
    ``mesh``: a ``jax.sharding.Mesh``; each parameter goes from the host straight to its slices on the mesh
    (``parallel.sharding``), so no device ever holds a whole copy of the model.
    """
    import jax.numpy as jnp
    from flax import nnx

    from itersft_jax.models import get_family

    if isinstance(source, tuple) and len(source) == 2:  # (hf_config, HF-named numpy tensors): a PEFT model's base
        hf_config, tensors = source
        source = None
    elif not (isinstance(source, (str, os.PathLike)) or _is_torch_model(source)):
        raise TypeError(f"`model` must be a hub id, a local directory or a transformers PreTrainedModel, got "
                        f"{type(source).__name__}")
    if model_init_kwargs is not None and not isinstance(model_init_kwargs, dict):
        raise TypeError(f"`model_init_kwargs` must be a dict, got {type(model_init_kwargs).__name__}")
    hub, requested, overrides = _split_kwargs(model_init_kwargs)
    if attn_implementation is None:
        attn_implementation = (model_init_kwargs or {}).get("attn_implementation")
    remat = remat_setting(remat, gradient_checkpointing_kwargs)
    if source is None:
        family = get_family(hf_config.model_type)
    elif _is_torch_model(source):
        hf_config = source.config
        family = get_family(hf_config.model_type)
        tensors = state_dict_to_numpy(source)
    else:
        model_dir = resolve_model_dir(source, **hub)
        hf_config = config_with_overrides(model_dir, overrides)
        from itersft_jax.io import flax_weights

        flax_weights.check_flax_family(model_dir, hf_config.model_type)
        family = get_family(hf_config.model_type)
        tensors = (flax_weights.read_flax_as_hf(model_dir, hf_config) if flax_weights.is_flax_only(model_dir)
                   else read_safetensors(model_dir))  # safetensors win when both are there

    if param_dtype is None:
        if requested is None:
            param_dtype = jnp.float32
        elif str(requested) == "auto":
            param_dtype = jnp_dtype(_checkpoint_dtype(tensors))
        else:
            param_dtype = jnp_dtype(requested)
    dtype = jnp.float32 if dtype is None else dtype

    params = family.params_from_hf(tensors, hf_config)
    model = build_abstract(family, hf_config, dtype=dtype, param_dtype=param_dtype, remat=remat,
                           attn_implementation=attn_implementation)
    graphdef, state = nnx.split(model)
    expected = nnx.to_pure_dict(state)
    _check_same_tree(expected, params)
    if mesh is None:
        params = _tree_map2(lambda abstract, array: jnp.asarray(array, dtype=abstract.dtype), expected, params)
    else:
        params = _place_on_mesh(expected, params, mesh)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    if mesh is not None:
        from itersft_jax.models import moe

        moe.use_mesh(model, mesh)  # sparse MoE layers run expert-parallel over an ``expert`` axis
    return model, hf_config


def _place_on_mesh(expected: dict, params: dict, mesh) -> dict:
    """``params`` (host arrays: views of the memory-mapped safetensors files) cast to ``expected``'s dtypes and
    put on ``mesh`` by the sharding rule table: each device's slice is read from the mapped file and cast on its
    own, so no whole tensor is copied on the host (a slice along an inner axis still spans the tensor's pages, so a
    process may fault in most of the mapped file)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    from itersft_jax.parallel.sharding import partition_spec

    mesh_shape = dict(mesh.shape)

    def place(path, abstract, array):
        spec = partition_spec("/".join(str(k) for k in path if not isinstance(k, int)), tuple(abstract.shape),
                              mesh_shape)
        def read(index):
            return np.asarray(array[index]).astype(abstract.dtype)

        return jax.make_array_from_callback(tuple(abstract.shape), NamedSharding(mesh, spec), read)

    def walk(a: dict, b: dict, path: tuple) -> dict:
        return {k: walk(a[k], b[k], (*path, k)) if isinstance(a[k], dict) else place((*path, k), a[k], b[k])
                for k in a}

    return walk(expected, params, ())


def _tree_map2(fn, a: dict, b: dict) -> dict:
    return {k: _tree_map2(fn, a[k], b[k]) if isinstance(a[k], dict) else fn(a[k], b[k]) for k in a}


def _check_same_tree(expected: dict, got: dict, prefix: str = "") -> None:
    if set(expected) != set(got):
        raise ValueError(f"params at {prefix or '<root>'}: keys {sorted(map(str, got))} != model's "
                         f"{sorted(map(str, expected))}")
    for key, value in expected.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            _check_same_tree(value, got[key], path)
        elif tuple(value.shape) != tuple(got[key].shape):
            raise ValueError(f"param {path}: shape {tuple(got[key].shape)} != model's {tuple(value.shape)}")


# ----------------------------------------------------------------------------- saving


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a string such as '5GB', '500MB'")
    number, unit = float(match.group(1)), match.group(2)
    base = 1024 if "I" in unit else 1000
    return int(number * base ** "BKMGT".index(unit[0]))


def _shard(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    """Greedy split in the given order; a tensor larger than ``max_bytes`` gets a shard of its own."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    return shards


def _to_params_dict(params_or_model) -> dict:
    from flax import nnx

    if isinstance(params_or_model, nnx.Module):
        return nnx.to_pure_dict(nnx.state(params_or_model, nnx.Param))
    if isinstance(params_or_model, nnx.State):
        return nnx.to_pure_dict(params_or_model)
    return params_or_model


def save_pretrained(params_or_model, hf_config, output_dir: str | os.PathLike, tokenizer=None,
                    generation_config=None, max_shard_size: int | str = "5GB", flax_format: bool = False) -> str:
    """Write an HF directory that ``AutoModelForCausalLM.from_pretrained`` loads: ``config.json``,
    safetensors (sharded with an index above ``max_shard_size``), tokenizer files, ``generation_config.json``;
    with ``flax_format`` also ``flax_model.msgpack`` (one file), which transformers 4.x's Flax classes load.

    ``params_or_model``: an NNX module, its ``nnx.Param`` state, or that state's pure dict. Tensors are
    written in the parameters' own dtype. Returns ``output_dir``.
    """
    import jax
    import safetensors.numpy
    from transformers import GenerationConfig

    from itersft_jax.models import get_family
    from itersft_jax.shared.atomic_dir import check_model_target

    output_dir = check_model_target(output_dir, "output_dir")  # never among a user's files
    os.makedirs(output_dir, exist_ok=True)
    family = get_family(hf_config.model_type)
    params = jax.device_get(_to_params_dict(params_or_model))
    tensors = {name: np.ascontiguousarray(array)
               for name, array in family.params_to_hf(params, hf_config).items()}
    from itersft_jax.io import flax_weights

    flax_tree = flax_weights.hf_to_flax(tensors, hf_config) if flax_format else None  # refusals before any write

    config = copy.deepcopy(hf_config)
    config.dtype = _checkpoint_dtype(tensors)
    if not getattr(config, "architectures", None):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        config.architectures = [arch] if arch else None
    config.save_pretrained(output_dir)

    for name in os.listdir(output_dir):  # stale weights of an earlier save would shadow or mix in
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", name):
            os.remove(os.path.join(output_dir, name))
    shards = _shard(tensors, _parse_size(max_shard_size))
    metadata = {"format": "pt"}
    if len(shards) == 1:
        safetensors.numpy.save_file(shards[0], os.path.join(output_dir, SAFE_WEIGHTS_NAME), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            shard_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            safetensors.numpy.save_file(shard, os.path.join(output_dir, shard_name), metadata=metadata)
            weight_map.update(dict.fromkeys(shard, shard_name))
        index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
        with open(os.path.join(output_dir, SAFE_WEIGHTS_INDEX_NAME), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    flax_weights.remove_flax_files(output_dir)  # an earlier save's would disagree with these weights
    if flax_tree is not None:
        flax_weights.save_flax(flax_tree, output_dir)

    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    if generation_config is None:
        generation_config = GenerationConfig.from_model_config(config)
    elif isinstance(generation_config, dict):
        generation_config = GenerationConfig(**generation_config)
    generation_config.save_pretrained(output_dir)
    return output_dir
