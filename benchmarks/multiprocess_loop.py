"""The loop on several ``jax.distributed`` processes: 1 process x 4 devices vs 2 x 2 vs 4 x 1 (fake CPU devices).

Each layout runs the same 4 global devices (the default mesh, ``fsdp:4``) and the same calls, in a fresh set of
processes on localhost: per round, ``generate`` (8 prompts x 4 samples, logprobs) -> filter -> ``step()`` on the
kept half -> ``sample()`` -> ``forward_backward("ppo")`` + ``optim_step()``. Round 0 compiles; the table holds the
mean wall time of the later rounds per phase (process 0), and the part of it spent in the host's cross-process
reads: ``distributed.fetch`` (the sampler's per-chunk gather of tokens, flags and logprobs; timed after the chunk's
compute has finished, so it is the transfer alone), ``distributed.check_same`` (the argument fingerprints) and
``distributed.global_batch`` (each process's slice of a batch). The collectives inside the compiled programs
(fsdp's all-gathers and reductions, over gloo between processes) are not separable here: they are in the rest of
the overhead ratio. All processes share this machine's cores, so the ratio is the overhead of several processes,
not a speed-up.

    python benchmarks/multiprocess_loop.py [--rounds 3] [--layouts 1x4,2x2,4x1] [--out timings.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = ("generate", "step", "sample", "forward_backward+optim_step")
READS = ("fetch", "check_same", "global_batch")
PROMPTS = ["Question: what is two plus two?", "12 + 30 =", "def add(a, b):", "The quick", "hello world",
           "Rejection sampling keeps", "JAX and PyTorch", "Generate, filter, then"]


def worker(devices: int, model_dir: str, out_dir: str, rounds: int) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    sys.path.insert(0, os.path.dirname(HERE))
    from itersft_jax.parallel import distributed

    distributed.initialize()
    import jax
    import numpy as np

    from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer
    from itersft_jax.shared.datum import samples_to_data

    spent: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()

    def timed(name, fun, settle=False):
        def call(*args, **kwargs):
            if settle:  # the chunk's compute finished first: what follows is the transfer alone
                jax.block_until_ready(args[0])
            started = time.perf_counter()
            out = fun(*args, **kwargs)
            spent[name] += time.perf_counter() - started
            calls[name] += 1
            return out
        return call

    distributed.fetch = timed("fetch", distributed.fetch, settle=True)
    distributed.check_same = timed("check_same", distributed.check_same)
    distributed.global_batch = timed("global_batch", distributed.global_batch)
    trainer = IterativeSFTTrainer(model_dir, args=IterativeSFTConfig(
        output_dir=out_dir, per_device_train_batch_size=2, learning_rate=1e-3, report_to="none", save_strategy="no",
        seed=0, gradient_checkpointing=False))
    results = []
    for r in range(rounds + 1):
        row: dict = {}

        def phase(name, fun):
            spent.clear()
            calls.clear()
            started = time.perf_counter()
            out = fun()
            row[name] = {"seconds": time.perf_counter() - started, **spent, "fetches": calls["fetch"]}
            return out

        out = phase("generate", lambda: trainer.generate(PROMPTS, num_return_sequences=4, do_sample=True,
                                                         return_logprobs=True, max_new_tokens=32, seed=r))
        means = [float(np.mean(lp)) if len(lp) else -1e9 for lp in out.logprobs]
        keep = [i for i, m in enumerate(means) if m >= np.median(means)]
        phase("step", lambda: trainer.step(prompts=[PROMPTS[i // 4] for i in keep],
                                           completions=[out.texts[i] for i in keep]))
        sampled = phase("sample", lambda: trainer.sample(PROMPTS[:4], num_samples=4, do_sample=True,
                                                         max_new_tokens=32, seed=100 + r))
        data = samples_to_data(sampled, [1.0, -1.0, 0.5, -0.5] * 4)
        phase("forward_backward+optim_step", lambda: (trainer.forward_backward(data, "ppo"), trainer.optim_step()))
        results.append(row)
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, "timings.json"), "w") as f:
            json.dump({"rounds": results[1:]}, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(processes: int, model_dir: str, out_dir: str, rounds: int) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES=str(processes))
    command = [sys.executable, os.path.abspath(__file__), "--worker", str(4 // processes), model_dir, out_dir,
               str(rounds)]
    procs = [subprocess.Popen(command, env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(processes)]
    for p in procs:
        _, err = p.communicate(timeout=3600)
        if p.returncode:
            raise RuntimeError(f"{processes} processes: {err[-3000:]}")
    with open(os.path.join(out_dir, "timings.json")) as f:
        return json.load(f)


def summarize(layouts: dict[str, dict]) -> str:
    """The markdown table: per layout and phase, mean wall seconds, the ratio to 1 x 4, the host's cross-process
    reads and their share, and the mean fetch of one decode chunk."""
    import numpy as np

    def mean(rows, phases, key):
        return sum(float(np.mean([row[p].get(key, 0.0) for row in rows])) for p in phases)

    base = layouts.get("1x4", {}).get("rounds")
    lines = ["| processes x devices | phase | wall (s) | vs 1 x 4 | host cross-process reads (s) | share | "
             "fetch per decode chunk (ms) |", "|---|---|---|---|---|---|---|"]
    for name, result in layouts.items():
        rows = result["rounds"]
        for phase in (*PHASES, "round"):
            phases = PHASES if phase == "round" else (phase,)
            wall = mean(rows, phases, "seconds")
            reads = sum(mean(rows, phases, k) for k in READS)
            fetches, fetch = mean(rows, phases, "fetches"), mean(rows, phases, "fetch")
            chunk = f"{1e3 * fetch / fetches:.2f} ({fetches:.0f} chunks)" if fetches else ""
            ratio = f"{wall / mean(base, phases, 'seconds'):.2f}x" if base else ""
            label = "**round**" if phase == "round" else phase
            lines.append(f"| {name.replace('x', ' x ')} | {label} | {wall:.2f} | {ratio} | {reads:.3f} | "
                         f"{100 * reads / wall:.1f}% | {chunk} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layouts", default="1x4,2x2,4x1")
    parser.add_argument("--out", default=None, help="the timings (JSON), updated after each layout; layouts already "
                        "there are kept and tabled")
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    from common import offline

    layouts = {}
    if args.out and os.path.exists(args.out):  # layouts of an earlier run kept (run them one at a time)
        with open(args.out) as f:
            layouts = json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        support = offline()
        model_dir = support.save_tiny_model(os.path.join(tmp, "model"), "llama", support.make_tokenizer())
        for name in args.layouts.split(","):
            layouts[name] = run_layout(int(name.split("x")[0]), model_dir, os.path.join(tmp, name), args.rounds)
            print(f"{name}: done", flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(layouts, f, indent=1)
    order = ["1x4", "2x2", "4x1"]
    print(summarize(dict(sorted(layouts.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 9))))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main()
