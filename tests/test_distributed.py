"""Two jax.distributed processes on localhost (CPU, 2 fake devices each) equal one process on one device:
per-update losses within 1e-5, the saved model's tensors within 1e-5 relative (per tensor, in norm; fp32); a
checkpoint both processes write resumes bit-identically. The whole loop (generate -> step -> sample -> low-level
update -> save_state / load_state, ``support/loop_worker.py``) on 2 processes x 2 devices equals 1 process x 4
devices (tokens identical, losses and logprobs within 1e-5, the resumed update bit-identical), and a process
passing different arguments gets an error naming them on every process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.support import module_command, root_on_path
from tests.support.offline import save_tiny_model

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(worker: str, args: list[str], processes: int, port: int) -> list[subprocess.Popen]:
    """``processes`` interpreters running ``tests.support.<worker> args`` (``jax.distributed`` when several)."""
    env = root_on_path()
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes))
    return [subprocess.Popen(module_command(worker, *args),
                             env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for i in range(processes)]


def _wait(procs: list[subprocess.Popen], timeout: float) -> None:
    try:
        results = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-4000:]


def test_two_processes_equal_one(tmp_path, tokenizer):
    from safetensors.numpy import load_file

    from tests.support import sharding_worker as worker

    model_dir = save_tiny_model(tmp_path / "model", "llama", tokenizer)
    out = tmp_path / "two"
    _wait(_launch("distributed_worker", [model_dir, str(out)], 2, _free_port()), 400)
    with open(out / "losses.json") as f:
        two = json.load(f)
    assert two["mesh"] == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 1}
    assert two["resumed"] == two["continued"]  # the 2-process checkpoint resumes bit-identically
    assert os.path.isfile(out / "checkpoint-4" / "itersft_manifest.json")

    single = worker.make(model_dir, str(tmp_path / "one"), None)
    np.testing.assert_allclose(two["losses"], worker.mixed_steps(single), atol=1e-5)
    single.save_model(str(tmp_path / "one" / "saved"))
    ours, theirs = load_file(out / "saved" / "model.safetensors"), load_file(tmp_path / "one" / "saved" /
                                                                               "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        assert np.linalg.norm(ours[name] - expected) <= 1e-5 * np.linalg.norm(expected), name


@pytest.fixture(scope="module")
def loop_runs(tmp_path_factory, tokenizer):
    """The whole loop on 2 processes x 2 devices and, beside it, on 1 process x 4 devices."""
    root = tmp_path_factory.mktemp("loop")
    model_dir = save_tiny_model(root / "model", "llama", tokenizer)
    (root / "two").mkdir()
    (root / "one").mkdir()
    procs = (_launch("loop_worker", ["2", model_dir, str(root / "two")], 2, _free_port()) +
             _launch("loop_worker", ["4", model_dir, str(root / "one"), str(root / "two" / "state")], 1, 0))
    _wait(procs, 600)
    return root


def test_whole_loop_two_processes_equal_one(loop_runs):
    from safetensors.numpy import load_file

    two, one = (json.loads((loop_runs / name / "loop.json").read_text()) for name in ("two", "one"))
    assert len(two["sequences"]) == 16 and any(two["sequences"])
    assert two["sequences"] == one["sequences"] and two["sampled"] == one["sampled"]  # tokens identical
    assert two["keep"] == one["keep"]
    for name in ("logprobs", "sampled_logprobs", "scored"):
        for ours, theirs in zip(two[name], one[name]):
            np.testing.assert_allclose(ours, theirs, atol=1e-5, err_msg=name)
    for name in ("step_loss", "forward", "eval_loss"):
        np.testing.assert_allclose(two[name], one[name], atol=1e-5, err_msg=name)
    for round_ in ("first", "after"):
        for name in {"ppo", "custom"} & set(one[round_]):
            np.testing.assert_allclose(two[round_][name], one[round_][name], atol=1e-5, err_msg=round_)
        np.testing.assert_allclose(two[round_]["grad_norm"], one[round_]["grad_norm"], rtol=1e-5)
        for ours, theirs in zip(two[round_]["logprobs"], one[round_]["logprobs"]):
            np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert two["after_resumed"] == two["after"]  # resumed bit for bit within the 2-process run
    # the 2-process state loaded by 1 process x 4 devices continues as the 2-process run does
    np.testing.assert_allclose(one["from_other"]["ppo"], two["after"]["ppo"], atol=1e-5)
    np.testing.assert_allclose(one["from_other"]["grad_norm"], two["after"]["grad_norm"], rtol=1e-5)
    for ours, theirs in zip(one["from_other"]["logprobs"], two["after"]["logprobs"]):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # eval_strategy="steps": an evaluation after each update, the same losses
    assert len(two["eval_strategy_losses"]) >= 3
    np.testing.assert_allclose(two["eval_strategy_losses"], one["eval_strategy_losses"], atol=1e-5)
    ours, theirs = (load_file(loop_runs / name / "saved" / "model.safetensors") for name in ("two", "one"))
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        assert np.linalg.norm(ours[name] - expected) <= 1e-5 * np.linalg.norm(expected), name


def test_different_arguments_refused_on_every_process(loop_runs):
    for process in range(2):
        with open(loop_runs / "two" / f"errors-{process}.json") as f:
            errors = json.load(f)
        assert list(errors) == ["prompts", "max_new_tokens", "seed", "texts", "data"]
        for name, (message, seconds) in errors.items():
            assert f"`{name}` differs between the 2 processes" in message, (process, message)
            assert seconds < 10, (name, seconds)  # a compare, never a hang


def test_demo_on_two_processes_gives_the_one_process_run(tmp_path):
    """``itersft demo --quick`` on 2 ``jax.distributed`` processes x 1 device prints the rounds (pass rates, counts,
    losses) of 1 process x 2 devices (before: RuntimeError, the demo touched JAX before the trainer started
    ``jax.distributed``)."""
    def command(out: str) -> list[str]:
        return [sys.executable, "-m", "itersft_jax.apps.cli", "demo", "--quick", "--no-plot", "--output-dir", out]

    port = _free_port()
    env = root_on_path()
    procs = [subprocess.Popen(command(str(tmp_path / "two")), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                                  JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    procs.append(subprocess.Popen(command(str(tmp_path / "one")), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")))
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-4000:]

    def rounds(stdout: str) -> list[str]:  # the round lines without their seconds
        return [line.rsplit("|", 1)[0] for line in stdout.splitlines() if line.startswith("round")]

    two_0, two_1, one = (rounds(out) for out, _ in results)
    assert len(one) >= 2 and two_0 == two_1 == one
