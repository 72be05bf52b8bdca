"""Weight files on disk, for both engines, with numpy alone (no jax, no torch): which weights a directory holds
(safetensors, or Flax msgpack files only) and safetensors read directly — the checked header layout,
memory-mapped tensors (bf16 as ``ml_dtypes.bfloat16``), a check that names a truncated or damaged file."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

FLAX_WEIGHTS_NAME = "flax_model.msgpack"
FLAX_WEIGHTS_INDEX_NAME = "flax_model.msgpack.index.json"
FLAX_ALLOW_PATTERNS = ["flax_model*.msgpack", FLAX_WEIGHTS_INDEX_NAME]
# What a Hugging Face model directory holds besides Flax weights: config, safetensors (single or sharded),
# tokenizer files and the chat template -- what a Hub download fetches and a checkpoint push uploads.
MODEL_DIR_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
    "chat_template*",
]

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def safetensors_layout(path: str) -> tuple[int, list[tuple[str, Any, list[int], int, int]]]:
    """The checked layout of a safetensors file: ``(data offset, [(name, dtype, shape, start, end), ...])``.
    A truncated or garbage file (header length beyond the file, header not JSON, data offsets outside the
    data section or not matching the shape) raises ``ValueError`` naming it."""
    import ml_dtypes

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little")
        if len(head) < 8 or header_len > size - 8:
            what = f"the first 8 bytes say its JSON header alone has {header_len}" if len(head) == 8 else "no header"
            raise ValueError(f"{path}: not a complete safetensors file ({size} bytes, {what}): truncated or not "
                             f"safetensors")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: damaged safetensors header (not JSON: {err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: damaged safetensors header (not a JSON object)")
    data_len = size - 8 - header_len
    layout = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            kind, shape = info["dtype"], [int(n) for n in info["shape"]]
            start, end = (int(x) for x in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{path}: damaged safetensors header entry for tensor {name}: {info!r}") from None
        dtype = ml_dtypes.bfloat16 if kind == "BF16" else SAFETENSORS_DTYPES.get(kind)
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {kind}")
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if not 0 <= start <= end <= data_len or end - start != expected:
            raise ValueError(f"{path}: tensor {name} needs bytes [{start}, {end}) of a {data_len}-byte data "
                             f"section ({expected} bytes for {kind}{shape}): truncated or damaged file")
        layout.append((name, dtype, shape, start, end))
    return 8 + header_len, layout


def read_safetensors_file(path: str) -> dict[str, np.ndarray]:
    """One safetensors file as numpy arrays (memory-mapped; BF16 as ``ml_dtypes.bfloat16``).

    Parsed directly — 8-byte header length, JSON header, raw little-endian data — because
    ``safetensors.numpy`` cannot represent bf16 in every version. A truncated or garbage file raises
    ``ValueError`` naming it.
    """
    offset, layout = safetensors_layout(path)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset) if os.path.getsize(path) > offset else None
    return {name: np.frombuffer(data[start:end] if data is not None else b"",
                                dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
            for name, dtype, shape, start, end in layout}


def check_safetensors_files(model_dir: str | os.PathLike) -> None:
    """``ValueError`` naming the first ``*.safetensors`` file of ``model_dir`` that is truncated or damaged
    (reads headers only; for loaders whose own error does not name the file)."""
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            safetensors_layout(os.path.join(os.fspath(model_dir), name))


# ----------------------------------------------------------------------------- what a directory holds


def has_safetensors(model_dir: str | os.PathLike) -> bool:
    return any(name.endswith(".safetensors") or name.endswith(".safetensors.index.json")
               for name in os.listdir(model_dir))


def has_flax_weights(model_dir: str | os.PathLike) -> bool:
    return any(name.startswith("flax_model") and (name.endswith(".msgpack") or name == FLAX_WEIGHTS_INDEX_NAME)
               for name in os.listdir(model_dir))


def is_flax_only(model_dir: str | os.PathLike) -> bool:
    """A directory whose weights are Flax msgpack files and no safetensors (safetensors win when both exist)."""
    return os.path.isdir(model_dir) and has_flax_weights(model_dir) and not has_safetensors(model_dir)


def read_sharded(model_dir: str | os.PathLike, index_name: str, read_file) -> tuple[str, dict, dict]:
    """``(index path, weight_map, tensors)`` of a sharded checkpoint: the index ``index_name`` read (a damaged one
    raises ``ValueError`` naming it), each shard it lists read with ``read_file(path) -> dict`` and merged (a
    missing shard raises ``FileNotFoundError`` naming it)."""
    model_dir = os.fspath(model_dir)
    index_path = os.path.join(model_dir, index_name)
    try:
        with open(index_path, "rb") as f:
            weight_map = json.loads(f.read())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{index_path}: damaged index (expected JSON with a 'weight_map' object: "
                         f"{type(err).__name__}: {err})") from None
    tensors: dict = {}
    for shard in shards:
        shard_path = os.path.join(model_dir, shard)
        if not os.path.isfile(shard_path):
            raise FileNotFoundError(f"{index_path} lists the shard {shard}, which is not in {model_dir}")
        tensors.update(read_file(shard_path))
    return index_path, weight_map, tensors
