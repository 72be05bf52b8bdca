"""The KV cache every family uses: ``[B, K, S, H]`` keys and values per layer, and writing a call's keys into it."""


from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["k", "v", "index", "prefix_k", "prefix_v", "prefix_mask", "group"],
                   meta_fields=["empty"])
@dataclasses.dataclass
class KVCache:
    """Per-layer keys and values, ``[B, K, S, H]`` each, and the number of slots already written.

    Heads before slots: attention contracts over ``H`` and ``S`` per head, so this layout feeds the batched
    matmuls directly; a ``[B, S, K, H]`` cache made XLA transpose every layer's whole cache at every decode
    step (1.45x slower generation on this CPU). ``empty`` (static) marks a cache nothing was written to yet:
    the call filling it (generation's prefill) attends only its own keys, so it can take a flash kernel.

    A prompt held once for its rows (the sampler's shared-prompt layout): ``prefix_k`` / ``prefix_v`` per layer
    ``[G, K, P, H]`` (one copy per prompt group), ``prefix_mask [G, P]`` (1 = a real prompt token) and ``group [B]``
    (the group each row reads); ``k`` / ``v`` then hold only each row's own tokens after its prompt, and decode
    attention merges both (``attention.shared_prefix``). ``None`` without one.
    """

    k: list[jax.Array]
    v: list[jax.Array]
    index: jax.Array  # int32 scalar
    empty: bool = False
    prefix_k: list[jax.Array] | None = None
    prefix_v: list[jax.Array] | None = None
    prefix_mask: jax.Array | None = None
    group: jax.Array | None = None

    @classmethod
    def zeros(cls, num_layers: int, batch: int, length: int, num_kv_heads: int, head_dim: int,
              dtype=jnp.float32) -> KVCache:
        """The one cache initialisation every family uses."""
        shape = (batch, num_kv_heads, length, head_dim)
        return cls(k=[jnp.zeros(shape, dtype) for _ in range(num_layers)],
                   v=[jnp.zeros(shape, dtype) for _ in range(num_layers)],
                   index=jnp.zeros((), jnp.int32), empty=True)

def update_layer_cache(cache_k_BKSH, cache_v_BKSH, k_BTKH, v_BTKH, index):
    """Write this call's keys and values (``[B, T, K, H]``) into the cache at slot ``index``."""
    start = (0, 0, index, 0)
    k_BKTH = k_BTKH.transpose(0, 2, 1, 3).astype(cache_k_BKSH.dtype)
    v_BKTH = v_BTKH.transpose(0, 2, 1, 3).astype(cache_v_BKSH.dtype)
    return (jax.lax.dynamic_update_slice(cache_k_BKSH, k_BKTH, start),
            jax.lax.dynamic_update_slice(cache_v_BKSH, v_BKTH, start))
