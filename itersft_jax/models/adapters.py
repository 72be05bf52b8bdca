"""The forward half of LoRA, at the bottom of the model layer: the adapter variable type and what
``common.dense`` adds to a layer's output (``itersft_jax.lora`` attaches adapters and reads ``LoraConfig``).

Dropout on the adapters' input runs only inside ``dropout_rng(key)`` (the train step); evaluation and
generation never set it. Each adapted layer draws its mask from ``fold_in(key, layer.lora_id)`` (a number fixed
when the adapters are attached), so masks do not depend on how often a transform traces the forward
(``nnx.remat`` traces it more than once) and the rematerialized forward sees the same masks.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx


class LoRAParam(nnx.Param):
    """A trainable LoRA adapter matrix (the base parameters stay ``nnx.Param``)."""


_DROPOUT: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("itersft_lora_dropout", default=None)


@contextlib.contextmanager
def dropout_rng(key: jax.Array | None):
    """Within the block, adapters apply their ``lora_dropout`` with masks drawn from ``key`` (training only)."""
    token = _DROPOUT.set(key)
    try:
        yield
    finally:
        _DROPOUT.reset(token)


def adapter_delta(layer, x_NI: jax.Array, dtype) -> jax.Array | None:
    """``scale * dropout(x) @ A @ B`` for a layer holding adapters (``None`` otherwise), in ``dtype`` with
    fp32 accumulation."""
    lora_a = getattr(layer, "lora_a", None)
    if lora_a is None:
        return None
    rate = float(getattr(layer, "lora_dropout", 0.0))
    key = _DROPOUT.get()
    if rate > 0.0 and key is not None:
        key = jax.random.fold_in(key, layer.lora_id)
        keep = jax.random.bernoulli(key, 1.0 - rate, x_NI.shape)
        x_NI = jnp.where(keep, x_NI / (1.0 - rate), 0).astype(x_NI.dtype)
    a = lora_a[...].astype(dtype)
    b = layer.lora_b[...].astype(dtype)
    low_NR = jnp.dot(x_NI.astype(dtype), a, preferred_element_type=jnp.float32).astype(dtype)
    return (jnp.dot(low_NR, b, preferred_element_type=jnp.float32) * layer.lora_scale).astype(dtype)
