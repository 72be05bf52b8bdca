"""The PyTorch workers of benchmarks/gpu_check.py, each run in its own process (see gpu_check.py).

The peer is a plain PyTorch loop as a practitioner writes it: ``transformers``' ``LlamaForCausalLM`` with SDPA
attention, fp32 master weights under bf16 autocast, fused AdamW, gradient clipping at 1.0 (the trainer's default
``max_grad_norm``), the model's own loss; weights random (``from_config``), initialised on the device.
"""

from __future__ import annotations

import gc
import os

import numpy as np
from gpu_common import (
    PRESETS,
    Plan,
    Recorder,
    Timer,
    is_out_of_memory,
    iterative_model,
    llama_config,
    mfu,
    param_count,
    run_iterative,
    small_preset,
)


def _setup(plan: Plan, rec: Recorder) -> str:
    import importlib.metadata as md

    import torch

    dev = plan.device
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    rec.row("env", engine="torch", device=name, torch=torch.__version__, cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version() if dev == "cuda" else None, transformers=md.version("transformers"))
    return name


def _sync(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


def _peak_gib(dev: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None


def _reset_peak(dev: str) -> None:
    import torch

    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Loop:
    """The PyTorch training loop: model, fused AdamW, one ``update(ids)`` per optimizer step."""

    def __init__(self, hf_config, dev: str, checkpointing: bool):
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        with torch.device(dev):  # initialise on the device: 1.24B parameters on a CPU take long
            model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
        self.model = model.to(dev).float().train()
        self.model.config.use_cache = False
        if checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=dev == "cuda")
        self.dev = dev

    def update(self, ids):
        import torch

        with torch.autocast(self.dev, dtype=torch.bfloat16):
            loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def drop_grads(self) -> None:
        self.opt.zero_grad(set_to_none=True)


def _train_row(plan: Plan, rec: Recorder, loop: Loop, hf_config, device: str, b: int, t: int, remat: str) -> bool:
    """One ``[b, t]`` row of the loop: tokens/s, MFU, peak memory (reset per row). False when it did not fit."""
    import torch

    label = f"{b} x {t}"
    common = dict(engine="torch", batch=b, seq=t, remat=remat, path="PyTorch loop", attention="sdpa")
    try:
        ids = torch.as_tensor(np.random.default_rng(t + b).integers(3, hf_config.vocab_size, size=(b, t)),
                              device=loop.dev)
        _reset_peak(loop.dev)
        timer = Timer()
        loop.update(ids)
        _sync(loop.dev)
        first = timer.lap()
        for _ in range(plan.warmup - 1):
            loop.update(ids)
        _sync(loop.dev)
        timer.lap()
        for _ in range(plan.steps):
            loss = loop.update(ids)
        _sync(loop.dev)
        tps = b * t * plan.steps / timer.lap()
        rec.row(label=label, status="ok", tokens_per_s=tps, mfu=mfu(tps, hf_config, t, device, plan),
                peak_gib=_peak_gib(loop.dev), first_s=first, loss=float(loss), **common)
        return True
    except Exception as err:  # noqa: BLE001 - out of memory is a result; the caller goes on or stops
        rec.failure(label, err, is_out_of_memory(err), **common)
    # Out of the except block, the traceback (and the activations its frames hold) is gone: free the memory.
    loop.drop_grads()
    _reset_peak(loop.dev)
    return False


def fixed(plan: Plan, rec: Recorder) -> None:
    """Part c: ``[B, seq]`` without checkpointing, B increasing, stopping at the first B that does not fit."""
    device = _setup(plan, rec)
    hf_config = llama_config(PRESETS[plan.preset])
    loop = Loop(hf_config, plan.device, checkpointing=False)
    rec.row("model", engine="torch", params=sum(p.numel() for p in loop.model.parameters()),
            expected_params=param_count(hf_config))
    for b in plan.batches:
        if not _train_row(plan, rec, loop, hf_config, device, b, plan.seq, "no"):
            return


def long_context(plan: Plan, rec: Recorder) -> None:
    """Part d, PyTorch side: ``[1, T]`` with gradient checkpointing, every length tried (32k only if it fits)."""
    device = _setup(plan, rec)
    hf_config = llama_config(PRESETS[plan.preset])
    loop = Loop(hf_config, plan.device, checkpointing=True)
    for t in plan.long_lengths:
        if not _train_row(plan, rec, loop, hf_config, device, 1, t, "checkpointing"):
            return


def parity(plan: Plan, rec: Recorder) -> None:
    """Part a, PyTorch side: a small random model (the tiny preset of the run's family: for Llama GQA, tied head,
    llama3 RoPE) saved for the JAX worker, with its fp32 logits on this device for a right-padded batch."""
    import torch
    from transformers import AutoModelForCausalLM

    _setup(plan, rec)
    hf_config = llama_config(PRESETS[small_preset(plan)])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").float().eval()
    path = os.path.join(plan.workdir, "parity")
    model.save_pretrained(path)
    ids = np.random.default_rng(0).integers(3, hf_config.vocab_size, size=(2, 64))
    mask = np.ones_like(ids)
    mask[1, 40:] = 0
    with torch.no_grad():
        logits = model.to(plan.device)(input_ids=torch.as_tensor(ids, device=plan.device),
                                       attention_mask=torch.as_tensor(mask, device=plan.device)).logits
    np.savez(os.path.join(path, "logits.npz"), input_ids=ids.astype(np.int32), attention_mask=mask.astype(np.int32),
             logits=logits.float().cpu().numpy(), device=plan.device)
    rec.row("saved", engine="torch", path=path, logits_shape=list(logits.shape))


def iterative(plan: Plan, rec: Recorder) -> None:
    """Part g, PyTorch side: saves the workload's random model (with a tokenizer), then runs the torch backend."""
    import torch
    from common import offline
    from transformers import AutoModelForCausalLM

    make_tokenizer = offline().make_tokenizer

    _setup(plan, rec)
    torch.manual_seed(0)
    path = os.path.join(plan.workdir, "iterative")
    AutoModelForCausalLM.from_config(llama_config(iterative_model(plan))).float().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    run_iterative(plan, rec, "torch")


def sampler(plan: Plan, rec: Recorder) -> None:
    """Part h, the reference: ``transformers`` ``generate`` (bf16 weights, SDPA, static KV cache of the default
    kind) on one batch of ``plan.sampler[5]`` rows of the same shape, no EOS stop: tokens/s."""
    import torch
    from transformers import AutoModelForCausalLM

    dev = plan.device
    _setup(plan, rec)
    hf_config = llama_config(PRESETS[plan.preset])
    _, n, prompt_len, new_tokens, _, rows = plan.sampler
    label = f"{rows} rows, prompt {prompt_len}, {new_tokens} new"
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
    model = model.to(dev, dtype=torch.bfloat16 if dev == "cuda" else torch.float32).eval()
    ids = torch.randint(3, hf_config.vocab_size, (max(1, rows // n), prompt_len), device=dev)
    try:
        with torch.no_grad():
            model.generate(input_ids=ids[:1], max_new_tokens=2, do_sample=True, pad_token_id=0)  # warm-up
            _sync(dev)
            timer = Timer()
            out = model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                                 num_return_sequences=n, eos_token_id=None, pad_token_id=0)
            _sync(dev)
            seconds = timer.lap()
        tokens = (out.shape[1] - prompt_len) * out.shape[0]
        rec.row(label=label, status="ok", engine="torch", seconds=seconds, tokens_per_s=tokens / seconds,
                rows=out.shape[0], peak_gib=_peak_gib(dev))
    except Exception as err:  # noqa: BLE001
        rec.failure(label, err, is_out_of_memory(err))
