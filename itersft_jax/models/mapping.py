"""One table-driven mapping between Hugging Face state dicts and the nested params dict of an NNX model.

A family describes its checkpoint as a ``Layout``: one ``HFTensor`` row per HF tensor (name, HF shape, where it lives
in ``nnx.state(model, nnx.Param)``, whether it is transposed, and — for a fused HF tensor such as Phi-3's
``qkv_proj`` — the sizes of its parts along HF axis 0), the prefixes some checkpoints use instead of the canonical
ones (``GPT2Model``'s missing ``transformer.``, ``OPTModel``'s ``decoder.``), and the names that are buffers or a
tied head rather than weights. ``params_from_hf`` and ``params_to_hf`` read and write every family with that one
table; every error is a ``ValueError`` naming the tensor.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One HF state-dict tensor and where it lives in the params tree."""

    name: str                   # canonical HF name (as ``XxxForCausalLM.save_pretrained`` writes it)
    shape: tuple[int, ...]      # HF (torch) shape
    paths: tuple[tuple, ...]    # key path(s) into the params dict: one, or one per part of a fused tensor
    transpose: bool = False     # nn.Linear ``[out, in]`` <-> nnx.Linear kernel ``[in, out]``
    sizes: tuple[int, ...] = ()  # fused tensor: each part's size along HF axis 0, in ``paths`` order


@dataclasses.dataclass(frozen=True)
class Layout:
    """A family's whole checkpoint: its tensors, alternative name prefixes and ignorable names."""

    family: str
    tensors: tuple[HFTensor, ...]
    aliases: tuple[tuple[str, str], ...] = ()  # (prefix some checkpoints use, canonical prefix)
    ignore: tuple[str, ...] = ()               # regexes (full match) of names that are not weights


def tensor(name: str, path: tuple, shape: tuple[int, ...], transpose: bool = False) -> HFTensor:
    return HFTensor(name, tuple(shape), (tuple(path),), transpose)


def linear(name: str, path: tuple, d_in: int, d_out: int, bias: bool, *, conv1d: bool = False) -> list[HFTensor]:
    """An ``nnx.Linear`` at ``path``: HF ``nn.Linear`` (``[out, in]``, transposed) or GPT-2's ``Conv1D``
    (``[in, out]``, the kernel's own layout)."""
    rows = [tensor(f"{name}.weight", (*path, "kernel"), (d_in, d_out) if conv1d else (d_out, d_in), not conv1d)]
    if bias:
        rows.append(tensor(f"{name}.bias", (*path, "bias"), (d_out,)))
    return rows


def fused_linear(name: str, paths: list[tuple], d_in: int, sizes: list[int], bias: bool) -> list[HFTensor]:
    """One HF ``nn.Linear`` whose output rows are several ``nnx.Linear`` layers (e.g. Phi-3's ``qkv_proj``)."""
    rows = [HFTensor(f"{name}.weight", (sum(sizes), d_in), tuple((*p, "kernel") for p in paths), True,
                     tuple(sizes))]
    if bias:
        rows.append(HFTensor(f"{name}.bias", (sum(sizes),), tuple((*p, "bias") for p in paths), False,
                             tuple(sizes)))
    return rows


def layer_norm(name: str, path: tuple, dim: int, *, bias: bool = True) -> list[HFTensor]:
    """An ``nnx.LayerNorm`` (``scale``/``bias``) from HF's ``weight``/``bias``."""
    rows = [tensor(f"{name}.weight", (*path, "scale"), (dim,))]
    if bias:
        rows.append(tensor(f"{name}.bias", (*path, "bias"), (dim,)))
    return rows


def _canonical(name: str, layout: Layout, known: dict) -> str:
    if name in known:
        return name
    for alias, canonical in layout.aliases:
        if name.startswith(alias) and canonical + name.removeprefix(alias) in known:
            return canonical + name.removeprefix(alias)
    return name


def params_from_hf(tensors: dict[str, np.ndarray], layout: Layout) -> dict:
    """HF state-dict names -> the nested pure dict of ``nnx.state(model, nnx.Param)`` (the checkpoint's dtype)."""
    known = {row.name: row for row in layout.tensors}
    found: dict[str, np.ndarray] = {}
    unexpected = []
    for name, array in tensors.items():
        key = _canonical(name, layout, known)
        if key in known:
            found[key] = array
        elif not any(re.fullmatch(pattern, key) for pattern in layout.ignore):
            unexpected.append(name)
    if unexpected:
        raise ValueError(f"{layout.family} checkpoint has {len(unexpected)} unexpected tensors, e.g. "
                         f"{unexpected[:5]}; use backend='torch' for this checkpoint.")
    missing = [name for name in known if name not in found]
    if missing:
        raise ValueError(f"{layout.family} checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
    params: dict = {}
    for row in layout.tensors:
        array = np.asarray(found[row.name])
        if tuple(array.shape) != row.shape:
            raise ValueError(f"{layout.family} tensor {row.name}: checkpoint shape {tuple(array.shape)}, the "
                             f"config expects {row.shape}")
        parts = np.split(array, np.cumsum(row.sizes)[:-1], axis=0) if row.sizes else [array]
        for path, part in zip(row.paths, parts):
            node = params
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = part.T if row.transpose else part
    return params


def params_to_hf(params: dict, layout: Layout) -> dict[str, np.ndarray]:
    """The inverse of ``params_from_hf``: contiguous numpy arrays under canonical HF names (a tied head is
    not written, as HF saves it)."""
    out = {}
    for row in layout.tensors:
        parts = []
        for path in row.paths:
            node = params
            for key in path:
                node = node[key]
            part = np.asarray(node)
            parts.append(part.T if row.transpose else part)
        array = np.ascontiguousarray(np.concatenate(parts, axis=0) if row.sizes else parts[0])
        if tuple(array.shape) != row.shape:
            raise ValueError(f"{layout.family} tensor {row.name}: parameter shape {tuple(array.shape)}, the "
                             f"config expects {row.shape}")
        out[row.name] = array
    return out


def converters(layout_of):
    """``(params_from_hf, params_to_hf, hf_layout)`` of a family whose checkpoint table is ``layout_of(config)``."""

    def to_params(tensors: dict[str, np.ndarray], config) -> dict:
        """HF state-dict names -> the nested pure dict of ``nnx.state(model, nnx.Param)`` (checkpoint dtype)."""
        return params_from_hf(tensors, layout_of(config))

    def to_hf(params: dict, config) -> dict[str, np.ndarray]:
        """The inverse of ``params_from_hf``: numpy arrays under HF names (a tied head is not written)."""
        return params_to_hf(params, layout_of(config))

    return to_params, to_hf, layout_of
