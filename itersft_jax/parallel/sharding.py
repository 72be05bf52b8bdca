"""How every family's parameters are split over the mesh: one rule table, parameter path -> logical axes -> mesh axes.

A parameter's path (``model/layers/3/self_attn/q_proj/kernel``; layer indices dropped) is matched against
``PARAM_RULES`` in order; the first match gives one *logical* axis per dimension, and ``LOGICAL_TO_MESH`` turns
each logical axis into a mesh axis (``itersft_jax.parallel.mesh``): the model width (``embed``) over ``fsdp``; attention
heads, the MLP hidden dimension and the vocabulary over ``tensor``. Column-parallel projections (q/k/v, gate/up,
fc1) split their output features over ``tensor``, row-parallel ones (o, down, fc2) their input features, so an
attention block or an MLP needs one reduction of its output, as in Megatron. A mixture of experts' stacked expert
weights (``experts/gate_proj`` ``[E, D, F]``, ...) split their expert axis over ``expert`` (and ``D``, ``F`` as
the dense MLP's), so each device of an expert group holds ``1/n`` of the experts; the sparse block's
``shard_map`` (``models/moe.py``) expects exactly this layout.

A dimension whose size the mesh axis does not divide stays whole on that axis (never an error: a 3-head model
on ``tensor:2`` still runs, with that projection replicated over ``tensor``); a path no rule names (new
variables, e.g. adapters) gets ``fsdp`` on its largest divisible dimension; 1-D parameters (norms, biases of
row-parallel layers) are small and replicated. Sharding never changes what is computed, only where: XLA's SPMD
partitioner inserts the collectives, so any table is correct and this one is about memory and traffic.
"""

from __future__ import annotations

import re
from typing import Any

# Logical axes -> mesh axes (None: replicated).
LOGICAL_TO_MESH: dict[str, str | None] = {
    "embed": "fsdp",  # the model width
    "hidden": "tensor",  # attention heads x head_dim, the MLP hidden dimension
    "vocab": "tensor",
    "expert": "expert",  # a mixture of experts' expert index
    "position": None,
    "norm": None,
}

_COLUMN = (r"(q_proj|k_proj|v_proj|qkv_proj|gate_proj|up_proj|gate_up_proj|fc1|c_fc|c_attn"
           r"|query_key_value|dense_h_to_4h|fc_in)")  # GPT-NeoX's fused QKV is per head: a column split keeps heads
_ROW = r"(o_proj|out_proj|down_proj|fc2|dense|c_proj|dense_4h_to_h|fc_out)"

# (path regex, logical axes per dimension). First match wins; paths are '/'-joined without layer indices.
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"experts/(gate_proj|up_proj)$", ("expert", "embed", "hidden")),
    (r"experts/down_proj$", ("expert", "hidden", "embed")),
    (rf"{_COLUMN}/kernel$", ("embed", "hidden")),
    (rf"{_COLUMN}/bias$", ("hidden",)),
    (rf"{_ROW}/kernel$", ("hidden", "embed")),
    (rf"{_ROW}/bias$", ("norm",)),
    (r"(embed_tokens|wte|embed_in)/embedding$", ("vocab", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"lm_head/bias$", ("vocab",)),
    (r"(embed_positions|wpe)/embedding$", ("position", "embed")),
    # a mixture of experts' router [D, E] and Qwen2-MoE's shared-expert gate [D, 1]: every device needs all experts'
    # logits, so only the model width splits
    (r"mlp/(gate/weight|shared_expert_gate/kernel)$", ("embed", None)),
    (r"(norm|layernorm|ln_\w+|layer_norm)/(weight|scale|bias)$", ("norm",)),
)
_COMPILED = tuple((re.compile(pattern), axes) for pattern, axes in PARAM_RULES)


def path_name(path: tuple[Any, ...]) -> str:
    """``model/layers/self_attn/q_proj/kernel`` from a pytree key path (integer layer indices and the
    ``.value`` of an ``nnx.Variable`` dropped)."""
    parts = []
    for key in path:
        key = getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            continue
        parts.append(str(key))
    if parts and parts[-1] == "value":  # an nnx.Variable's array
        parts.pop()
    return "/".join(parts)


def logical_axes(name: str, ndim: int) -> tuple[str | None, ...] | None:
    """The logical axes of the parameter named ``name`` (``path_name``), or None when no rule names it."""
    for pattern, axes in _COMPILED:
        if pattern.search(name) and len(axes) == ndim:
            return axes
    return None


def partition_spec(name: str, shape: tuple[int, ...], mesh_shape: dict[str, int]):
    """The ``PartitionSpec`` of a parameter on a mesh of ``mesh_shape`` (axis -> size)."""
    from jax.sharding import PartitionSpec

    axes = logical_axes(name, len(shape))
    if axes is None:
        return default_partition_spec(shape, mesh_shape)
    spec: list[str | None] = []
    for size, logical in zip(shape, axes):
        mesh_axis = LOGICAL_TO_MESH.get(logical) if logical else None
        if mesh_axis is None or mesh_axis in spec or size % mesh_shape.get(mesh_axis, 1):
            mesh_axis = None
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def default_partition_spec(shape: tuple[int, ...], mesh_shape: dict[str, int]):
    """``fsdp`` on the largest dimension it divides (ties: the first), replicated otherwise; scalars and
    vectors replicated."""
    from jax.sharding import PartitionSpec

    fsdp = mesh_shape.get("fsdp", 1)
    if len(shape) < 2 or fsdp == 1:
        return PartitionSpec()
    candidates = [(size, -i) for i, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return PartitionSpec()
    best = -max(candidates)[1]
    return PartitionSpec(*[("fsdp" if i == best else None) for i in range(len(shape))])


def param_shardings(params: Any, mesh) -> Any:
    """A pytree like ``params`` (an ``nnx.State`` or any pytree of arrays / shape structs) of ``NamedSharding``s."""
    import jax
    from jax.sharding import NamedSharding

    mesh_shape = dict(mesh.shape)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, partition_spec(path_name(path), tuple(x.shape), mesh_shape)), params)


def tree_shardings(tree: Any, params: Any, param_sharding: Any, mesh) -> Any:
    """Shardings for a pytree that holds copies of the parameters' structure (an optimizer state: Adam's
    moments, ...): a leaf whose key path ends with a parameter's path and has its shape gets that parameter's
    sharding; other leaves (step counters, scalars) follow ``default_partition_spec``."""
    import jax
    from jax.sharding import NamedSharding

    by_path: dict[str, tuple[tuple[int, ...], Any]] = {}
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_shardings = jax.tree.leaves(param_sharding, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sharding in zip(flat_params, flat_shardings):
        by_path[_full_path(path)] = (tuple(leaf.shape), sharding)
    mesh_shape = dict(mesh.shape)

    def pick(path, leaf):
        full = _full_path(path)
        shape = tuple(getattr(leaf, "shape", ()))
        for start in range(len(full.split("/"))):
            tail = "/".join(full.split("/")[start:])
            hit = by_path.get(tail)
            if hit is not None and hit[0] == shape:
                return hit[1]
        return NamedSharding(mesh, default_partition_spec(shape, mesh_shape))

    return jax.tree_util.tree_map_with_path(pick, tree)


def _full_path(path: tuple[Any, ...]) -> str:
    parts = []
    for key in path:
        parts.append(str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))))
    return "/".join(parts)
