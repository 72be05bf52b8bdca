"""The layer loop with rematerialization policies (``full``, ``dots``, ``offload``)."""


from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from itersft_jax.models.cache import KVCache


def _offload_policy():
    kinds = {memory.kind for memory in jax.devices()[0].addressable_memories()}
    if "pinned_host" not in kinds:
        raise ValueError(f"remat policy 'offload' needs pinned host memory, which {jax.devices()[0].platform} "
                         f"devices lack here (memory kinds: {sorted(kinds)}); use 'dots' or 'full'.")
    return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")

# Gradient-checkpointing policies (what a rematerialized layer keeps from its forward pass):
REMAT_POLICIES: dict[str, Callable[[], Any]] = {
    "full": lambda: None,  # nothing inside a layer: only its input is kept
    "dots": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # matmul outputs (not attention's)
    "offload": _offload_policy,  # the same matmul outputs, moved to host memory until the backward pass
}

def normalize_remat(remat: bool | str | None) -> str | None:
    """``remat`` as a policy name (``None``: no remat). ``True`` is ``"full"``."""
    if remat is None or remat is False:
        return None
    if remat is True:
        return "full"
    if not isinstance(remat, str) or remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be True/False or one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    REMAT_POLICIES[remat]()  # refuse a policy this platform cannot run when the model is built
    return remat

def run_layers(layers, h_BTD: jax.Array, cache: KVCache | None, *args, remat: str | None = None):
    """Apply ``layers`` in order, each as ``layer(h_BTD, kv_i, *args) -> (h_BTD, kv_i)``, threading the cache.

    ``kv_i`` is layer i's ``(k, v)`` slice of ``cache``, or ``None`` without a cache; ``args`` are shared by
    every layer (pytrees of arrays). With a ``remat`` policy name each layer call is wrapped in ``nnx.remat``
    (gradient checkpointing: the backward pass recomputes what the policy did not keep). Returns
    ``(h_BTD, cache)``, the cache advanced by ``T`` slots.
    """
    def apply(layer, h, kv, *rest):
        return layer(h, kv, *rest)

    if remat is not None:
        apply = nnx.remat(apply, policy=REMAT_POLICIES[remat]())
    new_k, new_v = [], []
    for i, layer in enumerate(layers):
        kv = None if cache is None else (cache.k[i], cache.v[i])
        if cache is not None and cache.prefix_k is not None:  # a prompt held once for its rows: read-only
            kv = (*kv, cache.prefix_k[i], cache.prefix_v[i])
        h_BTD, kv = apply(layer, h_BTD, kv, *args)
        if cache is not None:
            new_k.append(kv[0])
            new_v.append(kv[1])
    if cache is not None:
        cache = dataclasses.replace(cache, k=new_k, v=new_v, index=cache.index + h_BTD.shape[1], empty=False)
    return h_BTD, cache
