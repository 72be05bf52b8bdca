"""The device mesh of the JAX engine: named axes ``data``, ``fsdp``, ``expert`` and ``tensor``, set by
``IterativeSFTConfig.mesh``.

``mesh`` is a string (``HfArgumentParser`` passes it from the command line as is): comma-separated ``axis:size``
items, e.g. ``"fsdp:8"``, ``"data:2,fsdp:4"``, ``"fsdp:4,tensor:2"``; one size may be ``-1`` (the devices left
over); a bare ``"-1"`` means ``"fsdp:-1"``. Unset (``None``): every device on ``fsdp``. Axes not named have size 1.

- ``data``: replicas of the parameters, each fed its own rows (pure data parallelism);
- ``fsdp``: parameters, gradients and optimizer state split across the devices (ZeRO-3 style), the rows too —
  with a batch of rows on every device it costs the same compute as ``data`` and holds 1/n of the state;
- ``expert``: a mixture-of-experts model's experts (and their gradients and optimizer state) split across the
  devices, each holding ``1/n`` of them; the other parameters are replicated over it and the rows split, as with
  ``data``, and a sparse layer exchanges tokens between the devices of an expert group (``models/moe.py``);
- ``tensor``: attention heads and the MLP hidden dimension split across the devices (Megatron style); the
  devices of one tensor group see the same rows.

The batch's rows are split over ``data`` x ``fsdp`` x ``expert`` (``BATCH_AXES``); ``parallel.sharding`` says how each
parameter is split. This module parses the spec without JAX (the config checks it); ``parallel.mesh`` builds the
``jax.sharding.Mesh``.
"""

from __future__ import annotations

import math

AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the row axis of a batch is split over these


def parse_mesh(spec: str | None) -> dict[str, int]:
    """``{"data": n, "fsdp": n, "expert": n, "tensor": n}`` from ``spec`` (sizes may hold one ``-1``); ValueError naming
    ``mesh`` on bad syntax, unknown or repeated axes, or sizes that are not positive (or -1)."""
    if spec is None:
        return {"data": 1, "fsdp": -1, "expert": 1, "tensor": 1}
    if not isinstance(spec, str):
        raise TypeError(f"`mesh` must be a string like 'fsdp:8' or 'data:2,fsdp:4', got {type(spec).__name__}")
    text = spec.replace(" ", "")
    if text in ("-1", "auto"):
        return {"data": 1, "fsdp": -1, "expert": 1, "tensor": 1}
    sizes: dict[str, int] = {}
    for item in text.split(","):
        name, sep, size = item.partition(":")
        if not sep or not name or not size:
            raise ValueError(f"`mesh`={spec!r}: expected comma-separated 'axis:size' items (axes {AXES}), "
                             f"e.g. 'fsdp:8' or 'data:2,fsdp:4'; got the item {item!r}")
        if name not in AXES:
            raise ValueError(f"`mesh`={spec!r}: unknown axis {name!r}; the axes are {AXES}")
        if name in sizes:
            raise ValueError(f"`mesh`={spec!r}: axis {name!r} is given twice")
        try:
            value = int(size)
        except ValueError:
            raise ValueError(f"`mesh`={spec!r}: the size of {name!r} must be an integer, got {size!r}") from None
        if value < 1 and value != -1:
            raise ValueError(f"`mesh`={spec!r}: the size of {name!r} must be >= 1 or -1 (the rest), got {value}")
        sizes[name] = value
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"`mesh`={spec!r}: at most one axis may be -1")
    return {axis: sizes.get(axis, 1) for axis in AXES}


def resolve_sizes(spec: str | None, num_devices: int) -> dict[str, int]:
    """The axis sizes of ``spec`` on ``num_devices`` devices (``-1`` filled in); ValueError naming ``mesh``
    when they do not multiply to ``num_devices``."""
    sizes = parse_mesh(spec)
    known = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if num_devices % known:
            raise ValueError(f"`mesh`={spec!r}: the fixed axes take {known} devices, which does not divide the "
                             f"{num_devices} devices available")
        sizes = {k: (num_devices // known if v == -1 else v) for k, v in sizes.items()}
    elif known != num_devices:
        raise ValueError(f"`mesh`={spec!r} takes {known} devices, but {num_devices} are available (jax.devices()); "
                         f"the sizes must multiply to the device count (use -1 for 'the rest')")
    return sizes
