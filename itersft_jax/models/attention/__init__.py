"""The attention entry point every family calls (``attention_context`` once per forward, ``attention`` in each
layer), and the implementations behind it: ``xla.py`` (the materializing path), ``flash.py`` (the kernel entry)
with one file per kernel (``xla_chunked``, ``pallas_gpu``, ``splash``, ``cudnn``), ``select.py`` (which runs a
case), ``masks.py`` (positions and masks).

Conventions (see ``models/__init__.py`` for the calling convention):

* ``input_ids_BT`` int32, ``positions_BT`` int32 (``positions_from_mask`` / ``positions_from_segments``),
  ``attention_mask_BS`` int/bool over the *key* slots: ``S == T`` without a cache, ``S`` = cache length with
  one. 1 marks a real token, 0 padding; packed rows carry segment ids (1, 2, ...) instead, and a query attends
  only its own segment.
* Without a cache (or with an empty one: generation's prefill), query ``t`` sits in slot ``t``; with one, in
  slot ``cache.index + t``. A query attends a key slot at or before its own that holds a real token of its
  segment (and, for sliding-window layers, fewer than ``window`` slots behind it).
* Attention logits and softmax are fp32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from itersft_jax.models.attention.flash import flash_attention
from itersft_jax.models.attention.masks import make_attention_mask, slot_mask
from itersft_jax.models.attention.select import choose_implementation
from itersft_jax.models.attention.shared_prefix import shared_prefix_attention
from itersft_jax.models.attention.xla import grouped_attention
from itersft_jax.models.cache import KVCache, update_layer_cache


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["segment_ids_BT", "mask_BTS", "index", "prefix_mask_GP", "group_B"],
                   meta_fields=["implementation", "own_keys"])
@dataclasses.dataclass(frozen=True)
class AttentionContext:
    """What every layer's attention needs from one forward, built once (``attention_context``).

    ``segment_ids_BT``: the queries' segment ids (0 = padding), the kernels' input; ``mask_BTS``: the XLA path's
    mask (causal, same segment, real key; no window — each layer adds its own), ``None`` when a kernel serves
    the whole forward; ``index``: the cache slot this call writes at (``None`` without a cache);
    ``implementation``: the model's resolved attention implementation; ``own_keys``: the queries attend only
    this call's keys (no cache, or an empty one), so slots equal positions in the call. ``prefix_mask_GP`` /
    ``group_B``: a cache holding each prompt once (``KVCache.prefix_k``), else ``None``.
    """

    segment_ids_BT: jax.Array
    mask_BTS: jax.Array | None
    index: jax.Array | None
    implementation: str
    own_keys: bool
    prefix_mask_GP: jax.Array | None = None
    group_B: jax.Array | None = None

def attention_context(attention_mask_BS: jax.Array, num_queries: int, cache: KVCache | None,
                      implementation: str = "xla") -> AttentionContext:
    seg_BS = attention_mask_BS.astype(jnp.int32)
    own_keys = cache is None or cache.empty
    index = None if cache is None else cache.index
    if own_keys:
        seg_BS = seg_BS[:, :num_queries]
        q_seg_BT = seg_BS
    else:
        q_seg_BT = jax.lax.dynamic_slice_in_dim(seg_BS, index, num_queries, axis=1)
    kernel = own_keys and implementation != "xla"
    mask_BTS = None if kernel else make_attention_mask(seg_BS, num_queries, 0 if own_keys else index)
    if cache is not None and cache.prefix_k is not None:
        return AttentionContext(q_seg_BT, mask_BTS, index, implementation, own_keys, cache.prefix_mask, cache.group)
    return AttentionContext(q_seg_BT, mask_BTS, index, implementation, own_keys)

def attention(q_BTNH, k_BTKH, v_BTKH, kv, ctx: AttentionContext, *, scale: float, window: int | None = None,
              softcap: float | None = None):
    """The attention entry point of every family: causal self-attention of this call's queries, through the
    layer's cache slice ``kv`` when there is one. Returns ``(out_BTNH, kv)``.

    ``scale`` multiplies ``q.k``; ``softcap`` caps those logits as ``c * tanh(x / c)`` before masking (Gemma 2);
    ``window`` keeps keys fewer than ``window`` slots behind the query. Calls that attend only their own keys
    go to the model's kernel (``flash.flash_attention``) unless its implementation is ``"xla"``; decode steps
    over a cache take the XLA path.
    """
    if ctx.group_B is not None:  # the rows' own keys after a prompt held once per group (shared_prefix.py)
        if window is not None:
            raise ValueError("a prompt held once for its rows does not serve sliding-window layers")
        k_BKSH, v_BKSH = update_layer_cache(kv[0], kv[1], k_BTKH, v_BTKH, ctx.index)
        out_BTNH = shared_prefix_attention(q_BTNH, kv[2], kv[3], ctx.prefix_mask_GP, ctx.group_B, k_BKSH, v_BKSH,
                                           ctx.mask_BTS, scale=scale, softcap=softcap)
        return out_BTNH, (k_BKSH, v_BKSH, kv[2], kv[3])
    if kv is not None:
        kv = update_layer_cache(kv[0], kv[1], k_BTKH, v_BTKH, ctx.index)
    if ctx.mask_BTS is None:
        out_BTNH = flash_attention(q_BTNH, k_BTKH, v_BTKH, ctx.segment_ids_BT, scale=scale, window=window,
                                              softcap=softcap, implementation=ctx.implementation)
        return out_BTNH, kv
    if ctx.own_keys:
        keys_BKSH, values_BKSH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
    else:
        keys_BKSH, values_BKSH = kv
    mask_BTS = ctx.mask_BTS
    if window is not None:
        t, s = mask_BTS.shape[1:]
        mask_BTS = mask_BTS & slot_mask(t, s, 0 if ctx.own_keys else ctx.index, window)[None]
    out_BTNH = grouped_attention(q_BTNH, keys_BKSH.astype(q_BTNH.dtype), values_BKSH.astype(q_BTNH.dtype),
                                 mask_BTS, scale=scale, softcap=softcap)
    return out_BTNH, kv

def resolve_attention_implementation(requested: str | None, *, dtype, head_dim: int, window: int | None,
                                     softcap: float | None, seq_len: int | None = None) -> str:
    """The implementation one forward uses: ``"xla"`` (the materializing path above) or a kernel of
    ``flash.py``. ``requested``: ``"auto"``/``None``, one of ``select.IMPLEMENTATIONS`` or a Hugging Face
    name (``eager``, ``sdpa``, ``flash_attention_2``, ...); ``select.choose_implementation`` decides
    (on CPU "auto" depends on ``seq_len``, the call's tokens per row) and refuses what cannot run."""
    if requested is not None and not isinstance(requested, str):
        raise TypeError(f"attn_implementation must be a str, got {type(requested).__name__}")
    return choose_implementation(requested, platform=jax.default_backend(), dtype=dtype,
                                                    head_dim=head_dim, window=window, softcap=softcap,
                                                    seq_len=seq_len)
