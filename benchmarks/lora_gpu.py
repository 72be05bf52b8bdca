"""GPU: LoRA on a Llama-3-8B-shaped model — the JAX engine's trainer vs a PyTorch + PEFT loop (issue 11).

Issue 11's GPU target: a Llama-3-8B-shaped model (random weights, built from its config directly on the GPU) with
LoRA r=16 on every linear layer but the head trains at ``[4, 2048]`` in bf16 in <= 40 GB of an H100 (remat
allowed); tokens/s and MFU next to the PyTorch + PEFT loop's. Each run is its own process (a fresh allocator
whose peak is that run's own):

* ``jax``: the ``IterativeSFTTrainer`` users build — ``peft_config=LoraConfig(r=16, lora_alpha=32,
  target_modules="all-linear")``, ``bf16=True``, ``gradient_checkpointing`` per ``--remat`` — with the base loaded
  in bf16 (``model_init_kwargs={"dtype": "bfloat16"}``: never materialized in fp32, whatever the trainer's default
  for a LoRA base; an fp32 copy would be 32 GB). Random weights from the family's initializers on the device
  (``gpu_jax.random_model_loader``, standing in for reading 16 GB of safetensors). Timed: the trainer's own
  jitted ``train_step`` on a pre-built ``[1, B, T]`` update, then ``trainer.step()`` on the same shape.
* ``torch``: ``LlamaForCausalLM.from_config`` in bf16 on the GPU with SDPA, ``peft.get_peft_model`` with the same
  ``LoraConfig`` (PEFT keeps the adapters in fp32), non-reentrant gradient checkpointing per ``--remat``, bf16
  autocast, fused AdamW over the adapters, clipping at 1.0, the model's own loss.

MFU uses LoRA's model FLOPs per token, the same for both engines: ``4 N + 6 N_lora + 12 L D T`` — the frozen
weights need the forward and the input gradient (2N + 2N) but no weight gradient; ``N`` counts the parameters as
``gpu_common.param_count`` does (embedding included), attention as in ``gpu_check.py``. Rematerialized
forwards are not counted (model FLOPs, not hardware FLOPs). Peak memory is the process's high-water mark
(JAX: ``peak_bytes_in_use``; torch: ``max_memory_allocated``), construction included.

    python benchmarks/lora_gpu.py                       # llama-3-8b, [4, 2048], remat, both engines
    python benchmarks/lora_gpu.py --runs jax:remat jax:none torch:remat torch:none --steps 5
    python benchmarks/lora_gpu.py --smoke               # a tiny Llama on this CPU: both workers end to end

Unverified on a GPU when written (no device was lent to that work): ``--smoke`` ran on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))

from common import run_worker  # noqa: E402
from gpu_common import PRESETS, Timer, is_out_of_memory, llama_config, param_count, peak_flops  # noqa: E402

# Llama-3-8B's shape (meta-llama/Meta-Llama-3-8B's config.json): 8.03B parameters, untied head, GQA 32/8.
LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001)
MODELS = {"llama-3-8b": LLAMA3_8B, "tiny": PRESETS["tiny"]}
TARGET_GIB = 40.0  # issue 11: <= 40 GB (read as GiB: the stricter reading would be 37.3 GiB; both are printed)


def lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0)


def lora_flops_per_token(config, seq: int, adapter_params: int) -> float:
    """Model FLOPs of one LoRA training token (module docstring)."""
    return 4 * param_count(config) + 6 * adapter_params + 12 * config.num_hidden_layers * config.hidden_size * seq


def _result(engine: str, remat: bool, config, b: int, t: int, seconds_per_update: float, adapters: int,
            device: str, peak_gib: float | None, **fields) -> dict:
    tps = b * t / seconds_per_update
    peak = peak_flops(device, None)
    mfu = None if peak is None else tps * lora_flops_per_token(config, t, adapters) / peak
    return dict(engine=engine, remat=remat, status="ok", device=device, tokens_per_s=tps, mfu=mfu, peak_gib=peak_gib,
                adapter_params=adapters, **fields)


# ----------------------------------------------------------------------------------------------------------
# JAX worker


def jax_worker(model: str, smoke: bool, remat: bool, b: int, t: int, rank: int, warmup: int, steps: int,
               workdir: str) -> dict:
    import jax

    jax.config.update("jax_platforms", "cpu" if smoke else "cuda")  # never a silent CPU run of an 8B model
    from unittest import mock

    import numpy as np
    from common import count_compilations, offline
    from gpu_jax import peak_gib, random_model_loader, time_train_step, update_batch

    import itersft_jax.engine as engine_module  # JaxEngine loads the model
    from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer
    from itersft_jax.io.weights import jnp_dtype

    make_tokenizer = offline().make_tokenizer

    device = jax.devices()[0].device_kind
    hf_config = llama_config(MODELS[model])
    random_loader = random_model_loader(hf_config)

    def load_model(source, **kwargs):  # the real load_model's dtype rule: model_init_kwargs["dtype"] -> param_dtype
        requested = (kwargs.get("model_init_kwargs") or {}).get("dtype")
        if kwargs.get("param_dtype") is None and requested is not None:
            kwargs["param_dtype"] = jnp_dtype(requested)
        return random_loader(source, **kwargs)

    args = IterativeSFTConfig(output_dir=os.path.join(workdir, "jax"), per_device_train_batch_size=b, bf16=True,
                              gradient_checkpointing=remat, model_init_kwargs={"dtype": "bfloat16"},
                              learning_rate=1e-4, report_to="none", logging_steps=10**6, disable_tqdm=True,
                              save_strategy="no")
    common = dict(engine="jax", remat=remat, batch=b, seq=t, device=device)
    try:
        with mock.patch.object(engine_module, "load_model", load_model):
            trainer = IterativeSFTTrainer(f"random {model}", args=args, peft_config=lora_config(rank),
                                          processing_class=make_tokenizer())
        adapters = sum(int(x.size) for x in jax.tree.leaves(trainer.params))
        frozen = jax.tree.leaves(trainer.train_state.frozen)
        state_gib = sum(x.nbytes for x in jax.tree.leaves(trainer.train_state)) / 2**30
        ids_BT = np.random.default_rng(0).integers(3, hf_config.vocab_size, size=(b, t))
        first, per_update, metrics = time_train_step(trainer, update_batch(trainer, ids_BT), warmup, steps)
        with count_compilations() as compiles:
            trainer.step(input_ids=ids_BT)  # the host-side path's first call
            timer = Timer()
            for _ in range(max(1, steps // 2)):
                stats = trainer.step(input_ids=ids_BT)
            api_seconds = timer.lap() / max(1, steps // 2)
        return _result("jax", remat, hf_config, b, t, per_update, adapters, device, peak_gib(), batch=b, seq=t,
                       first_s=first, loss=float(metrics["loss"]), step_api_tokens_per_s=b * t / api_seconds,
                       step_api_loss=float(stats["loss"]), recompiles=compiles.count, state_gib=state_gib,
                       frozen_dtypes=sorted({str(x.dtype) for x in frozen}), base_params=param_count(hf_config))
    except Exception as err:  # noqa: BLE001 - out of memory is a result
        return dict(common, status="oom" if is_out_of_memory(err) else "error",
                    error=f"{type(err).__name__}: {str(err).strip()[:300]}", peak_gib=peak_gib())


# ----------------------------------------------------------------------------------------------------------
# PyTorch + PEFT worker


def torch_worker(model: str, smoke: bool, remat: bool, b: int, t: int, rank: int, warmup: int, steps: int) -> dict:
    import numpy as np
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    if not smoke and not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device (a CPU run is `--smoke`)")
    dev = "cpu" if smoke else "cuda"
    device = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    hf_config = llama_config(MODELS[model])
    common = dict(engine="torch", remat=remat, batch=b, seq=t, device=device)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def peak():
        return torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None

    try:
        torch.manual_seed(0)
        with torch.device(dev):  # built on the device, in bf16: no fp32 copy of the base
            base = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=torch.bfloat16)
        base.config.use_cache = False
        net = get_peft_model(base, lora_config(rank)).train()  # adapters in fp32 (autocast_adapter_dtype)
        if remat:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trained = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trained, lr=1e-4, fused=dev == "cuda")
        ids = torch.as_tensor(np.random.default_rng(0).integers(3, hf_config.vocab_size, size=(b, t)), device=dev)

        def update():
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = net(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        timer = Timer()
        update()
        sync()
        first = timer.lap()
        for _ in range(warmup - 1):
            update()
        sync()
        timer.lap()
        for _ in range(steps):
            loss = update()
        sync()
        per_update = timer.lap() / steps
        adapters = sum(p.numel() for p in trained)
        return _result("torch", remat, hf_config, b, t, per_update, adapters, device, peak(), batch=b, seq=t,
                       first_s=first, loss=float(loss), adapter_dtypes=sorted({str(p.dtype) for p in trained}),
                       base_params=sum(p.numel() for p in net.parameters() if not p.requires_grad))
    except Exception as err:  # noqa: BLE001
        return dict(common, status="oom" if is_out_of_memory(err) else "error",
                    error=f"{type(err).__name__}: {str(err).strip()[:300]}", peak_gib=peak())


# ----------------------------------------------------------------------------------------------------------
# The parent: one process per run, then the table


def report(results: list[dict], model: str, b: int, t: int, rank: int) -> str:
    lines = [f"## LoRA r={rank} (all linear layers), {model}, [{b}, {t}] bf16, one process per run\n",
             "| engine | remat | tokens/s | MFU | peak memory (GiB) | <= 40 GB | vs PyTorch+PEFT | trained params | "
             "notes |", "|---|---|---|---|---|---|---|---|---|"]
    torch_tps = {r["remat"]: r["tokens_per_s"] for r in results if r["engine"] == "torch" and r["status"] == "ok"}
    for r in results:
        name = "itersft JAX (trainer.train_step)" if r["engine"] == "jax" else "PyTorch + PEFT loop"
        remat = "yes" if r["remat"] else "no"
        if r["status"] != "ok":
            peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "—"
            lines.append(f"| {name} | {remat} | {r['status']} | — | {peak} | no | — | — | {r['error']} |")
            continue
        peak = r["peak_gib"]
        fits = "—" if peak is None else ("yes" if peak * 2**30 <= TARGET_GIB * 1e9 else
                                         "GiB only" if peak <= TARGET_GIB else "no")
        mfu = "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        ratio = f"{r['tokens_per_s'] / torch_tps[r['remat']]:.2f}x" if r["remat"] in torch_tps else "—"
        notes = f"first update {r['first_s']:.0f} s, loss {r['loss']:.3f}"
        if r["engine"] == "jax":
            notes += (f"; step() {r['step_api_tokens_per_s']:,.0f} tok/s, {r['recompiles']} recompilations; "
                      f"state {r['state_gib']:.1f} GiB, base {'/'.join(r['frozen_dtypes'])}")
        lines.append(f"| {name} | {remat} | {r['tokens_per_s']:,.0f} | {mfu} | "
                     f"{'—' if peak is None else f'{peak:.1f}'} | {fits} | {ratio} | "
                     f"{r['adapter_params'] / 1e6:.1f}M | {notes} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="llama-3-8b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--runs", nargs="+", default=["jax:remat", "torch:remat"],
                   help="engine:remat|none, each in its own process, in this order")
    p.add_argument("--smoke", action="store_true", help="the tiny Llama on the CPU, [2, 64], 1 warm-up + 1 step")
    p.add_argument("--out", help="also write the results as JSON lines here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)  # run_worker's scratch directory
    args = p.parse_args()
    if args.smoke:
        args.model, args.batch, args.seq, args.warmup, args.steps = "tiny", 2, 64, 1, 1
    if args.worker:
        engine, remat = args.worker.split(":")
        run = (args.model, args.smoke, remat == "remat", args.batch, args.seq, args.rank, args.warmup, args.steps)
        result = jax_worker(*run, args.model_dir) if engine == "jax" else torch_worker(*run)
        print(json.dumps(result))
        return
    for run in args.runs:
        engine, _, remat = run.partition(":")
        if engine not in ("jax", "torch") or remat not in ("remat", "none"):
            p.error(f"--runs: {run!r} is not engine:remat|none with engine jax or torch")

    import tempfile

    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for run in args.runs:
            extra = ["--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq), "--rank",
                     str(args.rank), "--warmup", str(args.warmup), "--steps", str(args.steps)]
            results.append(run_worker(__file__, run, workdir, *extra, *(["--smoke"] if args.smoke else [])))
            print(json.dumps(results[-1]), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    print("\n" + report(results, args.model, args.batch, args.seq, args.rank))


if __name__ == "__main__":
    main()
