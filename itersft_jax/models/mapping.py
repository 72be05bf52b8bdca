"""One table-driven mapping between Hugging Face state dicts and the nested params dict of an NNX model.

A family describes its checkpoint as a ``Layout``: one ``HFTensor`` row per HF tensor (name, HF shape, where it lives
in ``nnx.state(model, nnx.Param)``, whether it is transposed, for a fused HF tensor such as Phi-3's ``qkv_proj`` the
sizes of its parts along one HF axis, and for one expert's slice of a stacked ``[E, ...]`` parameter its index), the
prefixes some checkpoints use instead of the canonical ones (``GPT2Model``'s missing ``transformer.``, ``OPTModel``'s
``decoder.``), the names that are buffers or a tied head rather than weights, and *variants*: other names for some
of the same parameters (transformers 5's fused ``[E, 2F, D]`` expert tensors), read instead when a checkpoint holds
them. ``params_from_hf`` and ``params_to_hf`` read and write every family with that one table; every error is a
``ValueError`` naming the tensor.
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
    transpose: bool = False     # nn.Linear ``[out, in]`` <-> nnx.Linear kernel ``[in, out]`` (the last two axes)
    sizes: tuple[int, ...] = ()  # fused tensor: each part's size along HF axis ``split_axis``, in ``paths`` order
    expert: int | None = None   # this tensor is slice ``expert`` (axis 0) of the stacked parameter at ``paths[0]``
    split_axis: int = 0


@dataclasses.dataclass(frozen=True)
class Layout:
    """A family's whole checkpoint: its tensors, alternative name prefixes and ignorable names."""

    family: str
    tensors: tuple[HFTensor, ...]
    aliases: tuple[tuple[str, str], ...] = ()  # (prefix some checkpoints use, canonical prefix)
    ignore: tuple[str, ...] = ()               # regexes (full match) of names that are not weights
    variants: tuple[tuple[tuple[str, ...], tuple[HFTensor, ...]], ...] = ()  # (canonical names, rows read instead)


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


def _canonical(name: str, layout: Layout, known) -> str:
    if name in known:
        return name
    for alias, canonical in layout.aliases:
        if name.startswith(alias) and canonical + name.removeprefix(alias) in known:
            return canonical + name.removeprefix(alias)
    return name


def _swap(array):
    return np.swapaxes(array, -1, -2)


class StackedArray:
    """A parameter stacked from per-expert HF tensors (axis 0), not copied until read: ``np.asarray`` gives the whole
    array, indexing (``weights._place_on_mesh``'s per-device slices) reads only the experts it needs."""

    def __init__(self, parts: list):
        self.parts = parts
        self.shape = (len(parts), *parts[0].shape)
        self.dtype = parts[0].dtype
        self.ndim = len(self.shape)

    def __array__(self, dtype=None, copy=None):
        array = np.stack([np.asarray(p) for p in self.parts])
        return array if dtype is None else array.astype(dtype)

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        first, rest = index[0], index[1:]
        picked = range(len(self.parts))[first]
        if isinstance(picked, int):
            return np.asarray(self.parts[picked][rest])
        return np.stack([np.asarray(self.parts[i][rest]) for i in picked])


def _rows(tensors: dict, layout: Layout) -> tuple[HFTensor, ...]:
    """The layout's rows, with each variant's rows instead of the canonical ones it replaces when the checkpoint
    holds every tensor of the variant."""
    rows = list(layout.tensors)
    for replaced, variant in layout.variants:
        if all(row.name in tensors for row in variant):
            gone = set(replaced)
            rows = [row for row in rows if row.name not in gone] + list(variant)
    return tuple(rows)


def params_from_hf(tensors: dict[str, np.ndarray], layout: Layout) -> dict:
    """HF state-dict names -> the nested pure dict of ``nnx.state(model, nnx.Param)`` (the checkpoint's dtype).
    A parameter stacked from per-expert tensors is a ``StackedArray`` (read on demand)."""
    every_name = {row.name for row in _all_rows(layout)}
    canonical = {_canonical(name, layout, every_name): name for name in tensors}
    rows = _rows(canonical, layout)
    known = {row.name: row for row in rows}
    found: dict[str, np.ndarray] = {}
    unexpected = []
    for key, name in canonical.items():
        if key in known:
            found[key] = tensors[name]
        elif not any(re.fullmatch(pattern, key) for pattern in layout.ignore):
            unexpected.append(name)
    if unexpected:
        raise ValueError(f"{layout.family} checkpoint has {len(unexpected)} unexpected tensors, e.g. "
                         f"{unexpected[:5]}; use backend='torch' for this checkpoint.")
    missing = [name for name in known if name not in found]
    if missing:
        raise ValueError(f"{layout.family} checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
    params: dict = {}
    stacks: dict[tuple, dict[int, np.ndarray]] = {}
    for row in rows:
        array = found[row.name]
        if not isinstance(array, np.ndarray):
            array = np.asarray(array)
        if tuple(array.shape) != row.shape:
            raise ValueError(f"{layout.family} tensor {row.name}: checkpoint shape {tuple(array.shape)}, the "
                             f"config expects {row.shape}")
        if row.expert is not None:
            stacks.setdefault(row.paths[0], {})[row.expert] = _swap(array) if row.transpose else array
            continue
        cuts = np.cumsum(row.sizes)[:-1]
        parts = np.split(array, cuts, axis=row.split_axis) if row.sizes else [array]
        for path, part in zip(row.paths, parts):
            _put(params, path, _swap(part) if row.transpose else part)
    for path, parts in stacks.items():
        _put(params, path, StackedArray([parts[j] for j in range(len(parts))]))
    return params


def _all_rows(layout: Layout):
    return layout.tensors + tuple(row for _, variant in layout.variants for row in variant)


def _put(params: dict, path: tuple, value) -> None:
    node = params
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


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
            part = np.asarray(node) if row.expert is None else np.asarray(node[row.expert])
            parts.append(_swap(part) if row.transpose else part)
        array = np.ascontiguousarray(np.concatenate(parts, axis=row.split_axis) if row.sizes else parts[0])
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
