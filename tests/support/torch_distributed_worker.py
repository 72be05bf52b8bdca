"""One process of the torch backend's multi-process test (tests/test_torch_distributed.py).

Launched twice by the test, 2 CPU processes each time (gloo), each launch running phases one after the other:

* ``ddp``: ``torchrun --standalone --nproc_per_node 2 torch_distributed_worker.py ddp MODEL_DIR OUT``; phases
  ``no-use-cpu`` (the trainer must refuse) and ``ddp``;
* ``fsdp``: ``accelerate launch --config_file fsdp.yaml torch_distributed_worker.py fsdp MODEL_DIR OUT``; phases
  ``fsdp-refused`` (the trainer must refuse), ``fsdp2`` (the launch's accelerate config) and ``fsdp1``
  (``TrainingArguments.fsdp``).

The test imports :func:`train` to produce the 1-process reference in its own process, so both sides run the same
calls on the same samples. Each rank writes ``OUT/<phase>/rank<r>.json`` (statistics, per-update logs, generated
tokens, what it saw on disk) and rank 0 the saved model; the test compares them with the 1-process run.

FSDP on a CPU: accelerate 1.15 never enables FSDP there — its state stays ``MULTI_CPU`` (plain DDP) whatever the
accelerate config says (``AcceleratorState`` switches to FSDP only for CUDA/XPU/NPU/... process groups). The trainer
refuses such a run (phase ``fsdp-refused``). To run accelerate's and torch's real FSDP code on this CPU machine the
``fsdp`` phases then lift that one gate (:func:`lift_accelerate_fsdp_device_gate`): the state is marked FSDP on the
plain ``cpu`` device; the plugin (from the accelerate config), the wrapping (``fully_shard`` / FSDP1 flat
parameters), the collectives (gloo) and the state-dict gathering are accelerate's and torch's, unchanged.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# Generation after training: rank r generates GENERATE[r] (different prompts and lengths per rank: under FSDP the
# ranks' forwards are collectives, so generate() must keep them in step however long each rank decodes).
GENERATE = [(["Question: what is", "The quick"], 3), (["def add(a, b):"], 6)]


def config(output_dir: str, world: int, **overrides) -> dict:
    """The run's IterativeSFTConfig fields: 4 samples per update (2 per micro-batch on 1 process, 1 per process on
    2), GA 2, clipping (grad norms here are 2-6), weight decay, a log per update, a checkpoint every 3 updates (one
    in the middle of a call)."""
    fields = dict(output_dir=output_dir, per_device_train_batch_size=2 // world, gradient_accumulation_steps=2,
                  learning_rate=1e-3, weight_decay=0.5, max_grad_norm=1.0, gradient_checkpointing=False,
                  logging_steps=1, save_strategy="steps", save_steps=3, report_to="none", use_cpu=True,
                  include_num_input_tokens_seen="non_padding", seed=7)
    return {**fields, **overrides}


def calls(tokenizer) -> list[dict]:
    """Three step() calls of 8, 7 and 5 samples (updates of 4): full groups, then a trailing micro-batch of one
    sample (7 and 5 are odd: one rank gets no sample in it), then an update of that one micro-batch only."""
    rng = np.random.default_rng(0)

    def ids(n: int) -> list[list[int]]:
        return [rng.integers(3, len(tokenizer), size=int(rng.integers(4, 20))).tolist() for _ in range(n)]

    masked = ids(5)
    labels = [[-100] * (len(x) // 2) + x[len(x) // 2:] for x in masked]  # loss on the second half only
    prompts = ["Q: two plus two?", "Q: 12 + 30?", "Say hi.", "Name a fox.", "Q: 7 * 6?", "Count to three.", "Why?"]
    completions = [" four", " 42", " hi there", " a quick brown fox", " 42.", " one two three", " because"]
    return [{"input_ids": ids(8)}, {"prompts": prompts, "completions": completions},
            {"input_ids": masked, "labels": labels}]


def train(trainer, save: bool = True) -> dict:
    """The three calls, evaluate, save_model (unless ``save`` is False) and generate: what this rank observed, as
    JSON-able values. The final parameters are in ``output_dir/final/model.safetensors`` (rank 0 writes them)."""
    from transformers import AutoModelForCausalLM, TrainerCallback

    checkpoints = {}

    class ListCheckpoint(TrainerCallback):
        """Lists the new checkpoint when on_save fires: on every rank it must be complete by then."""

        def on_save(self, args, state, control, **kwargs):
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            checkpoints[path.name] = sorted(f.name for f in path.iterdir())

    trainer.add_callback(ListCheckpoint)
    rank = trainer.args.process_index
    mismatch = None
    if trainer.accelerator.num_processes > 1:  # each rank passes its own sample: refused everywhere, nothing changes
        try:
            trainer.step(input_ids=[[5, 6, 7 + rank]])
        except ValueError as err:
            mismatch = str(err)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):  # the progress bar (forced on in main) goes to stderr
        stats = [dict(trainer.step(**kwargs)) for kwargs in calls(trainer.processing_class)]
    local = [_local_parameters(trainer)]
    evaluation = trainer.evaluate(**calls(trainer.processing_class)[0])
    local.append(_local_parameters(trainer))
    final = os.path.join(trainer.args.output_dir, "final")
    if save:
        trainer.save_model(final)
    else:
        _save_gathered_fsdp1(trainer, final)
    # Every rank reads the saved model as soon as save_model returns: the writer must be done by then.
    saved = os.path.exists(os.path.join(final, "model.safetensors"))
    if saved and save:
        AutoModelForCausalLM.from_pretrained(final)
    generated = {}
    for r, (prompts, new_tokens) in enumerate(GENERATE):
        if trainer.accelerator.num_processes == 1 or r == rank:
            generated[str(r)] = trainer.generate(prompts=prompts, max_new_tokens=new_tokens).sequences
    local.append(_local_parameters(trainer))
    logs = [e for e in trainer.state.log_history if "loss" in e and "eval_loss" not in e]
    return {"stats": stats, "losses": [e["loss"] for e in logs], "grad_norms": [e["grad_norm"] for e in logs],
            "num_tokens": [e["num_tokens"] for e in logs], "global_step": trainer.state.global_step,
            "eval": [evaluation["eval_loss"], evaluation["eval_num_tokens"]], "saved_when_returned": saved,
            "generated": generated, "checkpoints": checkpoints, "progress_bar": "step:" in stderr.getvalue(),
            "mismatch": mismatch,
            "rank": rank, "world": trainer.accelerator.num_processes, "fsdp": bool(trainer.is_fsdp_enabled),
            "wrapped": type(trainer.model_wrapped).__name__, "local_parameters": local}


def low_level_round(model_dir: str, output_dir: str) -> dict:
    """The low-level loop on a fresh trainer: sample -> forward_backward("importance_sampling") + optim_step ->
    compute_logprobs -> save_state -> one more update, which a second fresh trainer repeats after load_state; on
    several processes also a call whose data differ by process. What this process observed, JSON-able."""
    from itersft_jax.shared.datum import samples_to_data
    from itersft_torch import IterativeSFTConfig, IterativeSFTTrainer

    world = int(os.environ.get("WORLD_SIZE", "1"))

    def build(name: str):
        fields = config(os.path.join(output_dir, name), world=1, learning_rate=1e-2, save_strategy="no",
                        logging_steps=100, per_device_train_batch_size=1)
        return IterativeSFTTrainer(model_dir, args=IterativeSFTConfig(**fields))

    trainer = build("low-level")
    out = trainer.sample(prompts=["Q: two plus two?", "Say hi.", "Name a fox."], num_samples=2, max_new_tokens=5,
                         do_sample=True, seed=3)
    data = samples_to_data(out, advantages=[1.0, -1.0, 0.5, -0.5, 2.0, -2.0])  # 6 data: 3 on each of 2 processes
    first = trainer.forward_backward(data, "importance_sampling")
    step = trainer.optim_step()
    logprobs = trainer.compute_logprobs([row for row in out.sequences[:3]])
    state = os.path.join(output_dir, "low-level-state")
    trainer.save_state(state)

    def next_update(t) -> dict:
        fb = t.forward_backward(data[:5], "cross_entropy")
        return {"loss": fb.metrics["loss:sum"], "logprobs": [o["logprobs"].tolist() for o in fb.loss_fn_outputs],
                **{k: v for k, v in t.optim_step().items() if k in ("grad_norm", "global_step")},
                "params": float(sum(p.detach().double().abs().sum() for p in t.model.parameters()))}

    continued = next_update(trainer)
    resumed_trainer = build("low-level-resumed")
    resumed_trainer.load_state(state)
    resumed = next_update(resumed_trainer)
    mismatch = None
    if world > 1:  # one process passes other data: refused on every process
        try:
            trainer.forward_backward(data[:2 + int(os.environ["RANK"])], "importance_sampling")
        except ValueError as err:
            mismatch = str(err)
    return {"sequences": [list(map(int, row)) for row in out.sequences],
            "sample_logprobs": [list(map(float, lp)) for lp in out.logprobs],
            "first_loss": first.metrics["loss:sum"],
            "first_logprobs": [o["logprobs"].tolist() for o in first.loss_fn_outputs],
            "grad_norm": step["grad_norm"], "compute_logprobs": [lp.tolist() for lp in logprobs],
            "continued": continued, "resumed": resumed, "mismatch": mismatch}


def _local_parameters(trainer) -> int:
    """Parameter elements this rank holds (FSDP2's DTensors report the global shape: count the local shard; FSDP1's
    parameters are views of the local shard of its flat parameters)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in trainer.model_wrapped.parameters())


def _save_gathered_fsdp1(trainer, path: str) -> None:
    """FSDP1's full parameters, gathered without ``offload_to_cpu`` (accelerate's ``get_state_dict`` always
    offloads, and torch 2.13's FSDP1 segfaults offloading CPU parameters to the CPU), written by rank 0."""
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = trainer.model_wrapped
    with FullyShardedDataParallel.summon_full_params(model, writeback=False):
        params = {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for n, p in model.named_parameters()}
    if trainer.args.process_index == 0:
        os.makedirs(path, exist_ok=True)
        save_file(params, os.path.join(path, "model.safetensors"))
    trainer.accelerator.wait_for_everyone()


def lift_accelerate_fsdp_device_gate() -> None:
    """Let accelerate's FSDP run on the CPU (see the module docstring): after ``AcceleratorState`` is built with an
    FSDP plugin on a gloo (``MULTI_CPU``) process group, mark it FSDP on the plain ``cpu`` device (accelerate's
    ``cpu:0`` is refused by FSDP1's device check for CPU parameters). Test-only; nothing else is changed."""
    import torch
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            for state in (PartialState._shared_state, self.__dict__):
                state.update(distributed_type=DistributedType.FSDP, device=torch.device("cpu"))
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = patched


def _build(model_dir: str, output_dir: str, **overrides):
    from itersft_torch import IterativeSFTConfig, IterativeSFTTrainer

    args = IterativeSFTConfig(**config(output_dir, world=int(os.environ["WORLD_SIZE"]), **overrides))
    return IterativeSFTTrainer(model_dir, args=args)


def _write(out: Path, phase: str, result: dict) -> None:
    (out / phase).mkdir(parents=True, exist_ok=True)
    (out / phase / f"rank{os.environ['RANK']}.json").write_text(json.dumps(result))


def _expect_refusal(out: Path, phase: str, model_dir: str, **overrides) -> None:
    try:
        _build(model_dir, str(out / phase), **overrides)
    except ValueError as err:
        _write(out, phase, {"error": str(err)})
    else:
        _write(out, phase, {"error": None})


def main(mode: str, model_dir: str, out: str) -> None:
    import itersft_jax.shared.flow as flow

    flow.PROGRESS_BAR_MIN_UPDATES = 1  # show the bar for these short calls: only rank 0 may draw it
    out_dir = Path(out)
    if mode == "ddp":
        # Without use_cpu, accelerate finds no GPU and leaves each process alone although torchrun started two.
        _expect_refusal(out_dir, "no-use-cpu", model_dir, use_cpu=False)
        # tensorboard: its writer must exist on the main process only
        _write(out_dir, "ddp", train(_build(model_dir, str(out_dir / "ddp"), report_to="tensorboard")))
        _write(out_dir, "ddp-low-level", low_level_round(model_dir, str(out_dir / "ddp")))
    elif mode == "fsdp":
        _expect_refusal(out_dir, "fsdp-refused", model_dir)  # accelerate would silently run DDP
        lift_accelerate_fsdp_device_gate()
        _write(out_dir, "fsdp2", train(_build(model_dir, str(out_dir / "fsdp2"))))
        # FSDP1 through TrainingArguments (transformers' route), FULL_SHARD with the original parameters; no
        # checkpoints or save_model: their full state dict offloads to the CPU, which segfaults on CPU parameters
        fsdp1 = {"version": 1, "use_orig_params": True, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                 "sync_module_states": False}
        trainer = _build(model_dir, str(out_dir / "fsdp1"), fsdp="full_shard auto_wrap", fsdp_config=fsdp1,
                         save_strategy="no")
        _write(out_dir, "fsdp1", train(trainer, save=False))
    else:
        raise ValueError(f"mode must be 'ddp' or 'fsdp', got {mode!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
