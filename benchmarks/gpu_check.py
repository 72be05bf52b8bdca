"""One prepared GPU run: everything issue 9's "Done when" measures on an accelerator, JAX against a PyTorch loop.

    python benchmarks/gpu_check.py --preset llama-3.2-1b --out-dir "$OUT"     # on a lent H100/H200, ~8 minutes
    python benchmarks/gpu_check.py --smoke                                     # on a CPU: every part, tiny, < 1 min
    python benchmarks/gpu_check.py --preset olmoe-1b-7b --out-dir "$OUT"      # issue 29's MoE shape (OLMoE-1B-7B)

Parts (``--parts``, default all; run in the order b c d f a g h, each job in its own process):

a. parity on the device: JAX fp32 logits ('highest' matmul precision; attention "auto" and "xla") against the
   ``transformers`` model on the same device, a small random Llama; max abs difference at real tokens.
b. JAX training, bf16, no remat, ``[B, --seq]`` for B in ``--batches``: tokens/s, MFU, peak device memory
   (``memory_stats()["peak_bytes_in_use"]``), the attention implementation "auto" chose. Measured through the
   trainer's own jitted ``_train_step`` on a pre-built ``[1, B, T]`` update (what ``step()`` builds for B samples
   of T tokens), and again through ``trainer.step()`` itself (see ``gpu_jax.py``).
c. the PyTorch loop (bf16 autocast, fused AdamW, SDPA) at the same shapes: tokens/s, MFU,
   ``torch.cuda.max_memory_allocated``; its best batch is the reference of the ratios.
d. long context: JAX ``[1, T]`` with ``gradient_checkpointing=True`` (default policy) for T in ``--long``, against
   the PyTorch loop with gradient checkpointing at the same lengths (the longest only if it fits).
e. peak memory per token, JAX / PyTorch, wherever both ran the same batch (derived from b, c and d).
f. ``trainer.generate()`` of one ``--prompt``-token prompt: first call, prefill time, decode tokens/s, peak memory.
g. the iterative workload (variable lengths, compile included) through both trainers on a 217M Llama.
h. the sampler (issue 20): the continuous engine on 512 prompts x 8 (256-token prompts, 512 new tokens, 256 decode
   slots, sampled, no EOS stop): tokens/s and the fraction of the HBM roofline (weights + the KV actually read per
   decode step); ``transformers`` ``generate`` on 256 rows of the same shape for the ratio.

MFU = tokens/s x (6 N + 12 L D T) / peak, N the parameters (a tied head counted once), peak the device's bf16 dense
FLOP/s (H100 and H200: 989e12; ``--peak-tflops`` for others). Models are random: weights drawn on the device from
the preset's ``transformers.LlamaConfig`` (``--preset llama-3.2-1b`` is issue 9's shape: 1.24B parameters), or
``--preset olmoe-1b-7b``: OLMoE-1B-7B's mixture of experts (6.9B parameters, 1.3B active: MFU counts the active ones;
part a then compares a tiny random OLMoE, ``--smoke`` runs the tiny OLMoE).

Each job is a process forked from this one after it imported jax, flax, torch and transformers but before any of
them touched a device: JAX preallocates device memory (here ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95`` unless set)
and the two engines must never share one; forking saves each job the ~5 s of imports. A job that fails, runs out
of memory or passes its timeout is recorded and the next one runs; ``--budget-s`` skips the jobs that no longer
fit. Workers append JSON lines to ``results_<device>_<date>.jsonl`` in ``--out-dir`` as they measure; after every
job this process rewrites ``results_<device>_<date>.md`` (device, versions, date, the tables with ratios, issue 9's
targets), so even a run cut short leaves its numbers. It prints the same tables at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback

from gpu_common import PRESETS, SMOKE_PRESETS, Plan, Recorder, peak_flops
from gpu_report import memory_per_token, report

# (job, part, engine, worker function, timeout on a GPU in s), in running order: issue 9's targets first.
JOBS = (
    ("fixed_jax", "b", "jax", "fixed", 240),
    ("fixed_torch", "c", "torch", "fixed", 150),
    ("long_jax", "d", "jax", "long_context", 200),
    ("long_torch", "d", "torch", "long_context", 150),
    ("generate_jax", "f", "jax", "generate", 150),
    ("parity_torch", "a", "torch", "parity", 60),
    ("parity_jax", "a", "jax", "parity", 90),
    ("iterative_torch", "g", "torch", "iterative", 120),
    ("iterative_jax", "g", "jax", "iterative", 120),
    ("sampler_jax", "h", "jax", "sampler", 240),
    ("sampler_torch", "h", "torch", "sampler", 150),
)
PARTS = "abcdefgh"
SMOKE_TIMEOUT_S = 90
MIN_JOB_S = 30  # a job is not started with less budget than this left


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama-3.2-1b",
                   help="llama-3.2-1b (issue 9), olmoe-1b-7b (issue 29's mixture of experts), or their tiny shapes")
    p.add_argument("--parts", default=PARTS, help="letters of the parts to run (e needs b/c or d)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke run: tiny preset, [2, 256], one measured step, torch on CPU, results in a temp dir")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batches", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--long", type=int, nargs="+", default=[16384, 32768], help="part d lengths, increasing")
    p.add_argument("--prompt", type=int, default=16384, help="part f prompt tokens")
    p.add_argument("--new-tokens", type=int, default=64, help="part f tokens generated")
    p.add_argument("--warmup", type=int, default=2, help="updates before timing (the first compiles)")
    p.add_argument("--steps", type=int, default=5, help="timed updates per shape")
    p.add_argument("--attn", default="auto", help="JAX attn_implementation (auto, cudnn, pallas_gpu, xla_chunked, ..)")
    p.add_argument("--remat-policy", default=None, help="JAX gradient_checkpointing_kwargs policy (default: the "
                   "trainer's default)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak for MFU (default by device name)")
    p.add_argument("--budget-s", type=float, default=480, help="skip the remaining jobs once this is spent")
    p.add_argument("--out-dir", default=None,
                   help="where the .jsonl and .md go (default benchmarks/results/; smoke: a temp dir)")
    p.add_argument("--spawn", nargs="*", default=None, metavar="JOB",
                   help="run these jobs (all when none is named) in fresh interpreters instead of forked processes")
    p.add_argument("--job", help=argparse.SUPPRESS)  # a spawned job: run it and exit
    p.add_argument("--plan", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:  # one shape per part; [2, 256] is what step() packs on a CPU too (no recompilation)
        args.preset, args.seq, args.batches, args.long, args.prompt = SMOKE_PRESETS[args.preset], 256, [2], [512], 256
        args.new_tokens, args.warmup, args.steps = 4, 1, 1
    if set(args.spawn or ()) - {job[0] for job in JOBS}:
        raise SystemExit(f"--spawn: job names of {[job[0] for job in JOBS]}, got {args.spawn}")
    unknown = set(args.parts) - set(PARTS)
    if unknown or not args.parts:
        raise SystemExit(f"--parts: letters of {PARTS}, got {args.parts!r}")
    if sorted(args.long) != list(args.long) or sorted(args.batches) != list(args.batches):
        raise SystemExit("--batches and --long must be increasing (peak memory is a per-process high-water mark)")
    return args


def device_name(smoke: bool) -> str:
    """The GPU's name from nvidia-smi: this process must not initialise CUDA (forked children could not)."""
    if smoke:
        return "cpu"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown-device"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown-device"


def output_paths(out_dir: str, device: str) -> tuple[str, str]:
    """``results_<device>_<date>.{jsonl,md}``, numbered rather than overwriting an earlier run's."""
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower().replace("nvidia", "")).strip("-") or "device"
    stem = os.path.join(out_dir, f"results_{slug}_{datetime.date.today().isoformat()}")
    n, suffix = 1, ""
    while os.path.exists(stem + suffix + ".md") or os.path.exists(stem + suffix + ".jsonl"):
        n += 1
        suffix = f"_{n}"
    return stem + suffix + ".jsonl", stem + suffix + ".md"


def preload() -> None:
    """Import what the workers use, so each forked job starts with it; no device is touched."""
    import gpu_jax  # noqa: F401
    import gpu_torch  # noqa: F401
    import jax  # noqa: F401
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401
    from jax._src import xla_bridge

    import itersft_jax.trainer  # noqa: F401
    import itersft_torch  # noqa: F401

    assert not xla_bridge.backends_are_initialized(), "a JAX backend was initialised before the fork"
    assert not torch.cuda.is_initialized(), "CUDA was initialised before the fork"


def jax_environment(smoke: bool) -> None:
    """A JAX job's environment, set before its backend starts. On a GPU: 95% of the memory for XLA's allocator (jax's
    default 0.75 would leave 20 GB of an H100 idle; torch may use all of it). In a smoke run: XLA's fastest compiles
    (the run checks the code, not the speed; it compiles ~9 programs on a 2-core CPU)."""
    if smoke:
        fast = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {fast}".strip()
    elif not {"XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"} & set(os.environ):
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.95"  # the name jax 0.4-0.11 all read


def run_worker(job: tuple, plan: Plan) -> int:
    """A job's body, in its own process (forked or spawned); returns its exit code."""
    name, part, engine, worker, _ = job
    try:
        if engine == "jax":
            jax_environment(plan.smoke)
        getattr(importlib.import_module(f"gpu_{engine}"), worker)(plan, Recorder(plan.results, part, name))
        return 0
    except BaseException as err:  # noqa: BLE001 - recorded; the parent goes on with the next job
        traceback.print_exc()
        Recorder(plan.results, part, name).failure(name, err, False, engine=engine)
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def run_job(job: tuple, plan: Plan, timeout_s: float, spawn: bool) -> str:
    """Run one job in its own process, at most ``timeout_s``: forked from this one (the libraries already imported),
    or with ``spawn`` a fresh interpreter. Returns "ok", "error (exit N)" or "timeout (N s)"."""
    sys.stdout.flush()
    sys.stderr.flush()
    if spawn:
        with open(os.path.join(plan.workdir, "plan.json"), "w") as f:
            json.dump(dataclasses.asdict(plan), f)
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--job", job[0], "--plan", f.name])
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return f"timeout ({timeout_s:.0f} s)"
        return "ok" if code == 0 else f"error (exit {code})"
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os._exit(run_worker(job, plan))
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return "ok" if code == 0 else f"error (exit {code})"
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return f"timeout ({timeout_s:.0f} s)"
        time.sleep(0.2)


def fork_keeps_cuda() -> bool:
    """Whether a forked child can still use CUDA: false if an import initialised the driver in this process (then
    the jobs are spawned instead). Costs the child's cuInit, about a second."""
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        import torch

        os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)  # ask the CUDA runtime itself
        os._exit(0 if torch.cuda.is_available() else 1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def read_rows(path: str) -> list[dict]:
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a killed job
                    pass
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.job:
        with open(args.plan) as f:
            plan = Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.load(f).items()})
        return run_worker(next(job for job in JOBS if job[0] == args.job), plan)
    started = time.monotonic()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers train tokenizers after the fork
    # torch.cuda.is_available() in this process would initialise the CUDA driver, and no forked child could use
    # the GPU after that; with this set it asks NVML instead (accelerate does the same).
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    out_dir = args.out_dir or (tempfile.mkdtemp(prefix="gpu_check_") if args.smoke else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results"))
    os.makedirs(out_dir, exist_ok=True)
    device = device_name(args.smoke)
    results, md_path = output_paths(out_dir, device)
    workdir = tempfile.mkdtemp(prefix="gpu_check_work_")
    plan = Plan(preset=args.preset, smoke=args.smoke, seq=args.seq, batches=tuple(args.batches),
                long_lengths=tuple(args.long), prompt=args.prompt, new_tokens=args.new_tokens, warmup=args.warmup,
                steps=args.steps, attn=args.attn, remat_policy=args.remat_policy, peak_tflops=args.peak_tflops,
                results=results, workdir=workdir)
    if args.smoke:
        plan.iterative = (2, 8, 16, 64, 4)
        plan.sampler = (4, 2, 128, 8, 4, 4)  # 128-token prompts: the shared-prompt decode attention runs too
    command = "python benchmarks/gpu_check.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    now = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    peak = peak_flops(device, args.peak_tflops)
    header = [f"`{command}`; preset {args.preset}; {now} UTC; device {device}; budget {args.budget_s:.0f} s; "
              f"{args.warmup} warm-up and {args.steps} timed updates per shape; MFU against "
              f"{f'{peak:.4g} FLOP/s (bf16 dense)' if peak else 'no known peak (--peak-tflops)'}."]
    title = f"benchmarks/gpu_check.py on {device}, {datetime.date.today().isoformat()}"
    print(f"{title}\nresults: {results}\nreport:  {md_path}", flush=True)
    preload()
    spawn = {job[0] for job in JOBS} if args.spawn == [] else set(args.spawn or ())
    if not args.smoke and not spawn and not fork_keeps_cuda():
        print("a forked process cannot use CUDA here (or torch sees no GPU): every job runs in a fresh interpreter",
              flush=True)
        spawn = {job[0] for job in JOBS}
    print(f"imports: {time.monotonic() - started:.1f} s; spawned jobs: {sorted(spawn) or 'none'}", flush=True)

    def write_report() -> str:
        rows = [r for r in read_rows(results) if r.get("part") != "e"]
        rows += memory_per_token(rows) if "e" in args.parts else []
        text = report(rows, title=title, header=header, batches=plan.batches, seq=plan.seq,
                      long_lengths=plan.long_lengths)
        with open(md_path, "w") as f:
            f.write(text)
        return text

    for job in JOBS:
        name, part = job[0], job[1]
        if part not in args.parts:
            continue
        left = args.budget_s - (time.monotonic() - started)
        if left < MIN_JOB_S:
            Recorder(results, part, name).row("job", status="skipped (budget)", seconds=0.0)
            continue
        timeout = SMOKE_TIMEOUT_S if args.smoke else min(job[4], left)
        print(f"\n=== {name} (part {part}), at most {timeout:.0f} s ===", flush=True)
        t0 = time.monotonic()
        status = run_job(job, plan, timeout, spawn=name in spawn)
        Recorder(results, part, name).row("job", status=status, seconds=time.monotonic() - t0)
        write_report()
    if "e" in args.parts:
        with open(results, "a") as f:  # part e's rows, derived from b, c and d, join the others
            for row in memory_per_token(read_rows(results)):
                f.write(json.dumps(row) + "\n")
    text = write_report()
    print("\n" + text, flush=True)
    print(f"total {time.monotonic() - started:.0f} s; report written to {md_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
