"""The ``jax.sharding.Mesh`` of the JAX engine, built from ``IterativeSFTConfig.mesh`` (parsed by
``shared.mesh_spec``, which says what each axis does)."""

from __future__ import annotations

import math
from typing import Any

from itersft_jax.shared.mesh_spec import AXES, BATCH_AXES, resolve_sizes

__all__ = ["AXES", "BATCH_AXES", "data_parallel_size", "make_mesh"]


def make_mesh(spec: str | None, devices: list[Any] | None = None):
    """A ``jax.sharding.Mesh`` with axes ``("data", "fsdp", "expert", "tensor")`` over ``devices`` (default: all of
    ``jax.devices()``, every process's), laid out by ``jax.make_mesh``'s topology-aware ordering when it can
    (tensor groups on the closest devices), else in device order."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_sizes(spec, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - unusual topologies: a plain reshape is always valid
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES)


def data_parallel_size(mesh) -> int:
    """How many different row groups one micro-batch is split into (``data`` x ``fsdp`` x ``expert``)."""
    return int(math.prod(mesh.shape[a] for a in BATCH_AXES))
