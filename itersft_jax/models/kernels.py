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
* ``"xla"`` is not run here: it names the materializing path of ``models/common.py``, which "auto" keeps on CPU
  for rows shorter than ``CPU_CHUNKED_FROM``: it compiles ~8x faster than xla_chunked, and the trainer's short,
  length-bucketed runs pay compile time more than run time (``benchmarks/results_attention_kernels.md``).

Verified on an H100 (jax 0.11.2): cudnn and pallas_gpu against a materialized reference, outputs and gradients,
packed rows, GQA, windows, soft-caps, exact isolation of samples (``benchmarks/attention_kernels.py --check``).
Splash ran only in the Pallas interpreter on CPU, never on a TPU.

``resolve_attention_implementation`` turns a requested name (ours or Hugging Face's ``attn_implementation``
names) into one of these for a platform and case, or raises a ``ValueError`` that names the alternatives.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KERNELS = ("cudnn", "pallas_gpu", "splash", "xla_chunked")  # what flash_attention runs
IMPLEMENTATIONS = ("xla", *KERNELS)  # what resolve_attention_implementation returns
HF_ALIASES = {"eager": "xla", "sdpa": "auto", "flash_attention_2": "flash", "flash_attention_3": "flash"}
ATTENTION_IMPLEMENTATIONS = ("auto", *IMPLEMENTATIONS, *HF_ALIASES)  # every accepted attn_implementation

CPU_CHUNKED_FROM = 4096  # tokens per row from which "auto" on CPU takes xla_chunked (see resolve_...)
_MASK = -0.7 * float(np.finfo(np.float32).max)  # finite: a row masked in one block never turns into NaN
_GPU_PLATFORMS = ("gpu", "cuda")


# ----------------------------------------------------------------------------- choosing an implementation


def _unsupported(name: str, *, platform: str, dtype, head_dim: int, softcap, max_segments) -> str | None:
    """Why ``name`` cannot run this case, or ``None`` if it can."""
    if name in ("xla", "xla_chunked"):
        return None
    if name == "cudnn":
        if platform not in _GPU_PLATFORMS:
            return "cuDNN runs on NVIDIA GPUs only"
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return f"cuDNN needs bfloat16 or float16 compute, not {jnp.dtype(dtype).name}"
        if head_dim > 256 or head_dim % 8:
            return f"cuDNN needs head_dim <= 256 and a multiple of 8, not {head_dim}"
        if softcap is not None:
            return "cuDNN has no logit soft-cap"
        if max_segments is None:
            return "cuDNN needs a static bound on the segments per row (max_segments) to honour packed rows"
        capability = _gpu_compute_capability()
        if capability is not None and capability < (9, 0):
            return f"cuDNN's packed (ragged) layout needs Hopper (sm90) or newer, not sm{capability[0]}{capability[1]}"
        return None
    if name == "pallas_gpu":
        if platform not in _GPU_PLATFORMS:
            return "the Pallas Triton kernel runs on NVIDIA GPUs only"
        if head_dim > 256:
            return f"the Pallas GPU kernel supports head_dim <= 256, not {head_dim}"
        return None
    if name == "splash":
        return None if platform == "tpu" else "splash attention runs on TPUs only"
    raise AssertionError(name)


def _gpu_compute_capability() -> tuple[int, int] | None:
    """The first local NVIDIA GPU's compute capability, or ``None`` without one (resolving for a GPU elsewhere)."""
    try:
        major, minor = jax.devices("gpu")[0].compute_capability.split(".")[:2]
        return int(major), int(minor)
    except (RuntimeError, AttributeError, ValueError, IndexError):
        return None


def resolve_attention_implementation(requested: str | None, *, platform: str, dtype: Any, head_dim: int,
                                     window: int | None = None, softcap: float | None = None,
                                     max_segments: int | None = None, seq_len: int | None = None) -> str:
    """The attention implementation to use: one of ``IMPLEMENTATIONS``.

    ``requested`` is ``None``/``"auto"`` (the best for the case), one of ``IMPLEMENTATIONS``, or a Hugging Face
    ``attn_implementation`` name: ``"eager"`` -> ``"xla"``, ``"sdpa"`` -> ``"auto"``, ``"flash_attention_2"``/
    ``"flash_attention_3"`` -> the best *flash* kernel (never the materializing ``"xla"``). ``platform`` is
    ``jax.default_backend()`` (``"cpu"``, ``"gpu"``, ``"tpu"``); ``dtype`` the compute dtype; ``max_segments``
    the caller's static bound on segments per row (``None``: unknown, which rules cuDNN out — see the module
    docstring). ``window`` is accepted for symmetry: every implementation supports sliding windows.

    "auto": GPU -> cudnn where it applies, else pallas_gpu, else xla_chunked; TPU -> splash; CPU -> "xla" below
    ``CPU_CHUNKED_FROM`` tokens per row (``seq_len``; unknown counts as short), xla_chunked from there on.
    Measured on the 2-core CPU (``benchmarks/attention_kernels.py``): xla_chunked runs a forward+backward in
    0.2-0.8x the materializing path's time at every length from 256 to 8192 and in O(T) memory, but compiles
    about 8x slower (4-5 s against 0.5 s per attention instance) — for the trainer's short, bucketed runs the
    compile dominates; from 4096 tokens the ``[T, T]`` fp32 scores (64 MiB per head and row) dominate instead.
    An explicit name that cannot run the case raises ``ValueError`` naming ``attn_implementation``.
    """
    del window
    platform = "gpu" if platform == "cuda" else platform
    name = "auto" if requested is None else requested
    if not isinstance(name, str) or name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={requested!r} is not one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    name = HF_ALIASES.get(name, name)
    case = dict(platform=platform, dtype=dtype, head_dim=head_dim, softcap=softcap, max_segments=max_segments)
    if name in ("auto", "flash"):
        order = {"gpu": ("cudnn", "pallas_gpu"), "tpu": ("splash",)}.get(platform, ())
        long_row = seq_len is not None and seq_len >= CPU_CHUNKED_FROM
        order += ("xla_chunked",) if name == "flash" or platform != "cpu" or long_row else ("xla",)
        return next(n for n in order if _unsupported(n, **case) is None)
    reason = _unsupported(name, **case)
    if reason is not None:
        can = [n for n in IMPLEMENTATIONS if _unsupported(n, **case) is None]
        described = (f"platform={platform}, dtype={jnp.dtype(dtype).name}, head_dim={head_dim}, "
                     f"softcap={softcap}, max_segments={max_segments}")
        raise ValueError(f"attn_implementation={requested!r} cannot run this case ({described}): {reason}. "
                         f"Use 'auto' or one of: {', '.join(can)}")
    return name


# ----------------------------------------------------------------------------- the entry point


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
                         "('xla' is the materializing path in models/common.py)")
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
        out = _chunked_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, scale=float(scale), window=window,
                                 softcap=softcap)
    elif implementation == "pallas_gpu":
        out = _pallas_gpu_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, scale=float(scale), window=window,
                                    softcap=softcap, interpret=interpret)
    elif implementation == "splash":
        out = _splash_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, scale=float(scale), window=window,
                                softcap=softcap, interpret=interpret)
    else:
        if softcap is not None:
            raise ValueError("implementation='cudnn' has no soft-cap; resolve_attention_implementation picks another")
        if max_segments is None or max_segments < 1:
            raise ValueError("implementation='cudnn' needs max_segments (a static bound on segments per row)")
        out = _cudnn_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, scale=float(scale), window=window,
                               max_segments=max_segments)
    return jnp.where((segment_ids_BT != 0)[:, :, None, None], out, 0).astype(q_BTNH.dtype)


def _block_size(t: int, cap: int, floor: int = 16) -> int:
    """A power-of-two block: ``cap`` for long rows, a quarter of the row (>= ``floor``) for short ones."""
    return max(floor, min(cap, _next_pow2(t) // 4))


def _next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(x, 1))))


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)  # zeros: segment 0 for ids, so padded tokens are padding


def _kv_block_range(i, first_key_block, *, block_q: int, block_k: int, window: int | None, div):
    """Key blocks ``[lo, hi)`` that queries of block ``i`` may attend: causal, the window, and not before the
    first key of the block's earliest sample (``first_key_block``, see ``_segment_block_bounds``)."""
    hi = div((i + 1) * block_q + block_k - 1, block_k)
    lo = first_key_block
    if window is not None:
        lo = jnp.maximum(lo, div(jnp.maximum(i * block_q - (window - 1), 0), block_k))
    return lo, hi


def _q_block_range(j, end_query_block, *, block_q: int, block_k: int, window: int | None, div):
    """Query blocks ``[lo, hi)`` that may attend key block ``j``: causal, the window, and not after the last
    query of the block's latest sample (``end_query_block`` is exclusive)."""
    lo = div(j * block_k, block_q)
    hi = end_query_block
    if window is not None:
        hi = jnp.minimum(hi, div((j + 1) * block_k + window - 2, block_q) + 1)
    return lo, hi


def _segment_block_bounds(seg_BT, block_q: int, block_k: int):
    """Per-block loop bounds from the samples: ``first_key_block_BI`` (per query block, the key block holding the
    first token of its earliest sample) and ``end_query_block_BJ`` (per key block, one past the query block
    holding the last token of its latest sample). Packed rows then cost the attention of their samples, not of
    the whole causal triangle.

    A sample is a run of equal ids. Where a row reuses an id in two runs (which the contract lets attend each
    other) the row gets no skipping: bounds 0 and the last block. Padding runs bound padding queries to their
    own run; their outputs are zeroed anyway.
    """
    b, t = seg_BT.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    prev = jnp.pad(seg_BT, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
    nxt = jnp.pad(seg_BT, ((0, 0), (0, 1)), constant_values=-1)[:, 1:]
    first_BT = jax.lax.cummax(jnp.where(seg_BT != prev, pos, 0), axis=1)
    last_BT = jax.lax.cummin(jnp.where(seg_BT != nxt, pos, t - 1), axis=1, reverse=True)
    run_ids = jnp.sort(jnp.where((seg_BT != prev) & (seg_BT != 0), seg_BT, jnp.iinfo(jnp.int32).min), axis=1)
    reused_B = jnp.any((run_ids[:, 1:] == run_ids[:, :-1]) & (run_ids[:, 1:] != jnp.iinfo(jnp.int32).min), axis=1)
    first_BT = jnp.where(reused_B[:, None], 0, first_BT)
    last_BT = jnp.where(reused_B[:, None], t - 1, last_BT)
    first_key_block_BI = first_BT.reshape(b, t // block_q, block_q).min(-1) // block_k
    end_query_block_BJ = last_BT.reshape(b, t // block_k, block_k).max(-1) // block_q + 1
    return first_key_block_BI, end_query_block_BJ


def _masked_logits(s, q_pos, k_pos, seg_q, seg_k, *, window, softcap):
    """Soft-cap then mask fp32 ``scale * q.k`` logits ``[..., Q, ..., S]`` laid out as ``q_pos``/``k_pos`` say.

    Returns ``(logits, capped)``; ``capped`` feeds the soft-cap derivative ``1 - (capped / c)^2``. Padding
    queries attend padding keys (ids 0 == 0), so no row is ever empty; their outputs are zeroed outside.
    """
    capped = s if softcap is None else softcap * jnp.tanh(s / softcap)
    allowed = (k_pos <= q_pos) & (seg_q == seg_k)
    if window is not None:
        allowed &= q_pos - k_pos < window
    return jnp.where(allowed, capped, _MASK), capped


def _softcap_grad(ds, capped, softcap):
    return ds if softcap is None else ds * (1.0 - jnp.square(capped / softcap))


# ----------------------------------------------------------------------------- xla_chunked


@dataclasses.dataclass(frozen=True)
class _Cfg:
    scale: float
    window: int | None
    softcap: float | None
    block: int


def _chunked_attention(q_BTNH, k_BTKH, v_BTKH, seg_BT, *, scale, window, softcap, block_cap: int = 512):
    b, t, n, h = q_BTNH.shape
    kv = k_BTKH.shape[2]
    block = min(_block_size(t, block_cap), _next_pow2(t))
    tp = -(-t // block) * block
    q_BKTGH = _pad_axis(q_BTNH, 1, tp).reshape(b, tp, kv, n // kv, h).transpose(0, 2, 1, 3, 4)
    k_BKTH = _pad_axis(k_BTKH, 1, tp).transpose(0, 2, 1, 3)
    v_BKTH = _pad_axis(v_BTKH, 1, tp).transpose(0, 2, 1, 3)
    seg_BT = _pad_axis(seg_BT, 1, tp)
    bounds = _segment_block_bounds(seg_BT, block, block)
    out_BKTGH = _chunked_core(q_BKTGH, k_BKTH, v_BKTH, seg_BT, bounds, _Cfg(scale, window, softcap, block))
    return out_BKTGH.transpose(0, 2, 1, 3, 4).reshape(b, tp, n, h)[:, :t]


def _chunk_logits(q_BKQGH, k_BKSH, seg_q_BQ, seg_k_BS, q0, k0, cfg: _Cfg):
    """Masked logits ``[B, K, Q, G, S]`` of one (query block, key block) pair, and the soft-capped ones."""
    s = jnp.einsum("bkqgh,bksh->bkqgs", q_BKQGH, k_BKSH, preferred_element_type=jnp.float32) * cfg.scale
    q_pos = (q0 + jnp.arange(q_BKQGH.shape[2]))[:, None, None]
    k_pos = k0 + jnp.arange(k_BKSH.shape[2])
    return _masked_logits(s, q_pos, k_pos, seg_q_BQ[:, None, :, None, None], seg_k_BS[:, None, None, None, :],
                          window=cfg.window, softcap=cfg.softcap)


def _slice_t(x, start, size, axis=2):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _chunked_core(q_BKTGH, k_BKTH, v_BKTH, seg_BT, bounds, cfg: _Cfg):
    return _chunked_fwd(q_BKTGH, k_BKTH, v_BKTH, seg_BT, bounds, cfg)[0]


def _chunked_fwd(q_BKTGH, k_BKTH, v_BKTH, seg_BT, bounds, cfg: _Cfg):
    """Online softmax: for each query block, the key blocks it may attend, one at a time."""
    b, kv, tp, g, h = q_BKTGH.shape
    bs = cfg.block

    def query_block(i, carry):
        out_BKTGH, lse_BKTG = carry
        q_i = _slice_t(q_BKTGH, i * bs, bs)
        seg_q = _slice_t(seg_BT, i * bs, bs, axis=1)

        def key_block(j, state):
            m, denom, acc = state
            logits, _ = _chunk_logits(q_i, _slice_t(k_BKTH, j * bs, bs), seg_q, _slice_t(seg_BT, j * bs, bs, 1),
                                      i * bs, j * bs, cfg)
            m_new = jnp.maximum(m, logits.max(-1))
            p = jnp.exp(logits - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum("bkqgs,bksh->bkqgh", p.astype(v_BKTH.dtype), _slice_t(v_BKTH, j * bs, bs),
                            preferred_element_type=jnp.float32)
            return m_new, alpha * denom + p.sum(-1), alpha[..., None] * acc + pv

        # one loop serves the whole batch: the bound of the row that needs the most key blocks
        lo, hi = _kv_block_range(i, bounds[0][:, i].min(), block_q=bs, block_k=bs, window=cfg.window,
                                 div=jnp.floor_divide)
        init = (jnp.full((b, kv, bs, g), _MASK, jnp.float32), jnp.zeros((b, kv, bs, g), jnp.float32),
                jnp.zeros((b, kv, bs, g, h), jnp.float32))
        m, denom, acc = jax.lax.fori_loop(lo, hi, key_block, init)
        out_i = (acc / denom[..., None]).astype(q_BKTGH.dtype)
        out_BKTGH = jax.lax.dynamic_update_slice_in_dim(out_BKTGH, out_i, i * bs, 2)
        return out_BKTGH, jax.lax.dynamic_update_slice_in_dim(lse_BKTG, m + jnp.log(denom), i * bs, 2)

    init = (jnp.zeros_like(q_BKTGH), jnp.zeros((b, kv, tp, g), jnp.float32))
    out_BKTGH, lse_BKTG = jax.lax.fori_loop(0, tp // bs, query_block, init)
    return out_BKTGH, (q_BKTGH, k_BKTH, v_BKTH, seg_BT, bounds, out_BKTGH, lse_BKTG)


def _chunked_bwd(cfg: _Cfg, residuals, d_out_BKTGH):
    """Flash-attention-2 backward in one pass: for each key block, the query blocks that attend it; dq is
    accumulated into a full fp32 buffer, dk/dv per key block. ``rowsum(dP * P) = rowsum(dO * O)``."""
    q_BKTGH, k_BKTH, v_BKTH, seg_BT, bounds, out_BKTGH, lse_BKTG = residuals
    bs, tp = cfg.block, q_BKTGH.shape[2]
    delta_BKTG = jnp.sum(d_out_BKTGH.astype(jnp.float32) * out_BKTGH.astype(jnp.float32), axis=-1)
    d_out_BKTGH = d_out_BKTGH.astype(q_BKTGH.dtype)

    def key_block(j, carry):
        dq_BKTGH, dk_BKTH, dv_BKTH = carry
        k_j, v_j = _slice_t(k_BKTH, j * bs, bs), _slice_t(v_BKTH, j * bs, bs)
        seg_k = _slice_t(seg_BT, j * bs, bs, axis=1)

        def query_block(i, state):
            dq, dk_j, dv_j = state
            q_i, do_i = _slice_t(q_BKTGH, i * bs, bs), _slice_t(d_out_BKTGH, i * bs, bs)
            logits, capped = _chunk_logits(q_i, k_j, _slice_t(seg_BT, i * bs, bs, 1), seg_k, i * bs, j * bs, cfg)
            p = jnp.exp(logits - _slice_t(lse_BKTG, i * bs, bs)[..., None])
            dv_j = dv_j + jnp.einsum("bkqgs,bkqgh->bksh", p.astype(do_i.dtype), do_i,
                                     preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkqgh,bksh->bkqgs", do_i, v_j, preferred_element_type=jnp.float32)
            ds = _softcap_grad(p * (dp - _slice_t(delta_BKTG, i * bs, bs)[..., None]), capped, cfg.softcap)
            ds = (ds * cfg.scale).astype(q_i.dtype)
            dk_j = dk_j + jnp.einsum("bkqgs,bkqgh->bksh", ds, q_i, preferred_element_type=jnp.float32)
            dq_i = _slice_t(dq, i * bs, bs) + jnp.einsum("bkqgs,bksh->bkqgh", ds, k_j,
                                                         preferred_element_type=jnp.float32)
            return jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * bs, 2), dk_j, dv_j

        lo, hi = _q_block_range(j, bounds[1][:, j].max(), block_q=bs, block_k=bs, window=cfg.window,
                                div=jnp.floor_divide)
        zeros = jnp.zeros(k_j.shape, jnp.float32)
        dq_BKTGH, dk_j, dv_j = jax.lax.fori_loop(lo, hi, query_block, (dq_BKTGH, zeros, zeros))
        dk_BKTH = jax.lax.dynamic_update_slice_in_dim(dk_BKTH, dk_j.astype(dk_BKTH.dtype), j * bs, 2)
        dv_BKTH = jax.lax.dynamic_update_slice_in_dim(dv_BKTH, dv_j.astype(dv_BKTH.dtype), j * bs, 2)
        return dq_BKTGH, dk_BKTH, dv_BKTH

    init = (jnp.zeros(q_BKTGH.shape, jnp.float32), jnp.zeros_like(k_BKTH), jnp.zeros_like(v_BKTH))
    dq_BKTGH, dk_BKTH, dv_BKTH = jax.lax.fori_loop(0, tp // bs, key_block, init)
    return dq_BKTGH.astype(q_BKTGH.dtype), dk_BKTH, dv_BKTH, None, None


_chunked_core.defvjp(_chunked_fwd, _chunked_bwd)


# ----------------------------------------------------------------------------- pallas_gpu (Triton)


@dataclasses.dataclass(frozen=True)
class _GpuCfg:
    scale: float
    window: int | None
    softcap: float | None
    groups: int  # query heads per kv head
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    num_warps: int
    num_stages: int
    interpret: bool


def _gpu_cfg(t: int, head_dim: int, **kw) -> _GpuCfg:
    """Block sizes for a padded head dim: 128x64 forward / 64x64 backward up to 128 lanes, smaller above."""
    small = head_dim > 128
    return _GpuCfg(block_q=_block_size(t, 64 if small else 128), block_k=_block_size(t, 32 if small else 64),
                   block_q_bwd=_block_size(t, 32 if small else 64), block_k_bwd=_block_size(t, 32 if small else 64),
                   num_warps=4 if head_dim <= 64 else 8, num_stages=2, **kw)


def _pallas_gpu_attention(q_BTNH, k_BTKH, v_BTKH, seg_BT, *, scale, window, softcap, interpret):
    b, t, n, h = q_BTNH.shape
    hp = max(16, _next_pow2(h))  # Triton tiles are powers of two; zero lanes change no dot product
    cfg = _gpu_cfg(t, hp, scale=scale, window=window, softcap=softcap, groups=n // k_BTKH.shape[2],
                   interpret=interpret)
    blk = max(cfg.block_q, cfg.block_k, cfg.block_q_bwd, cfg.block_k_bwd)
    tp = -(-t // blk) * blk
    q, k, v = (_pad_axis(_pad_axis(x, 3, hp), 1, tp) for x in (q_BTNH, k_BTKH, v_BTKH))
    out = _pallas_core(q, k, v, _pad_axis(seg_BT, 1, tp), cfg)
    return out[:, :t, :, :h]


def _pallas_call(kernel, cfg: _GpuCfg, *, grid, in_specs, out_specs, out_shape, name):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
                          interpret=cfg.interpret, name=name)


def _tile_logits(q, k, q_pos, k_pos, seg_q, seg_k, cfg: _GpuCfg):
    from jax.experimental.pallas import triton as plgpu

    s = plgpu.dot(q, k, trans_b=True) * cfg.scale  # fp32 accumulation
    return _masked_logits(s, q_pos[:, None], k_pos[None, :], seg_q[:, None], seg_k[None, :], window=cfg.window,
                          softcap=cfg.softcap)


def _fwd_kernel(q_ref, k_ref, v_ref, seg_ref, lo_ref, o_ref, lse_ref, *, cfg: _GpuCfg):
    """One query block of one head against the key blocks it may attend (grid: q block, batch, head)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    i, bq, bk = pl.program_id(0), cfg.block_q, cfg.block_k
    q = q_ref[...]
    q_pos = i * bq + jnp.arange(bq)
    seg_q = seg_ref[pl.ds(i * bq, bq)]

    def body(j, carry):
        acc, m, denom = carry
        k = k_ref[pl.ds(j * bk, bk), :]
        logits, _ = _tile_logits(q, k, q_pos, j * bk + jnp.arange(bk), seg_q, seg_ref[pl.ds(j * bk, bk)], cfg)
        m_new = jnp.maximum(m, logits.max(axis=1))
        p = jnp.exp(logits - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        v = v_ref[pl.ds(j * bk, bk), :]
        return alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v), m_new, alpha * denom + p.sum(axis=1)

    lo, hi = _kv_block_range(i, lo_ref[()], block_q=bq, block_k=bk, window=cfg.window, div=jax.lax.div)
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), _MASK, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, denom = jax.lax.fori_loop(lo, hi, body, init)
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(denom)


def _dkv_kernel(q_ref, k_ref, v_ref, seg_ref, hi_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: _GpuCfg):
    """dK, dV of one key block of one kv head: its G query heads' query blocks that attend it (grid: key block,
    batch, kv head). The G heads are a static loop, so GQA needs neither repeated keys nor a reduction."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    j, bq, bk = pl.program_id(0), cfg.block_q_bwd, cfg.block_k_bwd
    k, v = k_ref[...], v_ref[...]
    k_pos = j * bk + jnp.arange(bk)
    seg_k = seg_ref[pl.ds(j * bk, bk)]
    lo, hi = _q_block_range(j, hi_ref[()], block_q=bq, block_k=bk, window=cfg.window, div=jax.lax.div)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for g in range(cfg.groups):
        def body(i, carry, g=g):
            dk, dv = carry
            rows = pl.ds(i * bq, bq)
            q, do = q_ref[rows, g, :], do_ref[rows, g, :]
            logits, capped = _tile_logits(q, k, i * bq + jnp.arange(bq), k_pos, seg_ref[rows], seg_k, cfg)
            p = jnp.exp(logits - lse_ref[g, rows][:, None])
            dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
            dp = plgpu.dot(do, v, trans_b=True)
            ds = _softcap_grad(p * (dp - delta_ref[g, rows][:, None]), capped, cfg.softcap) * cfg.scale
            return dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True), dv

        dk, dv = jax.lax.fori_loop(lo, hi, body, (dk, dv))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, seg_ref, lo_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: _GpuCfg):
    """dQ of one query block of one head (grid: q block, batch, head), key blocks as in the forward."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    i, bq, bk = pl.program_id(0), cfg.block_q_bwd, cfg.block_k_bwd
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_pos = i * bq + jnp.arange(bq)
    seg_q = seg_ref[pl.ds(i * bq, bq)]

    def body(j, dq):
        k, v = k_ref[pl.ds(j * bk, bk), :], v_ref[pl.ds(j * bk, bk), :]
        logits, capped = _tile_logits(q, k, q_pos, j * bk + jnp.arange(bk), seg_q, seg_ref[pl.ds(j * bk, bk)], cfg)
        p = jnp.exp(logits - lse[:, None])
        dp = plgpu.dot(do, v, trans_b=True)
        ds = _softcap_grad(p * (dp - delta[:, None]), capped, cfg.softcap) * cfg.scale
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    lo, hi = _kv_block_range(i, lo_ref[()], block_q=bq, block_k=bk, window=cfg.window, div=jax.lax.div)
    dq_ref[...] = jax.lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32)).astype(dq_ref.dtype)


def _specs(cfg: _GpuCfg, tp: int, hp: int, block_q: int):
    """BlockSpecs over ``[B, T, heads, H]`` arrays for a (q block, batch, query head) grid."""
    from jax.experimental import pallas as pl

    g = cfg.groups
    q_block = pl.BlockSpec((None, block_q, None, hp), lambda i, b, n: (b, i, n, 0))
    kv_full = pl.BlockSpec((None, tp, None, hp), lambda i, b, n: (b, 0, jax.lax.div(n, g), 0))
    seg_full = pl.BlockSpec((None, tp), lambda i, b, n: (b, 0))
    row_stat = pl.BlockSpec((None, None, block_q), lambda i, b, n: (b, n, i))
    block_bound = pl.BlockSpec((None, None), lambda i, b, n: (b, i))  # one scalar per (row, block)
    return q_block, kv_full, seg_full, row_stat, block_bound


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _pallas_core(q, k, v, seg, cfg: _GpuCfg):
    return _pallas_fwd(q, k, v, seg, cfg)[0]


def _pallas_fwd(q, k, v, seg, cfg: _GpuCfg):
    b, tp, n, hp = q.shape
    q_block, kv_full, seg_full, row_stat, block_bound = _specs(cfg, tp, hp, cfg.block_q)
    first_key_block, _ = _segment_block_bounds(seg, cfg.block_q, cfg.block_k)
    out, lse_BNT = _pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg), cfg, grid=(tp // cfg.block_q, b, n),
        in_specs=[q_block, kv_full, kv_full, seg_full, block_bound], out_specs=[q_block, row_stat],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, tp), jnp.float32)],
        name="itersft_flash_fwd")(q, k, v, seg, first_key_block)
    return out, (q, k, v, seg, out, lse_BNT)


def _pallas_bwd(cfg: _GpuCfg, residuals, d_out):
    from jax.experimental import pallas as pl

    q, k, v, seg, out, lse_BNT = residuals
    b, tp, n, hp = q.shape
    kv, g, bq, bk = k.shape[2], cfg.groups, cfg.block_q_bwd, cfg.block_k_bwd
    d_out = d_out.astype(q.dtype)
    delta_BNT = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    q_all = pl.BlockSpec((None, tp, g, hp), lambda j, b, h: (b, 0, h, 0))  # the G query heads of kv head h
    kv_block = pl.BlockSpec((None, bk, None, hp), lambda j, b, h: (b, j, h, 0))
    stat_all = pl.BlockSpec((None, g, tp), lambda j, b, h: (b, h, 0))
    seg_full = pl.BlockSpec((None, tp), lambda j, b, h: (b, 0))
    key_bound = pl.BlockSpec((None, None), lambda j, b, h: (b, j))
    first_key_block, end_query_block = _segment_block_bounds(seg, bq, bk)
    dk, dv = _pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg), cfg, grid=(tp // bk, b, kv),
        in_specs=[q_all, kv_block, kv_block, seg_full, key_bound, q_all, stat_all, stat_all],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="itersft_flash_dkv")(q, k, v, seg, end_query_block, d_out, lse_BNT, delta_BNT)
    q_block, kv_full, seg_full, row_stat, block_bound = _specs(cfg, tp, hp, bq)
    dq = _pallas_call(
        functools.partial(_dq_kernel, cfg=cfg), cfg, grid=(tp // bq, b, n),
        in_specs=[q_block, kv_full, kv_full, seg_full, block_bound, q_block, row_stat, row_stat], out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), name="itersft_flash_dq")(
        q, k, v, seg, first_key_block, d_out, lse_BNT, delta_BNT)
    return dq, dk, dv, None


_pallas_core.defvjp(_pallas_fwd, _pallas_bwd)


# ----------------------------------------------------------------------------- splash (TPU)


@functools.lru_cache(maxsize=64)
def _splash_kernel(t: int, groups: int, window: int | None, softcap: float | None, block: int, interpret: bool):
    """The MQA splash kernel for ``groups`` query heads sharing one kv head (built once per static case)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if window is None:
        head_mask = sa.CausalMask((t, t))
    else:  # keys t - (window - 1) .. t
        head_mask = sa.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
    blocks = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                           block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sa.make_splash_mqa_single_device(sa.MultiHeadMask([head_mask] * groups), block_sizes=blocks,
                                            attn_logits_soft_cap=softcap, interpret=interpret)


def _splash_attention(q_BTNH, k_BTKH, v_BTKH, seg_BT, *, scale, window, softcap, interpret):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, n, h = q_BTNH.shape
    kv = k_BTKH.shape[2]
    tp = -(-t // 128) * 128  # splash tiles are multiples of 128 tokens
    block = next(blk for blk in (512, 256, 128) if tp % blk == 0)
    kernel = _splash_kernel(tp, n // kv, window, softcap, block, interpret)
    # splash takes no scale: fold it into q (soft-cap then sees scale * q.k, as specified)
    q_BKGTH = (_pad_axis(q_BTNH, 1, tp) * jnp.asarray(scale, q_BTNH.dtype)).reshape(b, tp, kv, n // kv, h)
    q_BKGTH = q_BKGTH.transpose(0, 2, 3, 1, 4)
    k_BKTH = _pad_axis(k_BTKH, 1, tp).transpose(0, 2, 1, 3)
    v_BKTH = _pad_axis(v_BTKH, 1, tp).transpose(0, 2, 1, 3)
    seg_BT = _pad_axis(seg_BT, 1, tp)

    def one_row(q_KGTH, k_KTH, v_KTH, seg_T):
        ids = sa.SegmentIds(q=seg_T, kv=seg_T)
        return jax.vmap(kernel, in_axes=(0, 0, 0, None))(q_KGTH, k_KTH, v_KTH, ids)

    out_BKGTH = jax.vmap(one_row)(q_BKGTH, k_BKTH, v_BKTH, seg_BT)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, tp, n, h)[:, :t]


# ----------------------------------------------------------------------------- cudnn


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


def _cudnn_attention(q_BTNH, k_BTKH, v_BTKH, seg_BT, *, scale, window, max_segments):
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
