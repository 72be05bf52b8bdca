"""Host memory of loading a checkpoint: ``load_model`` plain vs straight onto a mesh of 8 (fake CPU) devices.

A random fp32 Llama (``--hidden``, ``--layers``, vocab 32k) saved as safetensors is loaded by a fresh process
per mode; it reads ``VmRSS`` after starting JAX, loads, and reads ``VmHWM``. On the CPU the devices' buffers
are host memory too, so the loaded parameters themselves are part of "added"; what matters is the transient
overhead above them (``added - parameter bytes``): reading a whole tensor, casting a whole copy. With a mesh
each device's slice is read from the memory-mapped file and cast on its own.

    python benchmarks/load_memory.py [--hidden 1024] [--layers 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
from common import reset_peak, run_worker, save_random_llama, status_kib  # noqa: E402


def worker(mode: str, model_dir: str) -> dict:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax

    from itersft_jax.io.weights import load_model
    from itersft_jax.parallel.mesh import make_mesh

    mesh = make_mesh("fsdp:8") if mode == "fsdp:8" else None
    jax.numpy.zeros(1).block_until_ready()  # the runtime up before the baseline
    reset_peak()
    before_kib = status_kib("VmRSS")
    module, _ = load_model(model_dir, mesh=mesh)
    peak_kib = status_kib("VmHWM")
    from flax import nnx

    leaves = jax.tree.leaves(nnx.state(module, nnx.Param))
    return {"added_mib": (peak_kib - before_kib) / 1024, "param_mib": sum(x.nbytes for x in leaves) / 2**20,
            "split": sum(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated for x in leaves),
            "tensors": len(leaves)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--worker", choices=["plain", "fsdp:8"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        import json

        print(json.dumps(worker(args.worker, args.model_dir)))
        return
    with tempfile.TemporaryDirectory() as workdir:
        n = save_random_llama(workdir, hidden_size=args.hidden, num_hidden_layers=args.layers,
                              num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128,
                              intermediate_size=int(args.hidden * 2.75), vocab_size=32000,
                              tie_word_embeddings=False)
        results = {mode: run_worker(__file__, mode, workdir) for mode in ("plain", "fsdp:8")}
    print(f"\n## Host memory of load_model: Llama {n / 1e6:.0f}M params fp32 (hidden {args.hidden}, {args.layers} "
          f"layers), 8 fake CPU devices, each mode in its own process\n")
    print("| mode | peak RSS added (MiB) | parameters (MiB) | transient overhead (MiB) | tensors split |")
    print("|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['added_mib']:,.0f} | {r['param_mib']:,.0f} | {r['added_mib'] - r['param_mib']:,.0f} | "
              f"{r['split']} of {r['tensors']} |")


if __name__ == "__main__":
    main()
