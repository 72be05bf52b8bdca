"""The building blocks every family shares: dense layers (with the CPU-tuned fp32 matmul VJP), the LM head as data,
activations by their Hugging Face names, NEFTune noise, and the tied/untied output head."""


from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from itersft_jax.models.lora import adapter_delta


class LMHead(NamedTuple):
    """The output projection of a causal LM, as data: ``logits = softcap(h @ W + b)``.

    ``weight`` is ``[D, V]`` (an ``nnx.Linear`` kernel) or, with ``transposed``, ``[V, D]`` (a tied embedding
    table); ``softcap`` is Gemma's final-logit soft-capping ``c * tanh(logits / c)`` or ``None``; ``dtype`` is
    the compute dtype of the product; ``bias`` is ``[V]`` (GPT-J's ``lm_head``, added in fp32) or ``None``. The
    loss (``itersft_jax.core.loss``) takes this instead of logits, so it can compute the head chunk by chunk and
    never hold ``[N, V]``.
    """

    weight: jax.Array
    transposed: bool
    softcap: float | None
    dtype: Any
    bias: jax.Array | None = None

def head_logits(head: LMHead, h_ND: jax.Array, keep_fp32: bool = False) -> jax.Array:
    """``softcap(h @ W + b)`` over the flattened leading axes, accumulated in fp32, returned in ``head.dtype``
    (``keep_fp32``: in fp32, the soft-cap too — the sampler's logits, the same numbers as ``token_logprobs``)."""
    lead = h_ND.shape[:-1]
    x = h_ND.reshape(-1, h_ND.shape[-1]).astype(head.dtype)
    if jnp.dtype(head.dtype).itemsize < 4:
        logits = _matmul_f32(x, head.weight, head.transposed)
    else:
        w = head.weight.astype(head.dtype)
        logits = jnp.dot(x, w.T if head.transposed else w, preferred_element_type=jnp.float32)
    if head.bias is not None:
        logits = logits + head.bias.astype(jnp.float32)  # logits are fp32 here
    if head.softcap is not None:
        logits = head.softcap * jnp.tanh(logits / head.softcap)
    return logits.astype(jnp.float32 if keep_fp32 else head.dtype).reshape(*lead, logits.shape[-1])

def dense(layer, x_NI: jax.Array) -> jax.Array:
    """``layer(x)`` (an ``nnx.Linear`` or ``Embed.attend``) as one 2-D matmul over the flattened leading axes.

    Why: XLA:CPU lowers the weight gradient of a 3-D ``[B, T, D]`` input (two contracting axes) to
    transposed copies of the activations plus a slow generic dot; on ``[B*T, D]`` it is one fast GEMM
    (measured: ``benchmarks/results/cpu_design_choices.md``). The reshapes are free.
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
