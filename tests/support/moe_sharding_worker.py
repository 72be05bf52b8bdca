"""Runs the expert-parallel checks of test_moe_sharding.py in one process of 8 fake CPU devices (or imported: 1 device).

    python -m tests.support.moe_sharding_worker MODEL_DIR OUT_DIR

For each mesh of ``MESHES``: the per-update losses (and load-balancing losses) of sharding_worker's three mixed
step() calls, the saved model (``save_model``), the largest per-device fraction of the expert weights' and of the
other parameters' bytes (params + optimizer state); greedy generations on one mesh. Writes ``OUT_DIR/results.json``.
"""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

from tests.support.sharding_worker import generations, make, mixed_steps  # noqa: E402

# expert:4 takes 4 of the 8 devices: the other factor of 2 goes to data.
MESHES = ("data:2,expert:4", "fsdp:2,expert:4", "data:2,expert:2,tensor:2")
GENERATE_ON = "fsdp:2,expert:4"


def run(model_dir: str, out_dir: str, mesh: str | None) -> dict:
    trainer = make(model_dir, os.path.join(out_dir, "trainer"), mesh)
    stats: list = []
    losses = mixed_steps(trainer, stats)
    aux = [call["aux_loss"] for call in stats]  # each call's mean load-balancing loss
    trainer.save_model(os.path.join(out_dir, "saved"))
    result = {"losses": losses, "aux": aux, **state_fractions(trainer)}
    if mesh in (None, GENERATE_ON):
        result["generate"] = generations(trainer)
    return result


def state_fractions(trainer) -> dict:
    """Largest bytes one device holds of the experts' params + optimizer state, over one whole copy; the same for
    every other parameter."""
    import jax

    totals: dict = {}
    for path, x in jax.tree_util.tree_flatten_with_path((trainer.train_state.params,
                                                         trainer.train_state.opt_state))[0]:
        kind = "experts" if "experts" in jax.tree_util.keystr(path) else "others"
        whole, per_device = totals.setdefault(kind, [0, {}])
        totals[kind][0] = whole + x.nbytes
        for shard in x.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return {f"{kind}_fraction": max(per_device.values()) / whole for kind, (whole, per_device) in totals.items()}


def main(model_dir: str, out_dir: str) -> None:
    import jax

    assert jax.device_count() == 8, jax.devices()
    results = {mesh: run(model_dir, os.path.join(out_dir, mesh.replace(":", "").replace(",", "_")), mesh)
               for mesh in MESHES}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
