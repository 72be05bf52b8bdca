"""Attention implementations against each other: forward+backward time and memory, and (``--check``) correctness on
the accelerator at hand.

Timing table (default): one causal self-attention of packed rows (4 samples per row), forward + backward w.r.t.
q, k, v, median of ``--iters`` runs after a warm-up; memory is XLA's own figure for the compiled program
(``memory_analysis()``: temporaries + arguments + outputs), the same on every backend. Ratios are against the
first row of each shape: ``xla``, the materializing path of ``models/attention/xla.py`` (``make_attention_mask`` +
``grouped_attention``), where it runs.

* CPU: ``xla`` vs ``xla_chunked``, ``[1, T, 4 heads / 1 kv head, 32]`` fp32, T in 512, 2048, 8192.
* GPU: ``xla``, ``xla_chunked``, ``pallas_gpu``, ``cudnn`` and jax's own Pallas ``mha`` (kv heads repeated) at
  the Llama-3.2-1B attention shape ``[8, 2048, 32 / 8, 64]`` and ``[1, 16384, 32 / 8, 64]``, bf16.

``--check``: every implementation that can run on this backend against a materialized fp32 reference (packed
rows, left padding, an empty row, GQA, sliding window, soft-cap), outputs and q/k/v gradients, plus exact
isolation across samples; on GPU also jax's cuDNN packed-GQA offsets (the workaround in
``models/attention/cudnn.py``) and a row cuDNN cannot express (NaN). Prints one line per case with the max errors
and PASS/FAIL.

    python benchmarks/attention_kernels.py [--check | --sweep] [--iters 3]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import traceback

import common  # noqa: E402,F401  (the repository root on sys.path)
import jax
import jax.numpy as jnp
import numpy as np

from itersft_jax.models.attention import pallas_gpu  # noqa: E402
from itersft_jax.models.attention.cudnn import cudnn_segment_layout  # noqa: E402
from itersft_jax.models.attention.flash import flash_attention  # noqa: E402
from itersft_jax.models.attention.masks import make_attention_mask
from itersft_jax.models.attention.select import KERNELS, unsupported_reason  # noqa: E402
from itersft_jax.models.attention.xla import grouped_attention


def packed_ids(b: int, t: int, samples: int = 4) -> np.ndarray:
    """``samples`` samples of uneven lengths per row, 5% padding at the end."""
    ids = np.zeros((b, t), np.int32)
    real = t - t // 20
    cuts = np.linspace(0, real, samples + 1).astype(int) + np.array([0] + [t // 50] * (samples - 1) + [0])
    for s in range(samples):
        ids[:, cuts[s]:cuts[s + 1]] = s + 1
    return ids


def xla_attention(q, k, v, seg, *, scale, window=None, softcap=None):
    """The materializing path of models/attention/xla.py (it has no soft-cap)."""
    assert softcap is None
    mask = make_attention_mask(seg, q.shape[1], 0, window)
    out = grouped_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, scale=scale)
    return jnp.where((seg != 0)[:, :, None, None], out, 0)


def jax_pallas_mha(q, k, v, seg, *, scale, window=None, softcap=None):
    """jax's Pallas GPU ``mha``: segment ids and causal, no GQA (kv heads repeated), window or soft-cap."""
    from jax.experimental.pallas.ops.gpu import attention as ga

    assert window is None and softcap is None
    g = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, g, axis=2) for x in (k, v))
    blocks = ga.BlockSizes(block_q=128, block_k=64, block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
    out = ga.mha(q, k, v, seg, sm_scale=scale, causal=True, block_sizes=blocks)
    return jnp.where((seg != 0)[:, :, None, None], out, 0)


def implementation(name: str, **kw):
    if name == "xla":
        return xla_attention
    if name == "jax_pallas_mha":
        return jax_pallas_mha
    return lambda q, k, v, seg, **a: flash_attention(q, k, v, seg, implementation=name, **a, **kw)


def fwd_bwd(fn, seg, **attn):
    def loss_and_grads(q, k, v, cot):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg, **attn), q, k, v)
        return out, vjp(cot)
    return jax.jit(loss_and_grads)


def inputs(b, t, n, kv, h, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    shapes = [(b, t, n, h), (b, t, kv, h), (b, t, kv, h), (b, t, n, h)]
    return [jax.random.normal(key, s, jnp.float32).astype(dtype) for key, s in zip(keys, shapes)]


# ----------------------------------------------------------------------------- timing


def time_one(name, b, t, n, kv, h, dtype, iters, samples=4, **kw):
    q, k, v, cot = inputs(b, t, n, kv, h, dtype)
    seg = jnp.asarray(packed_ids(b, t, samples))
    compiled = fwd_bwd(implementation(name, **kw), seg, scale=h ** -0.5).lower(q, k, v, cot).compile()
    mem = compiled.memory_analysis()
    mem_bytes = None if mem is None else (mem.temp_size_in_bytes + mem.argument_size_in_bytes +
                                          mem.output_size_in_bytes)
    jax.block_until_ready(compiled(q, k, v, cot))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v, cot))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), mem_bytes


def timing_table(names, shapes, dtype, iters, samples=4, **kw):
    print(f"\nfwd+bwd of one attention, {jnp.dtype(dtype).name}, {samples} sample(s) per row; "
          f"device {jax.devices()[0].device_kind}")
    print(f"{'B x T, N/K x H':>24} {'implementation':>15} {'ms':>10} {'vs 1st':>8} {'MiB':>10} {'vs 1st':>8}")
    for b, t, n, kv, h in shapes:
        base = None
        for name in names:
            try:
                sec, mem = time_one(name, b, t, n, kv, h, dtype, iters, samples, **kw)
            except Exception as err:  # noqa: BLE001 - a table row per failure, the rest still runs
                print(f"{f'{b} x {t}, {n}/{kv} x {h}':>24} {name:>15}  failed: {type(err).__name__}: "
                      f"{str(err).splitlines()[0][:150]}", flush=True)
                continue
            base = base or (sec, mem)  # the first row that ran
            ratio_t = f"{sec / base[0]:.2f}x"
            ratio_m = f"{mem / base[1]:.2f}x" if mem and base[1] else "-"
            mib = f"{mem / 2**20:.1f}" if mem else "?"
            print(f"{f'{b} x {t}, {n}/{kv} x {h}':>24} {name:>15} {sec * 1e3:>10.1f} {ratio_t:>8} {mib:>10} "
                  f"{ratio_m:>8}", flush=True)


# ----------------------------------------------------------------------------- correctness on this backend


def reference(q, k, v, seg, *, scale, window=None, softcap=None):
    """Materialized fp32 attention with the contract's mask written out."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    t, g = q.shape[1], q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, g, axis=2) for x in (k, v))
    s = jnp.einsum("btnh,bsnh->bnts", q, k, precision="highest") * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    pos = jnp.arange(t)
    allowed = (pos[None, :] <= pos[:, None]) & ((pos[:, None] - pos[None, :] < window) if window else True)
    allowed = allowed[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    s = jnp.where(allowed[:, None], s, -jnp.inf)
    p = jax.nn.softmax(jnp.where(allowed.any(-1)[:, None, :, None], s, 0.0), axis=-1)
    out = jnp.einsum("bnts,bsnh->btnh", p, v, precision="highest")
    return jnp.where((seg != 0)[:, :, None, None], out, 0.0)


def check_ids(t: int) -> np.ndarray:
    """Packed rows, a left-padded row (generation prefill), an empty row, a 1-token sample."""
    rows = packed_ids(2, t, samples=3)
    left = np.zeros(t, np.int32)
    left[t // 3:] = 7
    one = np.zeros(t, np.int32)
    one[0], one[1:t - 9] = 1, 2
    return np.stack([*rows, left, np.zeros(t, np.int32), one])


def check_case(name, t, n, kv, h, dtype, window, softcap, tol, **kw):
    seg = jnp.asarray(check_ids(t))
    b = seg.shape[0]
    q, k, v, cot = inputs(b, t, n, kv, h, dtype, seed=1)
    attn = dict(scale=h ** -0.5, window=window, softcap=softcap)
    ours, ref = fwd_bwd(implementation(name, **kw), seg, **attn), fwd_bwd(reference, seg, **attn)
    out, grads = ours(q, k, v, cot)
    out_ref, grads_ref = ref(q, k, v, cot.astype(jnp.float32))
    errs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - r))) for a, r in zip((out, *grads), (out_ref, *grads_ref))]
    scale_ = [float(jnp.max(jnp.abs(r))) for r in (out_ref, *grads_ref)]
    # isolation: keys/values outside the second row's segment 2 perturbed; its outputs and gradients unchanged
    inside = (seg == 2)[:, :, None, None]
    cot2 = jnp.where(inside, cot, 0)
    a = ours(q, k, v, cot2)
    noisy = [jnp.where(inside, x, x + 3 * jax.random.normal(jax.random.key(5), x.shape).astype(x.dtype))
             for x in (k, v)]
    bb = ours(q, *noisy, cot2)
    isolated = all(bool(jnp.all(jnp.where(inside, x == y, True))) for x, y in
                   zip((a[0], *a[1]), (bb[0], *bb[1])))
    ok = all(e <= tol * max(s, 1.0) for e, s in zip(errs, scale_)) and isolated and not any(np.isnan(errs))
    print(f"{'PASS' if ok else 'FAIL'} {name:>12} {jnp.dtype(dtype).name:>8} T={t} N/K={n}/{kv} H={h} "
          f"window={window} softcap={softcap}: max err out/dq/dk/dv "
          + " / ".join(f"{e:.2e}" for e in errs) + f" (tol {tol:g} x max|ref|), isolation {isolated}", flush=True)
    return ok


def guarded(fn, *a, **kw):
    try:
        return fn(*a, **kw)
    except Exception:  # noqa: BLE001 - report and go on: one short device run must say everything it can
        print(f"FAIL {a[0] if a else fn.__name__}: exception", flush=True)
        traceback.print_exc(limit=4)
        sys.stdout.flush()
        return False


def run_checks(platform: str, only: list[str] | None = None):
    bf16, f32 = jnp.bfloat16, jnp.float32
    cases = [(None, None), (64, None), (None, 30.0), (64, 5.0)]
    results = []
    names = [n for n in KERNELS if unsupported_reason(n, platform=platform, dtype=bf16, head_dim=64,
                                                                 softcap=None, max_segments=4) is None
             and (not only or n in only)]
    for name in names:
        for window, softcap in cases:
            if name == "cudnn" and softcap is not None:
                continue
            dtypes = [bf16] if name == "cudnn" else [f32, bf16]
            for dtype in dtypes:
                tol = 2e-2 if dtype == bf16 else (2e-3 if platform != "cpu" else 2e-5)  # GPU fp32 dots: TF32
                kw = dict(max_segments=4) if name == "cudnn" else {}
                results.append(guarded(check_case, name, 256, 8, 2, 64, dtype, window, softcap, tol, **kw))
    if platform == "gpu":
        # shapes the kernels pad or loop over differently: head_dim 128 / 80 (padded to 128), G = 3 and 1
        for name, n, kv, h in [("pallas_gpu", 6, 2, 128), ("pallas_gpu", 4, 4, 80), ("pallas_gpu", 32, 8, 64),
                               ("cudnn", 32, 8, 128), ("cudnn", 4, 4, 64)]:
            if only and name not in only:
                continue
            kw = dict(max_segments=4) if name == "cudnn" else {}
            results.append(guarded(check_case, name, 512, n, kv, h, bf16, 128, None, 2e-2, **kw))
        results.append(guarded(check_cudnn_specifics))
    print(f"\n{sum(bool(r) for r in results)} passed, {sum(not r for r in results)} failed", flush=True)


def check_cudnn_specifics():
    """Whether this jax still needs the repeated kv heads for packed GQA, and that an inexpressible row is NaN."""
    import inspect

    from jax._src.cudnn import fused_attention_stablehlo as fas

    src = inspect.getsource(fas._fix_seqlen_offsets)
    print("jax", jax.__version__, "cudnn", fas.check_cudnn_version(), "| kv offsets line:",
          [line.strip() for line in src.splitlines() if "kv_offsets = kv_offsets *" in line])
    t, n, kv, h = 256, 8, 2, 64
    seg = jnp.asarray(check_ids(t))
    q, k, v, _ = inputs(seg.shape[0], t, n, kv, h, jnp.bfloat16, seed=2)
    ref = reference(q, k, v, seg, scale=0.125)
    # without the workaround: GQA keys with K heads straight into the packed layout
    seqlens, offsets, _ = cudnn_segment_layout(seg, 4)
    raw = fas.dot_product_attention(q, k, v, None, None, seqlens, seqlens, offsets, offsets, scale=0.125,
                                    mask_type=fas.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
    raw = jnp.where((seg != 0)[:, :, None, None], raw.astype(jnp.float32), 0)
    print(f"packed GQA without repeating kv heads: max err {float(jnp.max(jnp.abs(raw - ref))):.2e} "
          "(large = this jax still has the kv-offset bug, the repeat is needed)")
    bad = jnp.asarray(np.array([[1] * 100 + [2] * 100 + [1] * 56]))  # id 1 in two runs
    out = flash_attention(q[:1], k[:1], v[:1], bad, scale=0.125, implementation="cudnn", max_segments=4)
    nan = bool(jnp.all(jnp.isnan(out)))
    print(f"{'PASS' if nan else 'FAIL'} cudnn row it cannot express -> NaN: {nan}")
    return nan


def _fixed_cfg(config, t, head_dim, **kw):
    bq, bk, bqb, bkb, warps, stages = config
    return pallas_gpu.GpuConfig(block_q=bq, block_k=bk, block_q_bwd=bqb, block_k_bwd=bkb, num_warps=warps,
                           num_stages=stages, **kw)


def sweep_pallas_blocks(iters: int):
    """fwd+bwd time of pallas_gpu per block configuration (block_q, block_k, bwd block_q, bwd block_k, warps,
    stages) at the two GPU shapes: the data behind ``pallas_gpu.gpu_config``'s defaults."""
    default = pallas_gpu.gpu_config
    configs = [(128, 64, 64, 64, 4, 2), (128, 128, 64, 64, 8, 2), (128, 64, 64, 64, 4, 3), (64, 64, 64, 64, 4, 2),
               (128, 64, 64, 128, 8, 2), (128, 64, 128, 64, 8, 2)]
    print("\npallas_gpu block sweep, bf16, packed rows (ms, fwd+bwd)")
    for config in configs:
        bq, bk, bqb, bkb, warps, stages = config
        pallas_gpu.gpu_config = functools.partial(_fixed_cfg, config)
        row = []
        for shape in [(8, 2048, 32, 8, 64), (1, 16384, 32, 8, 64)]:
            try:
                row.append(f"{time_one('pallas_gpu', *shape, jnp.bfloat16, iters)[0] * 1e3:8.2f}")
            except Exception as err:  # noqa: BLE001
                row.append(f"failed {type(err).__name__}")
        print(f"blocks {bq}x{bk} bwd {bqb}x{bkb} warps {warps} stages {stages}: " + "  ".join(row), flush=True)
    pallas_gpu.gpu_config = default


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="correctness of every implementation on this backend")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="GPU: pallas_gpu block sizes")
    parser.add_argument("--only", nargs="*", help="--check only these implementations")
    parser.add_argument("--lengths", type=int, nargs="*", default=[512, 2048, 8192], help="CPU table lengths")
    parser.add_argument("--samples", type=int, default=4, help="samples packed per row (1: unpacked)")
    parser.add_argument("--batch", type=int, default=1, help="CPU table rows")
    parser.add_argument("--heads", default="4/1", help="CPU table query/kv heads, e.g. 8/2")
    parser.add_argument("--head-dim", type=int, default=32, help="CPU table head_dim")
    args = parser.parse_args()
    platform = jax.default_backend()
    print(f"jax {jax.__version__}, backend {platform}, device {jax.devices()[0].device_kind}", flush=True)
    if args.check:
        run_checks(platform, args.only)
        return
    if args.sweep:
        sweep_pallas_blocks(args.iters)
        return
    if platform == "gpu":
        names = ["xla", "xla_chunked", "jax_pallas_mha", "pallas_gpu", "cudnn"]
        timing_table(names, [(8, 2048, 32, 8, 64)], jnp.bfloat16, args.iters, max_segments=8)
        timing_table(names[1:], [(1, 16384, 32, 8, 64)], jnp.bfloat16, args.iters, max_segments=8)
    else:
        n, kv = (int(x) for x in args.heads.split("/"))
        shapes = [(args.batch, t, n, kv, args.head_dim) for t in args.lengths]
        timing_table(["xla", "xla_chunked"], shapes, jnp.float32, args.iters, args.samples)


if __name__ == "__main__":
    main()
