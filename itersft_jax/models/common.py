"""The model contract every family shares: cache, LM head, dense layers, activations, the attention entry point,
the layer loop with remat policies, NEFTune noise, and the ``CausalLMBase`` every family's ``CausalLM`` extends.

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
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from itersft_jax.models import kernels
from itersft_jax.models.lora import adapter_delta

# ----------------------------------------------------------------------------- KV cache


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "index"], meta_fields=["empty"])
@dataclasses.dataclass
class KVCache:
    """Per-layer keys and values, ``[B, K, S, H]`` each, and the number of slots already written.

    Heads before slots: attention contracts over ``H`` and ``S`` per head, so this layout feeds the batched
    matmuls directly; a ``[B, S, K, H]`` cache made XLA transpose every layer's whole cache at every decode
    step (1.45x slower generation on this CPU). ``empty`` (static) marks a cache nothing was written to yet:
    the call filling it (generation's prefill) attends only its own keys, so it can take a flash kernel.
    """

    k: list[jax.Array]
    v: list[jax.Array]
    index: jax.Array  # int32 scalar
    empty: bool = False

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


# ----------------------------------------------------------------------------- matmuls and the LM head


class LMHead(NamedTuple):
    """The output projection of a causal LM, as data: ``logits = softcap(h @ W)``.

    ``weight`` is ``[D, V]`` (an ``nnx.Linear`` kernel) or, with ``transposed``, ``[V, D]`` (a tied embedding
    table); ``softcap`` is Gemma's final-logit soft-capping ``c * tanh(logits / c)`` or ``None``; ``dtype`` is
    the compute dtype of the product. The loss (``itersft_jax.core.loss``) takes this instead of logits, so it can
    compute the head chunk by chunk and never hold ``[N, V]``.
    """

    weight: jax.Array
    transposed: bool
    softcap: float | None
    dtype: Any


def head_logits(head: LMHead, h_ND: jax.Array) -> jax.Array:
    """``softcap(h @ W)`` over the flattened leading axes, accumulated in fp32, returned in ``head.dtype``."""
    lead = h_ND.shape[:-1]
    x = h_ND.reshape(-1, h_ND.shape[-1]).astype(head.dtype)
    if jnp.dtype(head.dtype).itemsize < 4:
        logits = _matmul_f32(x, head.weight, head.transposed)
    else:
        w = head.weight.astype(head.dtype)
        logits = jnp.dot(x, w.T if head.transposed else w, preferred_element_type=jnp.float32)
    if head.softcap is not None:
        logits = head.softcap * jnp.tanh(logits / head.softcap)
    return logits.astype(head.dtype).reshape(*lead, logits.shape[-1])


def dense(layer, x_NI: jax.Array) -> jax.Array:
    """``layer(x)`` (an ``nnx.Linear`` or ``Embed.attend``) as one 2-D matmul over the flattened leading axes.

    Why: XLA:CPU lowers the weight gradient of a 3-D ``[B, T, D]`` input (two contracting axes) to
    transposed copies of the activations plus a slow generic dot; on ``[B*T, D]`` it is one fast GEMM
    (an MLP's forward+backward measured 258 ms -> 151 ms on this 2-core CPU). The reshapes are free.
    With a 16-bit compute dtype the product accumulates in fp32 (``_matmul_f32``).
    """
    lead = x_NI.shape[:-1]
    x_NI = x_NI.reshape(-1, x_NI.shape[-1])
    y = _low_precision_dense(layer, x_NI)
    y = layer(x_NI) if y is None else y
    delta = adapter_delta(layer, x_NI, y.dtype)  # LoRA (models.lora), when the layer holds adapters
    if delta is not None:
        y = y + delta
    return y.reshape(*lead, y.shape[-1])


def _low_precision_dense(layer, x_NI):
    """bf16/fp16 ``Linear``/``Embed.attend`` as a 16-bit x 16-bit -> fp32 product, cast back; ``None`` for
    fp32 layers."""
    owner = getattr(layer, "__self__", layer)  # Embed.attend is a bound method
    dtype = getattr(owner, "dtype", None)
    if dtype is None or jnp.dtype(dtype).itemsize >= 4:
        return None
    if isinstance(owner, nnx.Linear):
        y = _matmul_f32(x_NI.astype(dtype), owner.kernel[...], False)
        if owner.bias is not None:
            y = y + owner.bias[...].astype(jnp.float32)
        return y.astype(dtype)
    if isinstance(owner, nnx.Embed) and getattr(layer, "__name__", "") == "attend":
        return _matmul_f32(x_NI.astype(dtype), owner.embedding[...], True).astype(dtype)
    return None


def _matmul_f32(x_NI, w, transposed: bool):
    """16-bit ``x @ w`` (``w.T`` if ``transposed``) accumulated in fp32, decided by the backend at trace time.

    CPU: the custom-VJP product below. XLA:CPU runs a bf16 -> bf16 dot as an upcast fp32 dot (142 GFLOP/s at
    512x256x704 here) but bf16 -> fp32 on the CPU's bf16 units (619 GFLOP/s), and autodiff would meet an fp32
    cotangent and fall back to fp32 GEMMs. GPU/TPU: the plain dot with ``preferred_element_type``, which XLA
    fuses with its neighbours and lowers to its own mixed-precision GEMMs.
    """
    if cpu_tuned_matmuls():
        return _matmul_f32_acc(x_NI, w, transposed)
    w16 = w.astype(x_NI.dtype)
    return jnp.dot(x_NI, w16.T if transposed else w16, preferred_element_type=jnp.float32)


def cpu_tuned_matmuls() -> bool:
    """Whether 16-bit matmuls take the CPU-tuned custom VJP: on the CPU backend only (read at trace time)."""
    return jax.default_backend() == "cpu"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_f32_acc(x_NI, w, transposed: bool):
    """``x @ w`` with ``w`` cast to ``x``'s 16-bit dtype, accumulated in fp32; the backward products are
    16-bit x 16-bit -> fp32 too, and the weight gradient comes back in ``w``'s dtype."""
    return _matmul_f32_acc_fwd(x_NI, w, transposed)[0]


def _matmul_f32_acc_fwd(x_NI, w, transposed):
    w16 = w.astype(x_NI.dtype)
    w16_IO = w16.T if transposed else w16
    return jnp.dot(x_NI, w16_IO, preferred_element_type=jnp.float32), (x_NI, w16)


def _matmul_f32_acc_bwd(transposed, residuals, g_NO):
    x_NI, w16 = residuals
    g_NO = g_NO.astype(x_NI.dtype)
    w16_IO = w16.T if transposed else w16
    d_x_NI = jnp.dot(g_NO, w16_IO.T, preferred_element_type=jnp.float32).astype(x_NI.dtype)
    d_w_IO = jnp.dot(x_NI.T, g_NO, preferred_element_type=jnp.float32)
    return d_x_NI, (d_w_IO.T if transposed else d_w_IO)


_matmul_f32_acc.defvjp(_matmul_f32_acc_fwd, _matmul_f32_acc_bwd)


# ----------------------------------------------------------------------------- activations


def _gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


# transformers.activations.ACT2CLS names -> the same function in JAX. ``gelu`` is the exact (erf) GELU;
# ``gelu_new``/``gelu_pytorch_tanh``/``gelu_fast``/``gelu_accurate`` are the tanh approximation (Gemma's GeGLU).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": _gelu_exact,
    "gelu_python": _gelu_exact,
    "gelu_10": lambda x: jnp.clip(_gelu_exact(x), -10.0, 10.0),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "relu6": jax.nn.relu6,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "hardswish": jax.nn.hard_swish,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}


def activation(name: str, field: str = "hidden_act") -> Callable[[jax.Array], jax.Array]:
    """The activation an HF config names in ``field``; a ``ValueError`` naming the field for any other."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{field} {name!r} is not supported by the JAX backend; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ----------------------------------------------------------------------------- positions and masks


def positions_from_mask(attention_mask_BT: jax.Array) -> jax.Array:
    """Position of each token among the real tokens of its row (0 for leading padding)."""
    mask = attention_mask_BT.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def positions_from_segments(segment_ids_BT: jax.Array) -> jax.Array:
    """Position of each token within its segment: restarts at 0 wherever the segment id changes.

    For a 0/1 mask with right padding this is ``positions_from_mask`` on the real tokens (padding gets
    positions of its own, which nothing reads); for packed rows (ids 1, 1, 2, 2, 2, 0) every sample
    starts at 0, as it would alone.
    """
    seg = segment_ids_BT.astype(jnp.int32)
    t_BT = jnp.broadcast_to(jnp.arange(seg.shape[-1], dtype=jnp.int32), seg.shape)
    starts_BT = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=-1)
    first_BT = jax.lax.cummax(jnp.where(starts_BT, t_BT, 0), axis=1)
    return t_BT - first_BT


def make_attention_mask(attention_mask_BS: jax.Array, num_queries: int, query_offset=0,
                        window: int | None = None) -> jax.Array:
    """Boolean ``[B, T, S]``: causal over slots, padding keys removed, same segment, optional sliding window.

    A query's segment is the mask at its slot (``query_offset + t``); with a plain 0/1 mask this changes
    nothing for real queries.
    """
    num_keys = attention_mask_BS.shape[-1]
    allowed_TS = _slot_mask(num_queries, num_keys, query_offset, window)
    seg_BS = attention_mask_BS.astype(jnp.int32)
    if num_queries == num_keys:
        q_seg_BT = seg_BS
    else:
        q_seg_BT = jax.lax.dynamic_slice_in_dim(seg_BS, query_offset, num_queries, axis=1)
    same_BTS = (seg_BS[:, None, :] == q_seg_BT[:, :, None]) & (seg_BS != 0)[:, None, :]
    return allowed_TS[None] & same_BTS


def _slot_mask(num_queries: int, num_keys: int, query_offset, window: int | None) -> jax.Array:
    q_slot = query_offset + jnp.arange(num_queries)[:, None]
    k_slot = jnp.arange(num_keys)[None, :]
    allowed_TS = k_slot <= q_slot
    if window is not None:
        allowed_TS &= (q_slot - k_slot) < window
    return allowed_TS


# ----------------------------------------------------------------------------- attention


@functools.partial(jax.tree_util.register_dataclass, data_fields=["segment_ids_BT", "mask_BTS", "index"],
                   meta_fields=["implementation", "own_keys"])
@dataclasses.dataclass(frozen=True)
class AttentionContext:
    """What every layer's attention needs from one forward, built once (``attention_context``).

    ``segment_ids_BT``: the queries' segment ids (0 = padding), the kernels' input; ``mask_BTS``: the XLA path's
    mask (causal, same segment, real key; no window — each layer adds its own), ``None`` when a kernel serves
    the whole forward; ``index``: the cache slot this call writes at (``None`` without a cache);
    ``implementation``: the model's resolved attention implementation; ``own_keys``: the queries attend only
    this call's keys (no cache, or an empty one), so slots equal positions in the call.
    """

    segment_ids_BT: jax.Array
    mask_BTS: jax.Array | None
    index: jax.Array | None
    implementation: str
    own_keys: bool


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
    return AttentionContext(q_seg_BT, mask_BTS, index, implementation, own_keys)


def attention(q_BTNH, k_BTKH, v_BTKH, kv, ctx: AttentionContext, *, scale: float, window: int | None = None,
              softcap: float | None = None):
    """The attention entry point of every family: causal self-attention of this call's queries, through the
    layer's cache slice ``kv`` when there is one. Returns ``(out_BTNH, kv)``.

    ``scale`` multiplies ``q.k``; ``softcap`` caps those logits as ``c * tanh(x / c)`` before masking (Gemma 2);
    ``window`` keeps keys fewer than ``window`` slots behind the query. Calls that attend only their own keys
    go to the model's kernel (``kernels.flash_attention``) unless its implementation is ``"xla"``; decode steps
    over a cache take the XLA path.
    """
    if kv is not None:
        kv = update_layer_cache(kv[0], kv[1], k_BTKH, v_BTKH, ctx.index)
    if ctx.mask_BTS is None:
        out_BTNH = kernels.flash_attention(q_BTNH, k_BTKH, v_BTKH, ctx.segment_ids_BT, scale=scale, window=window,
                                              softcap=softcap, implementation=ctx.implementation)
        return out_BTNH, kv
    if ctx.own_keys:
        keys_BKSH, values_BKSH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
    else:
        keys_BKSH, values_BKSH = kv
    mask_BTS = ctx.mask_BTS
    if window is not None:
        t, s = mask_BTS.shape[1:]
        mask_BTS = mask_BTS & _slot_mask(t, s, 0 if ctx.own_keys else ctx.index, window)[None]
    out_BTNH = grouped_attention(q_BTNH, keys_BKSH.astype(q_BTNH.dtype), values_BKSH.astype(q_BTNH.dtype),
                                 mask_BTS, scale=scale, softcap=softcap)
    return out_BTNH, kv


def grouped_attention(q_BTNH, k_BKSH, v_BKSH, mask_BTS, *, scale: float, softcap: float | None = None):
    """The XLA path: grouped-query attention over heads-first keys/values; N query heads share K heads.

    Query head ``n`` uses key head ``n // (N // K)``. The queries are laid out ``[B, K, G*T, H]`` so both
    products are plain batched matmuls over ``(B, K)``; the 5-D einsum this replaces made XLA:CPU
    transpose the ``[B, K, G, T, S]`` logits (fwd+bwd of one 8x256x8x64 attention: 81 -> 61 ms).
    """
    b, t, n, h = q_BTNH.shape
    kv_heads = k_BKSH.shape[1]
    q_BKQH = q_BTNH.transpose(0, 2, 1, 3).reshape(b, kv_heads, (n // kv_heads) * t, h)
    out_BKQH = _attention_core(q_BKQH, k_BKSH, v_BKSH, mask_BTS, float(scale),
                               None if softcap is None else float(softcap))
    return out_BKQH.reshape(b, n, t, h).transpose(0, 2, 1, 3)


def _mm(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum`` accumulated in fp32, returned in ``a``'s dtype."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def _raw_logits(q_BKQH, k_BKSH, scale):
    return jnp.einsum("bkqh,bksh->bkqs", q_BKQH, k_BKSH, preferred_element_type=jnp.float32) * scale


def _attention_probs(q_BKQH, k_BKSH, mask_BTS, scale, softcap):
    b, kv_heads, q, _ = q_BKQH.shape
    t, s = mask_BTS.shape[1], k_BKSH.shape[2]
    logits_BKQS = _raw_logits(q_BKQH, k_BKSH, scale)
    if softcap is not None:
        logits_BKQS = softcap * jnp.tanh(logits_BKQS / softcap)
    logits_BKGTS = logits_BKQS.reshape(b, kv_heads, q // t, t, s)
    logits_BKGTS = jnp.where(mask_BTS[:, None, None, :, :], logits_BKGTS, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits_BKGTS, axis=-1).reshape(b, kv_heads, q, s)  # fp32


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention_core(q_BKQH, k_BKSH, v_BKSH, mask_BTS, scale: float, softcap: float | None):
    """``softmax(mask(softcap(q k^T * scale))) v`` with a hand-written backward.

    The backward uses ``rowsum(dP * P) = rowsum(dO * O)`` (as flash attention does): a reduction over
    ``H`` instead of one over the ``[Q, S]`` probabilities, which XLA:CPU ran slowly (fwd+bwd of one
    8x256x8x64 attention: 69 -> 55 ms). With a soft-cap it recomputes ``q k^T`` for ``1 - tanh^2`` rather than
    keeping a second ``[Q, S]`` fp32 residual.
    """
    return _attention_core_fwd(q_BKQH, k_BKSH, v_BKSH, mask_BTS, scale, softcap)[0]


def _attention_core_fwd(q_BKQH, k_BKSH, v_BKSH, mask_BTS, scale, softcap):
    probs_BKQS = _attention_probs(q_BKQH, k_BKSH, mask_BTS, scale, softcap)
    out_BKQH = _mm("bkqs,bksh->bkqh", probs_BKQS.astype(v_BKSH.dtype), v_BKSH)
    return out_BKQH, (q_BKQH, k_BKSH, v_BKSH, mask_BTS, probs_BKQS, out_BKQH)


def _attention_core_bwd(scale, softcap, residuals, d_out_BKQH):
    q_BKQH, k_BKSH, v_BKSH, mask_BTS, probs_BKQS, out_BKQH = residuals
    d_v_BKSH = _mm("bkqs,bkqh->bksh", probs_BKQS.astype(d_out_BKQH.dtype), d_out_BKQH)
    d_probs_BKQS = jnp.einsum("bkqh,bksh->bkqs", d_out_BKQH, v_BKSH, preferred_element_type=jnp.float32)
    delta_BKQ1 = jnp.sum(d_out_BKQH.astype(jnp.float32) * out_BKQH.astype(jnp.float32), axis=-1, keepdims=True)
    d_logits_BKQS = probs_BKQS * (d_probs_BKQS - delta_BKQ1) * scale
    if softcap is not None:  # d/dx c*tanh(x/c) = 1 - tanh^2
        d_logits_BKQS = d_logits_BKQS * (1 - jnp.square(jnp.tanh(_raw_logits(q_BKQH, k_BKSH, scale) / softcap)))
    d_logits_BKQS = d_logits_BKQS.astype(q_BKQH.dtype)
    d_q_BKQH = _mm("bkqs,bksh->bkqh", d_logits_BKQS, k_BKSH)
    d_k_BKSH = _mm("bkqs,bkqh->bksh", d_logits_BKQS, q_BKQH)
    return d_q_BKQH, d_k_BKSH.astype(k_BKSH.dtype), d_v_BKSH.astype(v_BKSH.dtype), None


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


# ----------------------------------------------------------------------------- attention implementations

def resolve_attention_implementation(requested: str | None, *, dtype, head_dim: int, window: int | None,
                                     softcap: float | None, seq_len: int | None = None) -> str:
    """The implementation one forward uses: ``"xla"`` (the materializing path above) or a kernel of
    ``kernels.py``. ``requested``: ``"auto"``/``None``, one of ``kernels.IMPLEMENTATIONS`` or a Hugging Face
    name (``eager``, ``sdpa``, ``flash_attention_2``, ...); ``kernels.resolve_attention_implementation`` decides
    (on CPU "auto" depends on ``seq_len``, the call's tokens per row) and refuses what cannot run."""
    if requested is not None and not isinstance(requested, str):
        raise TypeError(f"attn_implementation must be a str, got {type(requested).__name__}")
    return kernels.resolve_attention_implementation(requested, platform=jax.default_backend(), dtype=dtype,
                                                    head_dim=head_dim, window=window, softcap=softcap,
                                                    seq_len=seq_len)


# ----------------------------------------------------------------------------- layers, remat, NEFTune


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
        h_BTD, kv = apply(layer, h_BTD, None if cache is None else (cache.k[i], cache.v[i]), *args)
        if cache is not None:
            new_k.append(kv[0])
            new_v.append(kv[1])
    if cache is not None:
        cache = KVCache(k=new_k, v=new_v, index=cache.index + h_BTD.shape[1])
    return h_BTD, cache


def neftune_noise(neftune: tuple[float, jax.Array] | None, embeds_BTD: jax.Array,
                  segment_ids_BT: jax.Array) -> jax.Array:
    """NEFTune: ``embeds + U(-1, 1) * alpha / sqrt(L * D)``, ``L`` the length of each token's own sample (its
    segment, not the padded row), zero on padding. ``neftune``: ``None`` (no noise) or ``(alpha, key)``.

    Every family adds it to the output of its input-embedding module — where transformers' NEFTune hook on
    ``get_input_embeddings()`` adds it (for Gemma that module includes the sqrt(D) scaling).
    """
    if neftune is None:
        return embeds_BTD
    alpha, key = neftune
    seg_BT = segment_ids_BT.astype(jnp.int32)
    length_BT = jax.vmap(lambda s: jax.ops.segment_sum(jnp.ones_like(s), s, num_segments=s.shape[0] + 1)[s])(seg_BT)
    scale_BT = jnp.where(seg_BT != 0, alpha / jnp.sqrt(length_BT.astype(jnp.float32) * embeds_BTD.shape[-1]), 0.0)
    noise_BTD = jax.random.uniform(key, embeds_BTD.shape, jnp.float32, -1.0, 1.0) * scale_BT[..., None]
    return (embeds_BTD.astype(jnp.float32) + noise_BTD).astype(embeds_BTD.dtype)


# ----------------------------------------------------------------------------- the CausalLM base


class CausalLMBase(nnx.Module):
    """What every family's ``CausalLM`` shares; a family implements ``hidden_states`` and ``head_weight``.

    ``configure`` records the settings resolved once per model: compute dtype, remat policy, attention
    implementation, cache shape and final-logit soft-cap.
    """

    def configure(self, *, dtype, remat, attn_implementation: str | None, num_layers: int, num_kv_heads: int,
                  head_dim: int, window: int | None = None, softcap: float | None = None,
                  final_softcap: float | None = None) -> None:
        self.dtype = dtype
        self.remat = normalize_remat(remat)
        # Validated now (a name that cannot run raises here); resolved per forward, where "auto" on a CPU
        # depends on the call's length.
        self.attn_case = (("dtype", dtype), ("head_dim", head_dim), ("window", window), ("softcap", softcap))
        self.attn_requested = attn_implementation
        self.attn_implementation = resolve_attention_implementation(attn_implementation, **dict(self.attn_case))
        self.cache_shape = (num_layers, num_kv_heads, head_dim)
        self.final_softcap = final_softcap

    def attention_context(self, attention_mask_BS, num_queries: int, cache: KVCache | None) -> AttentionContext:
        seq_len = num_queries if cache is None or cache.empty else None  # decode steps take the XLA path anyway
        implementation = resolve_attention_implementation(self.attn_requested, seq_len=seq_len, **dict(self.attn_case))
        return attention_context(attention_mask_BS, num_queries, cache, implementation)

    def run_layers(self, layers, h_BTD, cache, *args):
        return run_layers(layers, h_BTD, cache, *args, remat=self.remat)

    def head_weight(self) -> tuple[jax.Array, bool]:
        """``(weight, transposed)`` of the output projection (see ``LMHead``)."""
        raise NotImplementedError

    def head(self) -> LMHead:
        """The output projection as data (see ``LMHead``)."""
        weight, transposed = self.head_weight()
        return LMHead(weight, transposed, self.final_softcap, self.dtype)

    def __call__(self, input_ids_BT, positions_BT, attention_mask_BS, cache: KVCache | None = None,
                 last_only: bool = False, neftune=None):
        h_BTD, cache = self.hidden_states(input_ids_BT, positions_BT, attention_mask_BS, cache, neftune=neftune)
        if last_only:  # generation's prefill needs only the next-token logits
            h_BTD = h_BTD[:, -1:]
        return head_logits(self.head(), h_BTD), cache

    def init_cache(self, batch: int, length: int, dtype=None) -> KVCache:
        return KVCache.zeros(self.cache_shape[0], batch, length, *self.cache_shape[1:],
                             dtype if dtype is not None else self.dtype)


def untied_head(config, d_in: int, kw: dict, default_tied: bool = True) -> nnx.Linear | None:
    """The output projection ``[d_in, V]`` (``lm_head``), or ``None`` when the config ties it to the embedding."""
    if bool(getattr(config, "tie_word_embeddings", default_tied)):
        return None
    return nnx.Linear(d_in, config.vocab_size, use_bias=False, kernel_init=kw.pop("kernel_init"), **kw)


def embedding_head(embed: nnx.Embed, lm_head: nnx.Linear | None) -> tuple[jax.Array, bool]:
    """``head_weight`` of a model whose head is ``lm_head``, or tied to ``embed`` when that is ``None``."""
    if lm_head is None:
        return embed.embedding[...], True
    return lm_head.kernel[...], False
