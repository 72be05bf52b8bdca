"""models.layers.dense: the 2-D matmul wrapper and its bf16 path (16-bit products accumulated in fp32).

Tolerances: fp32 dense == the layer itself <= 1e-6; bf16 dense and its gradients vs autodiff of the same
16-bit x 16-bit -> fp32 product <= 1e-2 relative (bf16 rounding of the cotangent only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from itersft_jax.models.layers import dense


def _reference(x, kernel, bias, dtype):
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
    return (y + bias).astype(dtype)


def test_fp32_dense_is_the_layer():
    layer = nnx.Linear(8, 5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 8))
    np.testing.assert_allclose(np.asarray(dense(layer, x)), np.asarray(layer(x)), atol=1e-6)


def test_bf16_dense_value_and_gradients():
    layer = nnx.Linear(16, 12, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    layer.bias[...] = jax.random.normal(jax.random.key(2), (12,))
    x = jax.random.normal(jax.random.key(1), (2, 3, 16))
    assert dense(layer, x).dtype == jnp.bfloat16

    graphdef, state = nnx.split(layer)

    def ours(kernel, x):
        params = nnx.to_pure_dict(state)
        params["kernel"] = kernel
        model = nnx.merge(graphdef, params)
        return jnp.sum(jnp.sin(dense(model, x).astype(jnp.float32)))

    kernel = layer.kernel[...]
    bias = layer.bias[...]
    ref = lambda k, x: jnp.sum(jnp.sin(_reference(x, k, bias, jnp.bfloat16).astype(jnp.float32)))  # noqa: E731
    np.testing.assert_allclose(float(ours(kernel, x)), float(ref(kernel, x)), rtol=1e-2)
    g_ours = jax.grad(ours, argnums=(0, 1))(kernel, x)
    g_ref = jax.grad(ref, argnums=(0, 1))(kernel, x)
    for a, b in zip(g_ours, g_ref):
        assert a.dtype == b.dtype
        scale = float(jnp.max(jnp.abs(b)))
        assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) <= 1e-2 * scale
