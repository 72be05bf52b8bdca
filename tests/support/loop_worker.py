"""One process of the whole-loop run of test_distributed.py: N jax.distributed processes on localhost, or one
process, with ``DEVICES`` fake CPU devices each (the same 4 global devices either way).

    [JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=I] \
        python tests/support/loop_worker.py DEVICES MODEL_DIR OUT_DIR [MISMATCH]

The loop: generate with logprobs -> step() on the filtered samples -> sample() -> forward_backward("ppo") +
optim_step -> forward / compute_logprobs / forward_backward_custom / evaluate -> save_state -> a new trainer
load_state -> the next update on both (bit-identical) -> save_model. Process 0 writes ``OUT_DIR/loop.json``.

``MISMATCH`` (an argument name): the last process passes a different value of it to one call, and every process
writes the error it got to ``OUT_DIR/error-<process>.txt``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={int(sys.argv[1])}"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PROMPTS = ["Question: what is two plus two?", "12 + 30 =", "def add(a, b):", "The quick"]
EVAL_TEXTS = ["hello world", "Generate, filter, then step.", "abc"]


def make(model_dir: str, out_dir: str):
    from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer

    return IterativeSFTTrainer(model_dir, args=IterativeSFTConfig(
        output_dir=out_dir, per_device_train_batch_size=2, learning_rate=3e-3, max_grad_norm=0.5,
        report_to="none", logging_steps=1, save_strategy="no", seed=0, gradient_checkpointing=False))


def low_level_round(trainer, data) -> dict:
    import jax.numpy as jnp

    fb = trainer.forward_backward(data, "ppo")
    custom = trainer.forward_backward_custom(
        data, lambda logprobs, inputs: (-jnp.sum(logprobs * inputs["mask"]) * 0.1, {}))
    step = trainer.optim_step()
    return {"ppo": fb.metrics["loss:sum"], "custom": custom.metrics["loss:sum"], "grad_norm": step["grad_norm"],
            "logprobs": [o["logprobs"].tolist() for o in fb.loss_fn_outputs]}


def mismatch_call(trainer, argument: str, differs: bool) -> None:
    """One call whose ``argument`` differs on this process when ``differs``."""
    prompts = PROMPTS[::-1] if differs and argument == "prompts" else PROMPTS
    max_new = 7 if differs and argument == "max_new_tokens" else 6
    if argument == "texts":
        trainer.step(texts=EVAL_TEXTS[:2] if differs else EVAL_TEXTS)
    else:
        trainer.generate(prompts, max_new_tokens=max_new, do_sample=True, seed=3)


def main(model_dir: str, out_dir: str, mismatch: str | None = None) -> None:
    from itersft_jax.parallel import distributed
    distributed.initialize()  # before any JAX work (one process: nothing to do)
    import jax
    import numpy as np

    from itersft_jax.shared.datum import samples_to_data

    assert jax.device_count() == 4
    trainer = make(model_dir, out_dir)
    if mismatch:
        try:
            mismatch_call(trainer, mismatch, jax.process_index() == jax.process_count() - 1)
            message = "no error"
        except ValueError as err:
            message = str(err)
        with open(os.path.join(out_dir, f"error-{jax.process_index()}.txt"), "w") as f:
            f.write(message)
        return
    out = trainer.generate(PROMPTS, num_return_sequences=4, do_sample=True, return_logprobs=True,
                           max_new_tokens=12, seed=1)
    # Filter: the completions whose mean logprob beats the median (a reward stand-in every process computes alike).
    means = [float(np.mean(lp)) if len(lp) else -1e9 for lp in out.logprobs]
    keep = [i for i, m in enumerate(means) if m >= np.median(means)]
    step = trainer.step(prompts=[PROMPTS[i // 4] for i in keep], completions=[out.texts[i] for i in keep])
    sampled = trainer.sample(PROMPTS[:2], num_samples=2, do_sample=True, max_new_tokens=8, seed=2)
    advantages = [1.0, -1.0, 0.5, -0.5]
    data = samples_to_data(sampled, advantages)
    first = low_level_round(trainer, data)
    forward = trainer.forward(data, "ppo")
    scored = trainer.compute_logprobs([list(p) + list(s) for p, s in zip(sampled.prompt_ids, sampled.sequences)])
    evaluation = trainer.evaluate(texts=EVAL_TEXTS)
    trainer.save_state(os.path.join(out_dir, "state"))
    resumed = make(model_dir, os.path.join(out_dir, "resumed"))
    resumed.load_state(os.path.join(out_dir, "state"))
    after = low_level_round(trainer, data)
    after_resumed = low_level_round(resumed, data)
    trainer.save_model(os.path.join(out_dir, "saved"))
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, "loop.json"), "w") as f:
            json.dump({"sequences": out.sequences, "logprobs": out.logprobs, "keep": keep,
                       "step_loss": step["loss"], "sampled": sampled.sequences,
                       "sampled_logprobs": sampled.logprobs, "first": first,
                       "forward": forward.metrics["loss:sum"], "scored": [s.tolist() for s in scored],
                       "eval_loss": evaluation["eval_loss"], "after": after, "after_resumed": after_resumed,
                       "global_step": resumed.state.global_step}, f)


if __name__ == "__main__":
    main(sys.argv[2], sys.argv[3], *sys.argv[4:])
