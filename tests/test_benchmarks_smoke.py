"""benchmarks/gpu_check.py, the one prepared GPU run, end to end on this CPU (``--smoke``): every part runs in its
own process and reports a result, the report prints its tables, and what the MFU and ratios rest on holds."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_gpu_check_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--smoke", "--out-dir", str(tmp_path),
               "--spawn", "parity_torch"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (jsonl,) = tmp_path.glob("results_cpu_*.jsonl")
    (md,) = tmp_path.glob("results_cpu_*.md")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]

    errors = [r for r in rows if r.get("status") == "error"]
    assert not errors, errors
    jobs = [r for r in rows if r["kind"] == "job"]
    assert len(jobs) == 11 and all(r["status"] == "ok" for r in jobs), jobs  # parity_torch in a fresh interpreter
    assert "spawned jobs: ['parity_torch']" in proc.stdout
    results = [r for r in rows if r["kind"] == "result" and r["status"] == "ok"]
    assert {r["part"] for r in results} == set("abcdefgh"), sorted({r["part"] for r in results})
    engines = {(r["part"], r["engine"]) for r in results if "engine" in r}
    assert {("b", "jax"), ("c", "torch"), ("d", "jax"), ("d", "torch"), ("f", "jax"), ("a", "jax"), ("g", "jax"),
            ("g", "torch"), ("h", "jax"), ("h", "torch")} <= engines

    # step() runs the very executable whose speed the headline row measured: no recompilation
    (api,) = [r for r in results if r.get("path") == "trainer.step()"]
    assert api["recompiles"] == 0
    # MFU's N: the formula's parameter count is the models' own (a tied head counted once), in both engines
    models = [r for r in rows if r["kind"] == "model"]
    assert {r["engine"] for r in models} == {"jax", "torch"}
    assert all(r["params"] == r["expected_params"] for r in models), models
    # parity on the device the run used: fp32 JAX logits equal transformers' (CPU here: 1e-5)
    assert all(r["max_abs_diff"] < 1e-5 for r in results if r["part"] == "a")

    text = md.read_text()
    for heading in ("## Training, bf16", "## Part e", "## Part f", "## Part a", "## Part g", "## Part h",
                    "## Issue 9's targets"):
        assert heading in text and heading in proc.stdout
    assert "| b | jax | trainer.train_step | 2 x 256 | no | xla |" in text
    assert "| b | jax | trainer.step() (0 recompilations) | 2 x 256 | no |" in text


def test_parameter_count_of_the_1b_preset():
    """MFU's N for issue 9's shape equals transformers' own count of the model (1,235,814,400, tied head once)."""
    import torch
    from gpu_common import PRESETS, llama_config, param_count
    from transformers import AutoModelForCausalLM

    config = llama_config(PRESETS["llama-3.2-1b"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert param_count(config) == sum(p.numel() for p in model.parameters()) == 1_235_814_400


def test_gpu_check_smoke_moe_preset(tmp_path):
    """``--preset olmoe-1b-7b`` (issue 29) smoke-run as its tiny OLMoE: parity and the JAX training part."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--smoke", "--preset", "olmoe-1b-7b",
               "--parts", "ab", "--out-dir", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (jsonl,) = tmp_path.glob("results_cpu_*.jsonl")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert not [r for r in rows if r.get("status") == "error"]
    jobs = [r for r in rows if r["kind"] == "job"]
    assert {r["job"] for r in jobs} == {"fixed_jax", "parity_torch", "parity_jax"} and all(r["status"] == "ok"
                                                                                          for r in jobs), jobs
    assert all(r["params"] == r["expected_params"] for r in rows if r["kind"] == "model")
    results = [r for r in rows if r["kind"] == "result" and r["status"] == "ok"]
    assert all(r["max_abs_diff"] < 1e-5 for r in results if r["part"] == "a")
    (api,) = [r for r in results if r.get("path") == "trainer.step()"]
    assert api["recompiles"] == 0


def test_parameter_count_of_the_olmoe_preset():
    """MFU's N for the MoE preset: all parameters equal transformers' count of OLMoE-1B-7B (6,919,161,856); the
    active ones (8 of 64 experts per token) are 1,282,017,280 — OLMoE's "1.3B active"."""
    import torch
    from gpu_common import PRESETS, llama_config, param_count
    from transformers import AutoModelForCausalLM

    config = llama_config(PRESETS["olmoe-1b-7b"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert param_count(config) == sum(p.numel() for p in model.parameters()) == 6_919_161_856
    assert param_count(config, active=True) == 1_282_017_280
