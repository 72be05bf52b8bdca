"""Flax checkpoints (``flax_model.msgpack``, single or sharded) <-> the HF state-dict names of our families.

transformers 4.x saved Flax models as a msgpack of the module's parameter tree (``flax.serialization``); v5
dropped its Flax classes, so this module reads those files for the JAX engine and writes them back for users who
return to Flax tooling. There is no per-family table here: a Flax path maps to the torch-style name by one rule —
join the path with ``.``; ``kernel`` / ``scale`` / ``embedding`` become ``weight``, a 2-D ``kernel`` transposed
(``nn.Dense`` is ``[in, out]``; GPT-2's Flax ``Conv1D`` stores ``[out, in]``, the transpose of torch's Conv1D,
so it follows the same rule) — and the family's own HF layout (``models.<family>.hf_layout``) does the rest.
The inverse takes each Flax leaf name from the layout's parameter path, which already uses Flax's names.

What a directory holds (``is_flax_only``, read by both engines) is in ``shared/weight_files.py``.
"""

from __future__ import annotations

import os

import numpy as np

from itersft_jax.shared.weight_files import (
    FLAX_ALLOW_PATTERNS,
    FLAX_WEIGHTS_INDEX_NAME,
    FLAX_WEIGHTS_NAME,
    is_flax_only,
    read_sharded,
)

# The model types transformers had Flax causal-LM classes for, among our families.
FLAX_MODEL_TYPES = ("gemma", "gpt2", "gptj", "llama", "mistral", "opt", "gpt_neo")
# Families whose Flax class has no tied head: ``lm_head`` is always in the tree, even when the config ties it.
HEAD_ALWAYS_IN_TREE = ("llama", "mistral")

_AS_WEIGHT = ("kernel", "scale", "embedding", "weight")


# ----------------------------------------------------------------------------- what a directory holds


def hub_fallback_patterns(files: list[str], patterns: list[str]) -> list[str] | None:
    """The ``allow_patterns`` of a second ``snapshot_download`` after a first one with ``patterns`` brought
    ``files``: ``patterns`` plus the msgpack files when no safetensors came, else ``None`` (nothing more to fetch)."""
    if any(name.endswith(".safetensors") or name.endswith(".safetensors.index.json") for name in files):
        return None
    return [*patterns, *FLAX_ALLOW_PATTERNS]


def check_flax_family(model_dir: str | os.PathLike, model_type: str) -> None:
    """``ValueError`` when ``model_dir`` holds only Flax weights of a model type we cannot read from msgpack."""
    if model_type not in FLAX_MODEL_TYPES and is_flax_only(model_dir):
        raise ValueError(
            f"{model_dir} holds only Flax weights ({FLAX_WEIGHTS_NAME}) of model_type {model_type!r}; the JAX "
            f"backend reads Flax checkpoints of {', '.join(FLAX_MODEL_TYPES)}. Convert this one to safetensors "
            "with transformers 4.x (from_pretrained(..., from_flax=True), then save_pretrained).")


# ----------------------------------------------------------------------------- reading


def _restore(path: str) -> dict[str, np.ndarray]:
    """One msgpack file as ``{"a/b/leaf": array}``; a truncated or damaged file raises ``ValueError`` naming it."""
    from flax.serialization import msgpack_restore

    with open(path, "rb") as f:
        raw = f.read()
    try:
        tree = msgpack_restore(raw)
    except Exception as err:  # msgpack raises its own exception types (ExtraData, UnpackValueError, ...)
        raise ValueError(f"{path}: damaged or truncated Flax msgpack ({len(raw)} bytes; "
                         f"{type(err).__name__}: {err})") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: not a Flax parameter tree (the msgpack holds a {type(tree).__name__})")
    flat: dict[str, np.ndarray] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + "/")
            elif isinstance(value, np.ndarray):
                flat[name] = value
            else:
                raise ValueError(f"{path}: not a Flax parameter tree ({name} is a {type(value).__name__})")

    walk(tree, "")
    return flat


def read_flax_tree(model_dir: str | os.PathLike) -> tuple[str, dict[str, np.ndarray]]:
    """``(file name for messages, {"a/b/leaf": array})`` of ``flax_model.msgpack`` or of the shards listed in
    ``flax_model.msgpack.index.json``."""
    model_dir = os.fspath(model_dir)
    index_path = os.path.join(model_dir, FLAX_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index_path):
        index_path, _, flat = read_sharded(model_dir, FLAX_WEIGHTS_INDEX_NAME, _restore)
        return index_path, flat
    path = os.path.join(model_dir, FLAX_WEIGHTS_NAME)
    return path, _restore(path)


def hf_name(flax_path: str) -> str:
    """``model/layers/0/mlp/up_proj/kernel`` -> ``model.layers.0.mlp.up_proj.weight`` (the generic rule)."""
    *module, leaf = flax_path.split("/")
    return ".".join([*module, "weight" if leaf in _AS_WEIGHT else leaf])


def flax_paths(layout) -> dict[str, tuple[str, bool]]:
    """``{HF name: (Flax path, transposed)}`` for every tensor of a family's HF ``layout``."""
    out = {}
    for row in layout.tensors:
        leaf = row.paths[0][-1]
        out[row.name] = "/".join([*row.name.split(".")[:-1], leaf]), leaf == "kernel"
    return out


def expected_tree(hf_config) -> dict[str, tuple[int, ...]]:
    """``{flax path: shape}`` of transformers' Flax causal LM for ``hf_config`` (from the family's HF layout)."""
    from itersft_jax.models import get_family

    layout = get_family(hf_config.model_type).hf_layout(hf_config)
    paths = flax_paths(layout)
    tree = {}
    for row in layout.tensors:
        path, transposed = paths[row.name]
        tree[path] = row.shape[::-1] if transposed else row.shape
    if hf_config.model_type in HEAD_ALWAYS_IN_TREE and "lm_head/kernel" not in tree:
        tree["lm_head/kernel"] = tree["model/embed_tokens/embedding"][::-1]
    return tree


def read_flax_as_hf(model_dir: str | os.PathLike, hf_config) -> dict[str, np.ndarray]:
    """The Flax weights of ``model_dir`` as numpy arrays under HF state-dict names (the file's dtype; transposes
    are views), checked against ``hf_config``: every ``ValueError`` names the file and the Flax parameter."""
    model_type = hf_config.model_type
    check_flax_family(model_dir, model_type)
    if model_type not in FLAX_MODEL_TYPES:
        raise ValueError(f"Flax checkpoints are read for {', '.join(FLAX_MODEL_TYPES)}, not {model_type!r}")
    source, flat = read_flax_tree(model_dir)
    expected = expected_tree(hf_config)
    base = next(path.split("/")[0] for path in expected if not path.startswith("lm_head/"))
    if flat and not any(path.startswith(base + "/") for path in flat):  # saved from the base model class
        flat = {f"{base}/{path}": array for path, array in flat.items()}
    unexpected = sorted(set(flat) - set(expected))
    if unexpected:
        raise ValueError(f"{source}: {len(unexpected)} parameters the {model_type} config does not have, e.g. "
                         f"{unexpected[:5]}")
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise ValueError(f"{source}: the {model_type} config needs parameters the file lacks, e.g. {missing[:5]}")
    for path, shape in expected.items():
        if tuple(flat[path].shape) != tuple(shape):
            raise ValueError(f"{source}: parameter {path} has shape {tuple(flat[path].shape)}, the config expects "
                             f"{tuple(shape)}")
    if model_type in HEAD_ALWAYS_IN_TREE and getattr(hf_config, "tie_word_embeddings", False):
        if not np.array_equal(flat["lm_head/kernel"], flat[f"{base}/embed_tokens/embedding"].T):
            raise ValueError(f"{source}: parameter lm_head/kernel is not the transposed embedding, but the config "
                             "sets tie_word_embeddings=True; set it to False to load this head")
    return {hf_name(path): array.T if path.endswith("/kernel") and array.ndim == 2 else array
            for path, array in flat.items()}


# ----------------------------------------------------------------------------- writing


def hf_to_flax(tensors: dict[str, np.ndarray], hf_config) -> dict:
    """HF-named arrays (as ``params_to_hf`` gives them) -> transformers' nested Flax parameter tree."""
    from itersft_jax.models import get_family

    model_type = hf_config.model_type
    if model_type not in FLAX_MODEL_TYPES:
        raise ValueError(f"flax_format: transformers had Flax classes for {', '.join(FLAX_MODEL_TYPES)}, "
                         f"not {model_type!r}; save safetensors only")
    if model_type == "gptj" and getattr(hf_config, "tie_word_embeddings", False):
        raise ValueError("flax_format: transformers' Flax GPT-J cannot run a tied head (FlaxGPTJForCausalLM applies "
                         "lm_head without its bias); save safetensors only, or untie the head")
    paths = flax_paths(get_family(model_type).hf_layout(hf_config))
    flat = {}
    for name, array in tensors.items():
        if name not in paths:
            raise ValueError(f"flax_format: tensor {name} is not in the {model_type} layout")
        path, transposed = paths[name]
        flat[path] = np.ascontiguousarray(array.T if transposed else array)
    if model_type in HEAD_ALWAYS_IN_TREE and "lm_head/kernel" not in flat:  # a tied head, written out
        flat["lm_head/kernel"] = np.ascontiguousarray(flat["model/embed_tokens/embedding"].T)
    tree: dict = {}
    for path, array in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = array
    return tree


def remove_flax_files(output_dir: str | os.PathLike) -> None:
    """Remove the Flax weights of an earlier save (they would disagree with the new ones)."""
    for name in os.listdir(output_dir):
        if name.startswith("flax_model") and (name.endswith(".msgpack") or name == FLAX_WEIGHTS_INDEX_NAME):
            os.remove(os.path.join(output_dir, name))


def save_flax(flax_tree: dict, output_dir: str | os.PathLike) -> str:
    """Write ``flax_tree`` (from ``hf_to_flax``; the arrays' own dtype) as ``output_dir/flax_model.msgpack``, the
    file transformers 4.x's Flax classes load; returns its path."""
    from flax.serialization import msgpack_serialize

    path = os.path.join(os.fspath(output_dir), FLAX_WEIGHTS_NAME)
    with open(path, "wb") as f:
        f.write(msgpack_serialize(flax_tree))
    return path
