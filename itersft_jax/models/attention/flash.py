"""Flash attention behind one function, with one implementation per backend, and the rule that picks one.

``flash_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, *, scale, window, softcap, implementation)`` is causal
self-attention over one call's tokens (training, evaluation, generation prefill) that never materializes the
``[T, S]`` scores. Its semantics, identical for every implementation:

* query ``t`` attends key ``s`` iff ``s <= t``, ``segment_ids[s] == segment_ids[t] != 0`` and (``window`` is
  ``None`` or ``t - s < window``): packed rows hold several samples (ids 1, 2, ...; 0 is padding), and no token
  ever attends across samples;
* logits are ``scale * q.k``, soft-capped ``c * tanh(x / c)`` before masking when ``softcap`` is set (Gemma);
* ``N`` query heads share ``K`` kv heads: query head ``n`` uses kv head ``n // (N // K)``;
* softmax in fp32, output in ``q``'s dtype; padding queries (segment 0) give zeros; differentiable in q, k, v.

The implementations, and why each exists:

* ``"cudnn"`` — NVIDIA's fused flash attention (``jax._src.cudnn``), the fastest on Hopper. It has no segment
  ids; packed rows are expressed as its *ragged* layout (per row, up to ``max_segments`` runs given by offset
  and length, ``cudnn_segment_layout``). ``max_segments`` is static (it sizes cuDNN's buffers), so the caller
  must state it; a row that does not fit (more runs, or one id in two runs) comes back as NaN, never as a
  silently wrong number. No soft-cap; bf16/fp16 only; the ragged layout needs Hopper or newer.
* ``"pallas_gpu"`` — our Pallas (Triton) flash kernel: segment ids, GQA (kv heads indexed, never repeated),
  sliding window, soft-cap; a flash-attention-2 backward in two kernels. Key blocks outside the window or
  before a query block's earliest sample are never visited (``_segment_block_bounds``), so a packed row costs
  the attention of its samples, not of the whole causal triangle.
* ``"splash"`` — TPU splash attention with ``SegmentIds``, causal/local masks, GQA through its MQA kernel
  vmapped over kv heads, and its own soft-cap.
* ``"xla_chunked"`` — blockwise online-softmax attention in plain JAX with a flash backward (recompute per
  block, ``rowsum(dO * O)``): every feature on every backend with memory ``O(T * block)``, skipping blocks
  like the Pallas kernel. The fallback where no vendor kernel covers a case.
* ``"xla"`` is not run here: it names the materializing path of ``attention/xla.py``, which "auto" keeps on CPU
  for rows shorter than ``CPU_CHUNKED_FROM``: it compiles ~8x faster than xla_chunked, and the trainer's short,
  length-bucketed runs pay compile time more than run time (``benchmarks/results/attention_kernels.md``).

Verified on an H100 (jax 0.11.2): cudnn and pallas_gpu against a materialized reference, outputs and gradients,
packed rows, GQA, windows, soft-caps, exact isolation of samples (``benchmarks/attention_kernels.py --check``).
Splash ran only in the Pallas interpreter on CPU, never on a TPU.

``resolve_attention_implementation`` turns a requested name (ours or Hugging Face's ``attn_implementation``
names) into one of these for a platform and case, or raises a ``ValueError`` that names the alternatives.
"""


from __future__ import annotations

import jax
import jax.numpy as jnp

from itersft_jax.models.attention.cudnn import cudnn_attention
from itersft_jax.models.attention.pallas_gpu import pallas_gpu_attention
from itersft_jax.models.attention.select import KERNELS
from itersft_jax.models.attention.splash import splash_attention
from itersft_jax.models.attention.xla_chunked import chunked_attention


def flash_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, segment_ids_BT: jax.Array, *,
                    scale: float, window: int | None = None, softcap: float | None = None, implementation: str,
                    interpret: bool = False, max_segments: int | None = None) -> jax.Array:
    """Causal self-attention with segment ids, sliding window, soft-cap and GQA; ``[B, T, N, H]`` in q's dtype.

    See the module docstring for the exact semantics. ``implementation`` is one of ``KERNELS`` (resolve names
    with ``resolve_attention_implementation``); ``interpret`` runs the Pallas kernels (pallas_gpu, splash) in
    the Pallas interpreter, on any backend (tests); ``max_segments`` is the static bound on segments per row
    that ``"cudnn"`` requires (the other kernels compare ids and ignore it): each slot costs ``B * N * T`` fp32
    of softmax statistics saved for the backward, per layer, so state the real bound, not ``T``.
    """
    if implementation not in KERNELS:
        raise ValueError(f"implementation={implementation!r} is not a flash kernel; one of {', '.join(KERNELS)} "
                         "('xla' is the materializing path of models/attention/xla.py)")
    if q_BTNH.ndim != 4 or k_BTKH.ndim != 4 or k_BTKH.shape != v_BTKH.shape:
        raise ValueError(f"q, k, v must be [B, T, N, H], [B, T, K, H], [B, T, K, H]; got {q_BTNH.shape}, "
                         f"{k_BTKH.shape}, {v_BTKH.shape}")
    b, t, n, h = q_BTNH.shape
    if k_BTKH.shape[:2] != (b, t) or k_BTKH.shape[3] != h or n % k_BTKH.shape[2]:
        raise ValueError(f"k/v {k_BTKH.shape} must share q's batch, length and head_dim, with N={n} a multiple "
                         "of their K heads")
    if segment_ids_BT.shape != (b, t):
        raise ValueError(f"segment_ids_BT must be [B, T] = {(b, t)}, got {segment_ids_BT.shape}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap!r}")
    k_BTKH, v_BTKH = k_BTKH.astype(q_BTNH.dtype), v_BTKH.astype(q_BTNH.dtype)
    segment_ids_BT = segment_ids_BT.astype(jnp.int32)
    if implementation == "xla_chunked":
        out = chunked_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, scale=float(scale), window=window,
                                 softcap=softcap)
    elif implementation == "pallas_gpu":
        out = pallas_gpu_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, scale=float(scale), window=window,
                                    softcap=softcap, interpret=interpret)
    elif implementation == "splash":
        out = splash_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, scale=float(scale), window=window,
                                softcap=softcap, interpret=interpret)
    else:
        if softcap is not None:
            raise ValueError("implementation='cudnn' has no soft-cap; resolve_attention_implementation picks another")
        if max_segments is None or max_segments < 1:
            raise ValueError("implementation='cudnn' needs max_segments (a static bound on segments per row)")
        out = cudnn_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, scale=float(scale), window=window,
                               max_segments=max_segments)
    return jnp.where((segment_ids_BT != 0)[:, :, None, None], out, 0).astype(q_BTNH.dtype)
