"""What the PyTorch engine needs to run in several processes (DDP, FSDP): launch checks, the same-samples rule,
and releasing FSDP2's gathered parameters after forwards without a backward."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
from transformers import TrainingArguments

from itersft_jax.shared.data import Example


def check_distributed_setup(accelerator, args: TrainingArguments) -> None:
    """ValueError when the processes a launcher started would silently not train together: ``torch.distributed``
    has several processes but accelerate left each one alone (no GPU and no ``use_cpu``), or FSDP is asked for
    and accelerate did not enable it (it never does on the CPU, where it runs DDP instead)."""
    import torch.distributed as dist

    state = accelerator.state
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world > 1 and accelerator.num_processes == 1:
        raise ValueError(
            f"torch.distributed runs {world} processes, but accelerate set up no distributed training "
            f"({state.distributed_type}): each process would train alone on all the samples. accelerate found no "
            f"GPU; on a CPU-only machine pass `use_cpu=True` (or set ACCELERATE_USE_CPU=1) to train data-parallel "
            f"over gloo.")
    fsdp_asked = bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_asked and getattr(state, "fsdp_plugin", None) is None:
        raise ValueError(
            f"FSDP is asked for (`fsdp` or an accelerate config with distributed_type FSDP), but accelerate set up "
            f"{state.distributed_type} on {state.device}: accelerate enables FSDP only on accelerators (CUDA, XPU, "
            f"NPU, HPU, ...), never on the CPU, where this run would not shard anything. Launch on GPUs, or drop "
            f"the FSDP setting to train data-parallel (DDP).")


def _differs_across_processes(accelerator, digest) -> bool:
    """Whether any process's ``digest`` (a hashlib object) differs from this one's: 8 bytes gathered, on every
    process alike."""
    mine = torch.tensor([int.from_bytes(digest.digest()[:8], "little", signed=True)], device=accelerator.device)
    return bool((accelerator.gather(mine) != mine).any())


def check_same_samples(accelerator, examples: list[Example]) -> None:
    """ValueError on every process unless all processes passed the same samples: a call's samples are split across
    the processes by the trainer, so each must pass the whole call (else updates silently drop samples, or the
    processes disagree on the number of updates and wait on each other forever)."""
    digest = hashlib.sha256()
    for ex in examples:
        for array in (ex.input_ids, ex.labels):
            digest.update(len(array).to_bytes(8, "little"))
            digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    if _differs_across_processes(accelerator, digest):
        raise ValueError(
            f"the {accelerator.num_processes} processes passed different samples: every process must pass the same "
            f"samples (the trainer splits each call's samples across them). Samples made per process (e.g. by "
            f"generate() on each process's prompts) must be gathered first, e.g. with accelerate.utils.gather_object.")


def check_same_data(accelerator, data, loss_fn: str, config: dict) -> None:
    """ValueError on every process unless all processes passed the same ``Datum`` s, ``loss_fn`` and config to a
    low-level call (the engine splits the data across them, as ``step()`` splits its samples)."""
    digest = hashlib.sha256(repr((loss_fn, sorted(config.items()))).encode())
    for datum in data:
        digest.update(np.ascontiguousarray(datum.model_input, dtype=np.int64).tobytes())
        for key in sorted(datum.loss_fn_inputs):
            array = np.ascontiguousarray(datum.loss_fn_inputs[key])
            digest.update(f"{key}{array.dtype}{array.shape}".encode())
            digest.update(array.tobytes())
    if _differs_across_processes(accelerator, digest):
        raise ValueError(
            f"`data`: the {accelerator.num_processes} processes passed different data (or loss_fn / loss_fn_config): "
            f"every process must pass the same call (the engine splits the data across them). Data made per process "
            f"must be gathered first, e.g. with accelerate.utils.gather_object.")


def sum_gradients_across_processes(parameters: list[torch.nn.Parameter]) -> None:
    """Sum each parameter's ``.grad`` over the processes (a missing one counts as zeros), in place: every process
    then holds the gradient of the loss summed over all processes' data."""
    import torch.distributed as dist

    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def gather_pass(accelerator, loss_sum: float, padded: int, logprobs: dict[int, np.ndarray]):
    """A low-level pass's results of every process: the summed loss and padded positions, and each datum's
    logprobs by its index in the call's data (every process gets all of them)."""
    import torch.distributed as dist

    loss_sum, padded = sum_over_processes(accelerator, loss_sum, padded)
    pieces: list = [None] * accelerator.num_processes
    dist.all_gather_object(pieces, logprobs)
    merged = {i: lp for piece in pieces for i, lp in piece.items()}
    return loss_sum, int(padded), [merged[i] for i in range(len(merged))]


def sum_over_processes(accelerator, *values: float) -> list[float]:
    """Each of ``values`` summed over the processes (in fp64), on every process."""
    totals = accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=accelerator.device), reduction="sum")
    return [float(x) for x in totals]


class AccelerateState:
    """accelerate's process-wide state (``PartialState``, ``AcceleratorState``) as it was when this was made, and
    :meth:`restore`, which puts it back when something emptied it since: every new ``TrainingArguments`` that sets up
    its devices resets it (transformers' ``_setup_devices``), which left a live trainer's ``accelerator`` without
    ``num_processes`` — a config built for another trainer, or a constructor that refused its arguments, broke a
    working trainer."""

    def __init__(self):
        from accelerate.state import AcceleratorState, PartialState

        self.partial, self.accelerator = dict(PartialState._shared_state), dict(AcceleratorState._shared_state)

    def restore(self) -> None:
        from accelerate.state import AcceleratorState, PartialState

        if not PartialState._shared_state:
            PartialState._shared_state.update(self.partial)
        if not AcceleratorState._shared_state:
            AcceleratorState._shared_state.update(self.accelerator)


def release_gathered_parameters(model: torch.nn.Module) -> None:
    """Reshard FSDP2 units after forwards without a backward (evaluation, generation): the root unit never reshards
    after its forward (its parameters are expected back in the backward), so they would stay gathered on every
    process until the next update."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
