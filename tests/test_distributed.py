"""Two jax.distributed processes on localhost (CPU, 2 fake devices each) equal one process on one device:
per-update losses within 1e-5, the saved model's tensors within 1e-5 relative (per tensor, in norm; fp32); a
checkpoint both processes write resumes bit-identically."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import numpy as np

from tests.support import module_command, root_on_path
from tests.support.offline import save_tiny_model

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path, tokenizer):
    from safetensors.numpy import load_file

    from tests.support import sharding_worker as worker

    model_dir = save_tiny_model(tmp_path / "model", "llama", tokenizer)
    out = tmp_path / "two"
    port = _free_port()
    env = root_on_path(dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2"))
    procs = [subprocess.Popen(module_command("distributed_worker", model_dir, str(out)),
                              env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    try:
        results = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-4000:]
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
