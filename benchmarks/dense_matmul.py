"""16-bit dense layers, forward + backward: the CPU-tuned custom-VJP product vs the plain dot, on this backend.

``dense`` runs a bf16 ``nnx.Linear`` as a bf16 x bf16 -> fp32 product. On the CPU backend it takes a
hand-written VJP (so the backward products are bf16 x bf16 -> fp32 too); elsewhere the plain
``jnp.dot(..., preferred_element_type=float32)``, left to XLA's autodiff and fusion (``cpu_tuned_matmuls``).
This script times one gated MLP (gate, up, down: Llama's) forward + backward in bf16 three ways on the default
backend: each of those two paths forced, and nnx's own bf16 -> bf16 dot. Shapes: Llama-3.2-1B's MLP on 8192 tokens
on an accelerator, the README's CPU shape (512 x 256 x 704) on a CPU.

    python benchmarks/dense_matmul.py [--tokens N --hidden D --inner F] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from itersft_jax.models import layers as model_layers

    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=512 if on_cpu else 8192)
    parser.add_argument("--hidden", type=int, default=256 if on_cpu else 2048)
    parser.add_argument("--inner", type=int, default=704 if on_cpu else 8192)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    n, d, f = args.tokens, args.hidden, args.inner

    rngs = nnx.Rngs(0)
    kw = {"dtype": jnp.bfloat16, "param_dtype": jnp.float32, "use_bias": False, "rngs": rngs}
    layers = nnx.List([nnx.Linear(d, f, **kw), nnx.Linear(d, f, **kw), nnx.Linear(f, d, **kw)])
    graphdef, params = nnx.split(layers)
    x = jax.random.normal(jax.random.key(1), (n, d), jnp.float32).astype(jnp.bfloat16)

    def make_step(matmul):
        def loss(params, x):
            gate, up, down = nnx.merge(graphdef, params)
            h = jax.nn.silu(matmul(gate, x)) * matmul(up, x)
            return jnp.sum(jnp.square(matmul(down, h).astype(jnp.float32)))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    def forced(cpu_tuned: bool):
        def matmul(layer, x):
            saved = model_layers.cpu_tuned_matmuls
            model_layers.cpu_tuned_matmuls = lambda: cpu_tuned  # read while tracing only
            try:
                return model_layers.dense(layer, x)
            finally:
                model_layers.cpu_tuned_matmuls = saved
        return matmul

    variants = [("custom VJP, bf16 x bf16 -> fp32 (the CPU path)", forced(True)),
                ("plain dot, preferred_element_type=fp32 (the GPU/TPU path)", forced(False)),
                ("nnx.Linear as is (bf16 -> bf16 dot)", lambda layer, x: layer(x))]
    flops = 3 * 2 * n * d * f * 3  # three matmuls, forward + two backward products each
    rows = []
    for name, matmul in variants:
        step = make_step(matmul)
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, x))
        compile_s = time.perf_counter() - t0
        for _ in range(2):
            jax.block_until_ready(step(params, x))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(step(params, x))
            times.append(time.perf_counter() - t0)
        rows.append((name, statistics.median(times), compile_s))

    base = rows[0][1]
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}; gated MLP "
          f"fwd+bwd, bf16, {n} tokens x {d} -> {f} -> {d}, median of {args.repeats}")
    print("| variant | ms | TFLOP/s | vs custom VJP | first call s |\n|---|---|---|---|---|")
    for name, seconds, compile_s in rows:
        print(f"| {name} | {seconds * 1e3:.2f} | {flops / seconds / 1e12:.3g} | {base / seconds:.2f}x | "
              f"{compile_s:.1f} |")


if __name__ == "__main__":
    main()
