"""One process of the 2-process jax.distributed run of test_distributed.py (2 fake CPU devices each).

    JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=I \
        python -m tests.support.distributed_worker MODEL_DIR OUT_DIR

Trains the three mixed step() calls of sharding_worker on the default mesh (fsdp over the 4 devices of both
processes), saves the model (process 0 writes it), writes a checkpoint from both processes and resumes it in a
new trainer; process 0 writes the per-update losses and the next loss of both trainers to OUT_DIR.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"


def main(model_dir: str, out_dir: str) -> None:
    from itersft_jax.parallel import distributed
    assert distributed.initialize()  # before any JAX work: the environment names the coordinator
    import jax

    from tests.support import sharding_worker as worker

    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    trainer = worker.make(model_dir, out_dir, None)
    losses = worker.mixed_steps(trainer)
    trainer.save_model(os.path.join(out_dir, "saved"))  # every process takes part; process 0 writes
    # A checkpoint written by both processes (each its shards), then resumed by a new trainer in both.
    checkpoint = trainer.save_checkpoint(os.path.join(out_dir, "checkpoint-4"))
    continued = trainer.step(texts=worker.TEXTS[:5])["loss"]
    resumed = worker.make(model_dir, os.path.join(out_dir, "resumed"), None)
    resumed.resume_from_checkpoint(checkpoint)
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, "losses.json"), "w") as f:
            json.dump({"losses": losses, "mesh": dict(trainer.mesh.shape), "continued": continued,
                       "resumed": resumed.step(texts=worker.TEXTS[:5])["loss"]}, f)
    else:
        resumed.step(texts=worker.TEXTS[:5])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
