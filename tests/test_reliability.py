"""Nothing lost, nothing silent: kill -9 during saves, damaged checkpoints, secrets, clear errors, bounded
generate() compilations (issue 13). The README's "Reliability" table lists what each test shows."""

from __future__ import annotations

import os

import kill_resume

from itersft_jax.checkpoint import MANIFEST_FILE

# ----------------------------------------------------------------------------------------------------------
# kill -9 during saves (the whole 10-kill run: `python tests/kill_resume.py`)


def test_kill_9_during_saves_then_resume_is_bit_identical(tiny_model_dir, tmp_path):
    """A worker trains with save_steps=1 and is SIGKILLed inside a save; the output directory never holds a
    partial checkpoint-N, and resuming gives later losses and parameters bit-identical to a run that was
    never interrupted. On a non-atomic save the kill leaves a partial newest checkpoint-N."""
    model_dir, calls = tiny_model_dir("llama"), 5
    reference = []
    trainer = kill_resume.make_trainer(model_dir, str(tmp_path / "reference"))
    kill_resume.run_calls(trainer, 0, calls, reference.append)
    with open(tmp_path / "workers.log", "w") as log:
        for kill, (kill_call, fraction) in enumerate([(2, 0.3), (3, 0.7)]):  # a call here is mostly its save
            out = str(tmp_path / f"kill-{kill}")
            left = kill_resume.kill_during_call(model_dir, out, calls, kill_call, fraction, log)
            partial = [name for name in os.listdir(out)
                       if name.startswith("checkpoint-") and not os.path.isfile(os.path.join(out, name, MANIFEST_FILE))]
            assert not partial, f"kill {kill}: partial checkpoints visible after the kill: {left}"
            trainer.args.output_dir = out  # the reference trainer resumes (its train step is compiled already)
            path = trainer.resume_from_checkpoint(True)
            start = trainer.counters()["calls"]
            lines = [f"RESUMED {os.path.basename(path)} {start}"]
            kill_resume.run_calls(trainer, start, calls, lines.append)
            ok, resumed, detail = kill_resume.check_resume(lines, reference)
            assert ok, f"kill {kill} in call {kill_call} (left: {left}), resumed from {resumed}: {detail}"
            assert not [n for n in os.listdir(out) if n.startswith(".")], "stale temporaries were not removed"
