"""A mixture of experts on 8 fake CPU devices equals one device, expert-parallel (issue 29).

One subprocess (tests/support/moe_sharding_worker.py) runs every mesh — ``data:2,expert:4`` (expert:4 on 8
devices), ``fsdp:2,expert:4``, ``data:2,expert:2,tensor:2`` — on a tiny Mixtral with 8 experts (2 per token) and the
load-balancing loss on: sharding_worker's three mixed step() calls (GA 2, clipping, weight decay, Adam epsilon 1e-6
as in test_sharding.py), then ``save_model``. This process runs the same on one device. Tolerances (fp32, other
reduction orders): losses and load-balancing losses 1e-5 absolute; the saved model 1e-5 relative per tensor in norm.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from tests.support import module_command, root_on_path
from tests.support.offline import save_tiny_model

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def expert_run(tmp_path_factory, tokenizer):
    """(the 8-device worker's results, the 1-device results, root)."""
    from tests.support import moe_sharding_worker as worker

    root = tmp_path_factory.mktemp("moe-sharding")
    model_dir = str(root / "model")
    # Widths 64 / 32 (experts) / 320 vocab divide by 2 (fsdp, tensor), 8 experts by 4 (expert).
    save_tiny_model(model_dir, "mixtral", tokenizer, num_local_experts=8, output_router_logits=True,
                    router_aux_loss_coef=0.1)
    proc = subprocess.run(module_command("moe_sharding_worker", model_dir, str(root)), capture_output=True, text=True,
                          timeout=900, env=root_on_path())
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(root / "results.json") as f:
        results = json.load(f)
    return results, worker.run(model_dir, str(root / "single"), None), root


def _saved(directory) -> dict[str, np.ndarray]:
    from itersft_jax.io.weights import read_safetensors

    return read_safetensors(os.path.join(directory, "saved"))


def test_every_expert_mesh_equals_one_device(expert_run):
    results, single, root = expert_run
    assert len(single["losses"]) == 4 and len(single["aux"]) == 3  # 2 + 1 + 1 updates in 3 calls
    expected = _saved(root / "single")
    for mesh, got in results.items():
        np.testing.assert_allclose(got["losses"], single["losses"], atol=1e-5, err_msg=mesh)
        np.testing.assert_allclose(got["aux"], single["aux"], atol=1e-5, err_msg=mesh)
        saved = _saved(root / mesh.replace(":", "").replace(",", "_"))
        assert sorted(saved) == sorted(expected)
        for name, value in expected.items():
            err = float(np.linalg.norm(saved[name] - value)) / float(np.linalg.norm(value))
            assert err <= 1e-5, (mesh, name, err)


def test_each_device_holds_its_share_of_the_experts(expert_run):
    # Experts' params + Adam moments: 1/4 per device on data:2,expert:4 (the 8 experts split 4 ways), 1/8 on
    # fsdp:2,expert:4 (and their width over fsdp), 1/4 on data:2,expert:2,tensor:2; one device holds them all.
    # The other parameters: replicated over expert and data, halved by fsdp (norms excepted).
    results, single, _ = expert_run
    fractions = {mesh: (got["experts_fraction"], got["others_fraction"]) for mesh, got in results.items()}
    print("largest per-device fraction of the (experts, other parameters) state bytes:", fractions)
    assert single["experts_fraction"] == pytest.approx(1.0)
    assert fractions["data:2,expert:4"][0] == pytest.approx(1 / 4, rel=0.01)
    assert fractions["fsdp:2,expert:4"][0] == pytest.approx(1 / 8, rel=0.01)
    assert fractions["data:2,expert:2,tensor:2"][0] == pytest.approx(1 / 4, rel=0.01)
    assert fractions["data:2,expert:4"][1] == pytest.approx(1.0)


def test_generate_expert_parallel_equals_one_device(expert_run):
    from tests.support import moe_sharding_worker as worker

    results, single, _ = expert_run
    assert results[worker.GENERATE_ON]["generate"] == single["generate"]
