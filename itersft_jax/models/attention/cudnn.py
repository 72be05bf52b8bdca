"""``"cudnn"``: NVIDIA's fused flash attention, packed rows through its ragged (offset, length) layout."""


from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def cudnn_segment_layout(segment_ids_BT: jax.Array, max_segments: int):
    """Packed rows as cuDNN's ragged layout: ``(seqlens_BM, offsets_BM1, ok_B)``.

    A segment is a run of equal non-zero ids; run ``r`` of row ``b`` starts at token ``offsets[b, r]`` and holds
    ``seqlens[b, r]`` tokens; unused entries are -1 (``offsets`` has ``M + 1`` columns, the last always -1, as
    ``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`` documents). ``ok_B`` is False for a row
    cuDNN cannot express: more than ``max_segments`` runs, or one id split over two runs (padding inside a
    sample, or an id reused) — the contract says such tokens attend each other, cuDNN would separate them.
    """
    seg = segment_ids_BT.astype(jnp.int32)
    b, t = seg.shape
    m = max_segments
    real = seg != 0
    starts = real & (seg != jnp.pad(seg, ((0, 0), (1, 0)))[:, :-1])
    run = jnp.cumsum(starts, axis=1) - 1
    num_runs = starts.sum(axis=1)
    rows = jnp.arange(b)[:, None]
    first = jnp.where(starts & (run < m), run, m + 1)  # out of range -> dropped
    offsets = jnp.full((b, m + 1), -1, jnp.int32).at[rows, first].set(jnp.arange(t, dtype=jnp.int32), mode="drop")
    used = jnp.arange(m) < num_runs[:, None]
    counts = jnp.zeros((b, m), jnp.int32).at[rows, jnp.where(real, run, m)].add(1, mode="drop")
    seqlens = jnp.where(used, counts, -1)
    ids = jnp.zeros((b, m + 1), jnp.int32).at[rows, first].set(seg, mode="drop")[:, :m]
    same = (ids[:, :, None] == ids[:, None, :]) & used[:, :, None] & used[:, None, :] & ~jnp.eye(m, dtype=bool)
    ok = (num_runs <= m) & ~same.any(axis=(1, 2))
    return seqlens, offsets, ok

@functools.lru_cache(maxsize=1)
def _cudnn_packed_kv_offsets_use_query_heads() -> bool:
    """Whether the installed jax scales packed kv offsets by the *query* head count (jax-ml/jax#39521, still in
    jax 0.10.2; fixed by 0.11.2, where packed GQA matched the reference on an H100). Then keys must be given N
    heads, or cuDNN reads other tokens' keys. Unknown source counts as buggy: repeating is always correct."""
    import inspect

    from jax._src.cudnn import fused_attention_stablehlo

    try:
        source = inspect.getsource(fused_attention_stablehlo._fix_seqlen_offsets)
    except (AttributeError, OSError, TypeError):
        return True
    return "kv_offsets * N_kv" not in source

def cudnn_attention(q_BTNH, k_BTKH, v_BTKH, seg_BT, *, scale, window, max_segments):
    """cuDNN flash attention over the ragged (packed) layout; always the ragged path, so left padding and
    several samples per row are handled alike (it needs Hopper; jax raises on older GPUs)."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    n, kv = q_BTNH.shape[2], k_BTKH.shape[2]
    # jax only passes offsets to cuDNN with >= 2 segment slots per row
    seqlens, offsets, ok_B = cudnn_segment_layout(seg_BT, max(2, max_segments))
    real = (seg_BT != 0)[:, :, None, None]
    # cuDNN leaves tokens outside every segment unwritten (forward and backward): select them away both ways
    q_BTNH, k_BTKH, v_BTKH = (jnp.where(real, x, 0) for x in (q_BTNH, k_BTKH, v_BTKH))
    if kv != n and _cudnn_packed_kv_offsets_use_query_heads():
        k_BTKH, v_BTKH = (jnp.repeat(x, n // kv, axis=2) for x in (k_BTKH, v_BTKH))
    out = dot_product_attention(q_BTNH, k_BTKH, v_BTKH, None, None, seqlens, seqlens, offsets, offsets,
                                scale=scale, mask_type=MaskType.PADDING_CAUSAL, qkv_layout="BTNH",
                                sliding_window_length=window)
    out = jnp.where(real, out, 0)
    return jnp.where(ok_B[:, None, None, None], out, jnp.nan)  # a row cuDNN cannot express: loud, not wrong
