"""The mesh check of test_sampler.py, in one process of 8 fake CPU devices:

    python -m tests.support.sampler_mesh_worker MODEL_DIR OUT_DIR

For ``data:2,fsdp:4`` and ``fsdp:4,tensor:2`` (imported, ``run(..., None)`` is the one-device reference):
a trainer's greedy and seeded sampled generations (with logprobs) and how many decode slots one device holds.
Writes ``OUT_DIR/results.json``.
"""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

PROMPTS = [[1, 5, 9, 200], [1, 7, 8, 9, 10, 11, 12], [1, 40], [1, 33, 34], [1, 250, 251, 252, 253], [1, 6],
           [1, 17, 18, 19], [1, 90]]


def run(model_dir: str, out_dir: str, mesh: str | None) -> dict:
    from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer
    from itersft_jax.parallel.mesh import data_parallel_size

    args = IterativeSFTConfig(output_dir=os.path.join(out_dir, str(mesh)), report_to="none", mesh=mesh,
                              per_device_train_batch_size=1, gradient_checkpointing=False, save_strategy="no")
    trainer = IterativeSFTTrainer(model_dir, args=args)
    greedy = trainer.generate(input_ids=PROMPTS, max_new_tokens=10, eos_token_id=[])
    sampled = trainer.generate(input_ids=PROMPTS[:4], num_return_sequences=2, max_new_tokens=10, do_sample=True,
                               temperature=1.5, seed=3, eos_token_id=[2], return_logprobs=True)
    return {"greedy": greedy.sequences, "sampled": sampled.sequences, "logprobs": sampled.logprobs,
            "slots": max(b for b, *_ in greedy.stats["chunk_shapes"]),
            "slots_per_device": greedy.stats["slots_per_device"], "data_parallel": data_parallel_size(trainer.mesh)}


def main(model_dir: str, out_dir: str) -> None:
    results = {mesh: run(model_dir, out_dir, mesh) for mesh in ("data:2,fsdp:4", "fsdp:4,tensor:2")}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
