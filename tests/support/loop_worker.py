"""One process of the whole-loop run of test_distributed.py: N jax.distributed processes on localhost, or one
process, with ``DEVICES`` fake CPU devices each (the same 4 global devices either way).

    [JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=I] \
        python -m tests.support.loop_worker DEVICES MODEL_DIR OUT_DIR [OTHER_STATE]

The loop: generate with logprobs -> step() on the filtered samples -> sample() -> forward_backward("ppo") +
optim_step -> forward / compute_logprobs / forward_backward_custom / evaluate -> save_state -> a new trainer
load_state -> the next update on both (bit-identical) -> save_model. Process 0 writes ``OUT_DIR/loop.json``.

With several processes, first one call per argument (prompts, max_new_tokens, seed, texts, data) where the last
process passes a different value; every process writes the error each call gave and its seconds to
``OUT_DIR/errors-<process>.json`` (the refused calls leave the trainer as it was: the loop still equals one
process's).
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={int(sys.argv[1])}"

PROMPTS = ["Question: what is two plus two?", "12 + 30 =", "def add(a, b):", "The quick"]
EVAL_TEXTS = ["hello world", "Generate, filter, then step.", "abc"]


def make(model_dir: str, out_dir: str):
    """The trainer of both runs (adam_epsilon 1e-6, as sharding_worker: Adam's update of a near-zero gradient
    would turn its last-bit differences into parameter differences)."""
    from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer

    return IterativeSFTTrainer(model_dir, eval_dataset={"texts": EVAL_TEXTS}, args=IterativeSFTConfig(
        output_dir=out_dir, per_device_train_batch_size=2, learning_rate=3e-3, max_grad_norm=0.5, adam_epsilon=1e-6,
        report_to="none", logging_steps=1, save_strategy="no", seed=0, gradient_checkpointing=False,
        eval_strategy="steps", eval_steps=1))


def low_level_round(trainer, data, custom: bool = True) -> dict:
    """forward_backward("ppo") [+ forward_backward_custom] + optim_step: the losses, grad norm and logprobs."""
    import jax.numpy as jnp

    fb = trainer.forward_backward(data, "ppo")
    out = {"ppo": fb.metrics["loss:sum"], "logprobs": [o["logprobs"].tolist() for o in fb.loss_fn_outputs]}
    if custom:
        out["custom"] = trainer.forward_backward_custom(
            data, lambda logprobs, inputs: (-jnp.sum(logprobs * inputs["mask"]) * 0.1, {})).metrics["loss:sum"]
    out["grad_norm"] = trainer.optim_step()["grad_norm"]
    return out


def mismatches(trainer, differs: bool) -> dict[str, list]:
    """One call per argument, that argument different on this process when ``differs``: the error each gave here
    and its seconds."""
    import time

    from itersft_jax.shared.datum import Datum

    data = [Datum([1, 2, 3, 4], {"target_tokens": [2, 3, 4, 5], "weights": [1.0, 1.0, 1.0, 1.0]})]
    calls = {
        "prompts": lambda: trainer.generate(PROMPTS[::-1] if differs else PROMPTS, max_new_tokens=4, seed=3),
        "max_new_tokens": lambda: trainer.generate(PROMPTS, max_new_tokens=5 if differs else 4, seed=3),
        "seed": lambda: trainer.sample(PROMPTS, num_samples=2, do_sample=True, max_new_tokens=4,
                                       seed=4 if differs else 3),
        "texts": lambda: trainer.step(texts=EVAL_TEXTS[:2] if differs else EVAL_TEXTS),
        "data": lambda: trainer.forward_backward(data * (2 if differs else 1)),
    }
    errors = {}
    for name, call in calls.items():
        started = time.perf_counter()
        try:
            call()
            errors[name] = ["no error", time.perf_counter() - started]
        except ValueError as err:
            errors[name] = [str(err), time.perf_counter() - started]
    return errors


def resume_other(model_dir: str, out_dir: str, state: str, data) -> dict:
    """A state another process count wrote (``state``, waited for: the runs go side by side), loaded here and
    continued with the same update as there."""
    import time

    manifest = os.path.join(state, "itersft_manifest.json")
    deadline = time.monotonic() + 300
    while not os.path.exists(manifest):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no state at {state}")
        time.sleep(0.5)
    trainer = make(model_dir, os.path.join(out_dir, "from-other"))
    trainer.load_state(state)
    return low_level_round(trainer, data, custom=False)


def main(model_dir: str, out_dir: str, other_state: str | None = None) -> None:
    from itersft_jax.parallel import distributed
    distributed.initialize()  # before any JAX work (one process: nothing to do)
    import jax
    import numpy as np

    from itersft_jax.shared.datum import samples_to_data

    assert jax.device_count() == 4
    trainer = make(model_dir, out_dir)
    if jax.process_count() > 1:  # refused calls first: they must leave the trainer as it was
        errors = mismatches(trainer, jax.process_index() == jax.process_count() - 1)
        with open(os.path.join(out_dir, f"errors-{jax.process_index()}.json"), "w") as f:
            json.dump(errors, f)
    import time
    t0 = time.perf_counter()

    def mark(what):
        nonlocal t0
        print(f"PHASE {what} {time.perf_counter() - t0:.2f}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
    out = trainer.generate(PROMPTS, num_return_sequences=4, do_sample=True, return_logprobs=True,
                           max_new_tokens=8, seed=1)
    # Filter: the completions whose mean logprob beats the median (a reward stand-in every process computes alike).
    means = [float(np.mean(lp)) if len(lp) else -1e9 for lp in out.logprobs]
    mark('generate')
    keep = [i for i, m in enumerate(means) if m >= np.median(means)]
    step = trainer.step(prompts=[PROMPTS[i // 4] for i in keep], completions=[out.texts[i] for i in keep])
    mark('step')
    sampled = trainer.sample(PROMPTS, num_samples=4, do_sample=True, max_new_tokens=8, seed=2)  # generate's shapes
    mark('sample')
    advantages = [float(a) for a in np.tile([1.0, -1.0, 0.5, -0.5], 4)]
    data = samples_to_data(sampled, advantages)
    first = low_level_round(trainer, data)
    mark('round')
    forward = trainer.forward(data, "ppo")
    mark('forward')
    scored = trainer.compute_logprobs([list(p) + list(s) for p, s in zip(sampled.prompt_ids, sampled.sequences)])
    mark('logprobs')
    evaluation = trainer.evaluate(texts=EVAL_TEXTS)
    mark('eval')
    trainer.save_state(os.path.join(out_dir, "state"))
    resumed = make(model_dir, os.path.join(out_dir, "resumed"))
    resumed.load_state(os.path.join(out_dir, "state"))
    mark('save+load')
    after = low_level_round(trainer, data, custom=False)  # (a new trainer compiles each program it runs)
    after_resumed = low_level_round(resumed, data, custom=False)
    mark('rounds')
    trainer.save_model(os.path.join(out_dir, "saved"))
    mark('save_model')
    from_other = resume_other(model_dir, out_dir, other_state, data) if other_state else None
    evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, "loop.json"), "w") as f:
            json.dump({"sequences": out.sequences, "logprobs": out.logprobs, "keep": keep,
                       "step_loss": step["loss"], "sampled": sampled.sequences,
                       "sampled_logprobs": sampled.logprobs, "first": first,
                       "forward": forward.metrics["loss:sum"], "scored": [s.tolist() for s in scored],
                       "eval_loss": evaluation["eval_loss"], "after": after, "after_resumed": after_resumed,
                       "global_step": resumed.state.global_step, "from_other": from_other,
                       "eval_strategy_losses": evals}, f)


if __name__ == "__main__":
    main(*sys.argv[2:5])
