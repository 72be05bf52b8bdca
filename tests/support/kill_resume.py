"""kill -9 during checkpoint saves, then resume: are the later losses bit-identical to an uninterrupted run?

    python -m tests.support.kill_resume [--kills 10] [--calls 10] [--seed 0]

A worker process trains a tiny Llama with ``save_steps=1`` and ``save_total_limit=2``; every ``step()``
call is one update, so every call ends with a checkpoint save, which the worker announces. The harness SIGKILLs
the worker a random fraction of a typical save's duration after it announced the save of a random call after the
first (the rename into place comes after ~0.7 of a save, the rotation of old checkpoints after it), then a fresh
trainer in a new process resumes with ``resume_from_checkpoint(True)``, runs the remaining calls and reports each
call's loss and the final parameters' SHA-256. A kill passes when every later loss is bit-identical to the
uninterrupted run's and the final parameters are too. Prints one row per kill and exits non-zero on a
failure. ``tests/test_reliability.py`` runs a lean version (two kills) in the suite.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from tests.support import module_command, root_on_path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("the quick brown fox jumps over lazy dog hello world rejection sampling keeps verified completions "
         "JAX and PyTorch compute same loss 12 + 30 = 42").split()
SAMPLES_PER_CALL = 4


def make_trainer(model_dir: str, output_dir: str):
    from itersft_jax import IterativeSFTConfig
    from itersft_jax.trainer import IterativeSFTTrainer

    args = IterativeSFTConfig(output_dir=output_dir, per_device_train_batch_size=SAMPLES_PER_CALL, learning_rate=3e-3,
                              save_strategy="steps", save_steps=1, save_total_limit=2, logging_steps=1, seed=0,
                              gradient_checkpointing=False, report_to="none", disable_tqdm=True)
    return IterativeSFTTrainer(model_dir, args=args)


def call_texts(call: int) -> list[str]:
    """The samples of step() call ``call``: a fixed function of the call index, lengths varying."""
    rng = random.Random(call)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 24))) for _ in range(SAMPLES_PER_CALL)]
    if call == 0:  # the longest sample first: the packed row length never grows, the step compiles once
        texts[0] = " ".join(WORDS * 2)
    return texts


def params_digest(trainer) -> str:
    import jax
    import numpy as np
    from flax import nnx

    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(nnx.to_pure_dict(trainer.params))):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def run_calls(trainer, start: int, stop: int, emit) -> None:
    for call in range(start, stop):
        t0 = time.perf_counter()
        loss = trainer.step(texts=call_texts(call))["loss"]
        emit(f"LOSS {call} {float(loss).hex()} {time.perf_counter() - t0:.4f}")
    emit(f"DIGEST {params_digest(trainer)}")


def announce_saves(trainer, emit) -> None:
    """``SAVING N`` before each checkpoint save of ``trainer`` and ``SAVED N <seconds>`` after it: the harness kills
    between the two."""
    save = trainer.save_checkpoint

    def announced(checkpoint_dir: str | None = None) -> str:
        step, t0 = trainer.state.global_step, time.perf_counter()
        emit(f"SAVING {step}")
        path = save(checkpoint_dir)
        emit(f"SAVED {step} {time.perf_counter() - t0:.4f}")
        return path

    trainer.save_checkpoint = announced  # what the save cadence calls


def worker(model_dir: str, output_dir: str, calls: int, resume: bool) -> None:
    """Subprocess entry: train ``calls`` calls (after resuming when asked), one line per event on stdout."""
    def emit(line: str) -> None:
        print(line, flush=True)

    trainer = make_trainer(model_dir, output_dir)
    announce_saves(trainer, emit)
    start = 0
    if resume:
        path = trainer.resume_from_checkpoint(True)
        start = trainer.counters()["calls"]
        emit(f"RESUMED {os.path.basename(path)} {start}")
    run_calls(trainer, start, calls, emit)


def parse(lines: list[str]) -> tuple[dict[int, str], dict[int, float], str | None, str | None]:
    """-> (loss hex per call, seconds per call, final digest, resumed checkpoint)."""
    losses, seconds, digest, resumed = {}, {}, None, None
    for line in lines:
        kind, *rest = line.split()
        if kind == "LOSS":
            losses[int(rest[0])], seconds[int(rest[0])] = rest[1], float(rest[2])
        elif kind == "DIGEST":
            digest = rest[0]
        elif kind == "RESUMED":
            resumed = rest[0]
    return losses, seconds, digest, resumed


def spawn(model_dir: str, output_dir: str, calls: int, resume: bool, log) -> subprocess.Popen:
    cmd = module_command("kill_resume", "worker", model_dir, output_dir, str(calls))
    if resume:
        cmd.append("--resume")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1, env=root_on_path())


def run_to_end(model_dir: str, output_dir: str, calls: int, resume: bool, log) -> list[str]:
    proc = spawn(model_dir, output_dir, calls, resume, log)
    lines = [line.strip() for line in proc.stdout]
    if proc.wait() != 0:
        raise RuntimeError(f"worker exited with {proc.returncode}; see {log.name}")
    return lines


def kill_during_save(model_dir: str, output_dir: str, calls: int, kill_call: int, fraction: float, log) -> str:
    """Start a worker and SIGKILL it ``fraction`` of a typical save's duration after it announced the save of call
    ``kill_call`` (``checkpoint-<kill_call + 1>``). Returns what the output directory holds right after the kill."""
    proc = spawn(model_dir, output_dir, calls, False, log)
    durations = []
    for line in proc.stdout:
        kind, step, *rest = line.split()
        if kind == "SAVED" and int(step) > 1:  # the first save compiles the gathering of the parameters
            durations.append(float(rest[0]))
        if kind == "SAVING" and int(step) == kill_call + 1:
            break
    time.sleep(fraction * statistics.median(durations))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    return " ".join(sorted(os.listdir(output_dir)))


def check_resume(lines: list[str], reference: list[str]) -> tuple[bool, str, str]:
    """(passed, resumed checkpoint, detail) of a resumed run against the uninterrupted one."""
    losses, _, digest, resumed = parse(lines)
    ref_losses, _, ref_digest, _ = parse(reference)
    differing = [c for c, loss in losses.items() if ref_losses.get(c) != loss]
    if differing or digest != ref_digest or not losses:
        return False, resumed, f"calls with other losses {differing}; params equal: {digest == ref_digest}"
    return True, resumed, f"{len(losses)} later losses and params bit-identical"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="kept afterwards when given")
    args = parser.parse_args()
    from tests.support.offline import make_tokenizer, save_tiny_model

    workdir = args.workdir or tempfile.mkdtemp(prefix="kill_resume-")
    model_dir = save_tiny_model(os.path.join(workdir, "model"), "llama", make_tokenizer())
    log = open(os.path.join(workdir, "workers.log"), "w")
    reference = run_to_end(model_dir, os.path.join(workdir, "reference"), args.calls, False, log)
    rng = random.Random(args.seed)
    print(f"{'kill':>4} | {'call':>4} | {'at':>4} | {'output_dir right after the kill':<58} | {'resumed from':<13} | "
          f"outcome")
    passed = 0
    for k in range(args.kills):
        out = os.path.join(workdir, f"kill-{k}")
        kill_call, fraction = rng.randint(2, args.calls - 1), rng.uniform(0.0, 1.0)
        left = kill_during_save(model_dir, out, args.calls, kill_call, fraction, log)
        try:
            ok, resumed, detail = check_resume(run_to_end(model_dir, out, args.calls, True, log), reference)
        except RuntimeError as err:
            ok, resumed, detail = False, "-", f"resume failed: {err}"
        passed += ok
        print(f"{k:>4} | {kill_call:>4} | {fraction:>4.2f} | {left[:58]:<58} | {resumed or '-':<13} | "
              f"{'PASS' if ok else 'FAIL'}: {detail}", flush=True)
    print(f"{passed} of {args.kills} kills resumed bit-identically. 'call': the kill was aimed into this step() call "
          f"(0-based; it saves checkpoint-<call+1>), 'at' x a typical save's duration after the worker announced "
          f"that save. "
          f"Work dir: {workdir}")
    return 0 if passed == args.kills else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), resume="--resume" in sys.argv)
    else:
        sys.exit(main())
