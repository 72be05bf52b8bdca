"""``itersft demo``: the quick run writes a loadable HF model, metrics.json and the plot; the CLI helps."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from itersft_jax import cli
from itersft_jax.demo import DemoConfig, build_tokenizer, check, run

KEYS = {"round", "phase", "pass_rate", "correct", "kept", "sampled", "trained_on", "loss", "seconds"}


def check_output_dir(path: str, rounds: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(os.path.join(path, "metrics.json")) as f:
        summary = json.load(f)
    assert [m["round"] for m in summary["rounds"]] == list(range(rounds + 1))
    assert all(KEYS <= set(m) for m in summary["rounds"])
    assert all(0.0 <= m["pass_rate"] <= 1.0 for m in summary["rounds"])
    assert os.path.getsize(os.path.join(path, "curve.png")) > 1000
    model = AutoModelForCausalLM.from_pretrained(os.path.join(path, "model"))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "model"))
    ids = tokenizer(["abc="], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    return summary


def test_quick_demo_jax(tmp_path):
    lines = []
    out = str(tmp_path / "demo")
    metrics = run(DemoConfig.quick(output_dir=out), log=lines.append)
    assert len(lines) == 4 and "pass rate" in lines[-2]
    summary = check_output_dir(out, rounds=2)
    assert summary["rounds"] == json.loads(json.dumps(metrics))
    assert metrics[1]["sampled"] == 32 * 2 and metrics[0]["trained_on"] == 32


@pytest.mark.skipif(importlib.util.find_spec("itersft_torch.trainer") is None,
                    reason="the torch backend (itersft_torch/trainer.py) has not landed")
def test_quick_demo_torch(tmp_path):
    out = str(tmp_path / "demo-torch")
    assert cli.main(["demo", "--quick", "--backend", "torch", "--rounds", "1", "--output-dir", out]) == 0
    check_output_dir(out, rounds=1)


def test_checker_and_tokenizer():
    tok = build_tokenizer()
    ids = tok("abc=").input_ids
    assert ids[0] == tok.bos_token_id and len(ids) == 5
    assert tok.decode(ids, skip_special_tokens=True) == "abc="
    assert check("abc", "cba") and check("abc", " cba") and not check("abc", "cbaa") and not check("abc", "")


def test_help():
    for argv in (["--help"], ["demo", "--help"]):
        result = subprocess.run([sys.executable, "-m", "itersft_jax.cli", *argv], capture_output=True,
                                text=True, timeout=60, check=False)
        assert result.returncode == 0 and "usage: itersft" in result.stdout
    assert "--samples-per-prompt" in result.stdout and "--backend" in result.stdout
