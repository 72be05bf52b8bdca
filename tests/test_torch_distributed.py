"""The torch backend in 2 CPU processes (gloo) equals 1 process: DDP through torchrun, FSDP through an accelerate
config (tiny Llama, fp32, offline).

Each launch runs tests/support/torch_distributed_worker.py on 2 ranks; the 1-process reference runs the same calls in
this process with per_device_train_batch_size doubled, so both sides form the same micro-batches and updates (3 calls:
GA 2, clipping, weight decay, a partial final group, odd sample counts leaving a rank without a sample).

Tolerances: the ranks pad their own samples (shorter rows than the 1-process micro-batch) and the gradients are
summed across processes in another order, so fp32 results differ by reduction order only (seen: ~1e-7 on losses);
1e-4 on per-update losses and grad norms, and 1e-4 of each tensor's largest magnitude on the final parameters,
leave room for that and nothing else: a wrong token weighting, a missed or doubled gradient reduction or a
per-shard grad norm is off by percents.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from itersft_torch import IterativeSFTConfig, IterativeSFTTrainer
from tests.support import root_on_path
from tests.support.torch_distributed_worker import GENERATE, config, low_level_round, train

HERE = Path(__file__).resolve().parent
WORKER = "tests.support.torch_distributed_worker"  # run as a module (-m) on every rank
LAUNCH_TIMEOUT_S = 180
FSDP2_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_reshard_after_forward: true
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_sync_module_states: false
  fsdp_offload_params: false
"""


@pytest.fixture(scope="module")
def reference(llama_dir, tmp_path_factory):
    """The 1-process run: its observations and its final parameters."""
    out = tmp_path_factory.mktemp("one-process")
    trainer = IterativeSFTTrainer(llama_dir, args=IterativeSFTConfig(**config(str(out), world=1)))
    result = train(trainer)
    params = {n: p.detach().numpy().copy() for n, p in trainer.model.named_parameters()}
    return result, params


def launch(command: list[str], out: Path) -> None:
    """Run a 2-process launch; on failure or timeout kill its whole process group and show its output."""
    env = root_on_path(dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                            TOKENIZERS_PARALLELISM="false"))
    env.pop("ACCELERATE_USE_CPU", None)
    proc = subprocess.Popen(command, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{command[:3]} did not finish in {LAUNCH_TIMEOUT_S} s (a collective left waiting?):\n"
                    f"{output[-6000:]}")
    assert proc.returncode == 0, f"{command[:3]} failed:\n{output[-8000:]}"


def results(out: Path, phase: str) -> list[dict]:
    return [json.loads((out / phase / f"rank{r}.json").read_text()) for r in range(2)]


def saved_parameters(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))


def assert_equals_one_process(ranks: list[dict], final_dir: Path, reference,
                              checkpoint_files: dict[str, str] | None) -> None:
    """``checkpoint_files``: how the launch's checkpoint file names differ from 1 process's (old -> new names);
    None: the launch saved no checkpoint."""
    ref, ref_params = reference
    for result in ranks:  # every rank reports the global statistics
        assert result["world"] == 2
        np.testing.assert_allclose(result["losses"], ref["losses"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(result["grad_norms"], ref["grad_norms"], rtol=1e-4)
        assert result["num_tokens"] == ref["num_tokens"] and result["global_step"] == ref["global_step"] == 6
        for i, (stats, ref_stats) in enumerate(zip(result["stats"], ref["stats"])):
            for key in ("num_tokens", "samples", "updates", "global_step", "num_input_tokens_seen"):
                assert stats[key] == ref_stats[key], key
            assert stats["loss"] == pytest.approx(ref_stats["loss"], abs=1e-4)
            assert stats["padded_tokens"] == ranks[0]["stats"][i]["padded_tokens"], "padded_tokens differ by rank"
        assert result["eval"][0] == pytest.approx(ref["eval"][0], abs=1e-4) and result["eval"][1] == ref["eval"][1]
        assert result["saved_when_returned"], "save_model returned on this rank before the model was written"
        assert "passed different samples" in (result["mismatch"] or ""), "different samples per rank not refused"
        rank = str(result["rank"])  # each rank generated its own prompts, with its own max_new_tokens
        assert result["generated"] == {rank: ref["generated"][rank]}, f"generate() on rank {rank}"
        # The same checkpoint files as 1 process (one model, optimizer, trainer state), RNG states per process,
        # all there when on_save fires on any process.
        renamed = {**(checkpoint_files or {}), "rng_state.pth": "rng_state_0.pth rng_state_1.pth"}
        assert result["checkpoints"] == ({} if checkpoint_files is None else {
            c: sorted(n for f in files for n in renamed.get(f, f).split()) for c, files in ref["checkpoints"].items()})
    assert [r["progress_bar"] for r in ranks] == [True, False], "the progress bar is drawn by rank 0 only"
    assert ref["losses"][0] > 0 and min(ref["grad_norms"]) > 1.0, "the run should exercise clipping"
    assert len(ref["losses"]) == 6 and set(ref["generated"]) == {str(r) for r in range(len(GENERATE))}
    params = saved_parameters(final_dir)
    assert params.keys() == ref_params.keys()
    for name, ref_param in ref_params.items():
        scale = np.abs(ref_param).max()
        assert np.abs(params[name] - ref_param).max() <= 1e-4 * scale, name


# ----------------------------------------------------------------------------------------------------------


def test_ddp_two_processes_equal_one(llama_dir, reference, tmp_path):
    """torchrun, 2 processes, gloo (use_cpu=True): DDP gives the 1-process losses, grad norms, statistics, saved
    parameters, checkpoints and generations; without use_cpu the trainer refuses to train each process alone."""
    launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", WORKER,
            "ddp", llama_dir, str(tmp_path)], tmp_path)
    refused = results(tmp_path, "no-use-cpu")
    assert all(r["error"] is not None and "use_cpu" in r["error"] for r in refused), refused
    ranks = results(tmp_path, "ddp")
    assert {r["wrapped"] for r in ranks} == {"DistributedDataParallel"}
    assert_equals_one_process(ranks, tmp_path / "ddp" / "final", reference, checkpoint_files={})
    assert len(list((tmp_path / "ddp").rglob("events.out.tfevents*"))) == 1, "one tensorboard log"
    assert_low_level_equals_one_process(results(tmp_path, "ddp-low-level"), llama_dir, tmp_path / "one-low-level")


def assert_low_level_equals_one_process(ranks: list[dict], llama_dir: str, out: Path) -> None:
    """The low-level loop under DDP (the data split across the processes, gradients summed once) equals one process:
    the same sampled tokens (same seed), losses, logprobs and grad norms within 1e-5 (fp32, another summation order);
    a state saved by the 2 processes and loaded by 2 new trainers continues exactly as the saving run does; data that
    differ by process are refused on every process, naming `data`."""
    ref = low_level_round(llama_dir, str(out))
    for r in ranks:
        assert r["sequences"] == ref["sequences"]
        np.testing.assert_allclose(np.concatenate(r["sample_logprobs"]), np.concatenate(ref["sample_logprobs"]),
                                   rtol=0, atol=1e-5)
        for key in ("first_loss", "grad_norm"):
            assert r[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-5), key
        for key in ("first_logprobs", "compute_logprobs"):
            np.testing.assert_allclose(np.concatenate(r[key]), np.concatenate(ref[key]), rtol=0, atol=1e-5)
        assert r["resumed"] == r["continued"], "load_state did not resume the 2-process run exactly"
        assert r["continued"]["loss"] == pytest.approx(ref["continued"]["loss"], rel=1e-5)
        assert r["mismatch"] is not None and "`data`" in r["mismatch"], r["mismatch"]
    assert ranks[0]["continued"] == ranks[1]["continued"], "the processes' replicas differ"


def test_fsdp_two_processes_equal_one(llama_dir, reference, tmp_path):
    """accelerate launch with an FSDP2 config, 2 processes: refused as such on a CPU (accelerate would run DDP).
    With accelerate's device gate lifted (see the worker), FSDP2 from that config (reshard after forward = FULL_SHARD)
    and FSDP1 from TrainingArguments (FULL_SHARD, use_orig_params) really shard the parameters (also after
    evaluate() and generate()) and equal 1 process like DDP; FSDP1 saves nothing (see the worker)."""
    (tmp_path / "fsdp.yaml").write_text(FSDP2_CONFIG)
    launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp.yaml"),
            "--main_process_port", "0", "-m", WORKER, "fsdp", llama_dir, str(tmp_path)], tmp_path)
    refused = results(tmp_path, "fsdp-refused")
    assert all(r["error"] is not None and "FSDP" in r["error"] for r in refused), refused
    total = sum(p.size for p in reference[1].values())
    # transformers' FSDP checkpoint: the gathered model beside its FSDP save, accelerate's optimizer file
    fsdp2_files = {"optimizer.pt": "optimizer.bin", "model.safetensors": "model.safetensors pytorch_model_fsdp.bin"}
    for phase, wrapper, files in [("fsdp2", "FSDPLlamaForCausalLM", fsdp2_files),
                                  ("fsdp1", "FullyShardedDataParallel", None)]:
        ranks = results(tmp_path, phase)
        assert {(r["fsdp"], r["wrapped"]) for r in ranks} == {(True, wrapper)}, phase
        for r in ranks:  # after training, evaluate() and generate(): half of the parameters on each process
            assert all(n <= 0.51 * total for n in r["local_parameters"]), (phase, r["local_parameters"], total)
        assert_equals_one_process(ranks, tmp_path / phase / "final", reference, checkpoint_files=files)
