"""The JAX workers of benchmarks/gpu_check.py, each run in its own process (see gpu_check.py).

Training is measured through the trainer users run: an ``IterativeSFTTrainer`` whose weights are random,
built on the device by the model family from the preset's ``LlamaConfig`` (``load_model`` replaced for the
construction only: reading 5 GB of random safetensors would measure the disk). Everything else is the
trainer's own: its optimizer, its train state, its mesh and shardings and its one jitted ``train_step``.
Headline numbers call ``trainer.train_step`` on a pre-built ``[1, B, T]`` update (exactly what ``step()``
builds for B samples of T tokens: one micro-batch of B rows, segment id 1, each row's first label -100), so
host-side packing does not enter; a second row per batch size times ``trainer.step()`` itself on the same
shape (no recompilation: it is counted).
"""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
from gpu_common import (
    PRESETS,
    Plan,
    Recorder,
    Timer,
    hbm_bandwidth,
    is_out_of_memory,
    kv_bytes_per_token,
    llama_config,
    mfu,
    param_count,
    run_iterative,
)


def _setup(plan: Plan, rec: Recorder):
    """Pick the platform and record the environment; returns the device name."""
    import importlib.metadata as md

    import jax

    # A smoke run on the CPU; otherwise CUDA or an error (never a silent CPU fallback of a 1B model).
    jax.config.update("jax_platforms", "cpu" if plan.smoke else "cuda")
    try:
        device = jax.devices()[0]
    except Exception as err:  # jax 0.10 says only AssertionError when the platform cannot start
        raise RuntimeError("JAX could not start its CUDA backend (is jax[cuda] installed? a CPU run is `--smoke`)"
                           ) from err
    plugins = sorted(f"{d.metadata['Name']} {d.version}" for d in md.distributions()
                     if d.metadata["Name"].lower().replace("_", "-").startswith(("jax-cuda", "jax-rocm")))
    rec.row("env", engine="jax", device=device.device_kind, platform=device.platform, jax=jax.__version__,
            jaxlib=md.version("jaxlib"), flax=md.version("flax"), plugins=", ".join(plugins) or None,
            mem_fraction=os.environ.get("XLA_CLIENT_MEM_FRACTION") or os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"))
    return device.device_kind


def peak_gib() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def random_model_loader(hf_config):
    """Stands in for ``itersft_jax.io.weights.load_model`` in the trainer: the same module, random weights (the
    family's own initializers: normal(initializer_range)), built directly on the default device."""
    def load_model(source, *, dtype=None, param_dtype=None, remat=False, gradient_checkpointing_kwargs=None,
                   attn_implementation=None, model_init_kwargs=None, mesh=None, **unknown):
        import jax.numpy as jnp
        from flax import nnx

        from itersft_jax.io.weights import remat_setting
        from itersft_jax.models import get_family

        if any(v not in (None, False) for v in unknown.values()):
            raise TypeError(f"the trainer passed load_model arguments this benchmark does not know: {sorted(unknown)}")
        if attn_implementation is None:
            attn_implementation = (model_init_kwargs or {}).get("attn_implementation", "auto")
        model = get_family(hf_config.model_type).CausalLM(
            hf_config, dtype=dtype or jnp.float32, param_dtype=param_dtype or jnp.float32,
            remat=remat_setting(remat, gradient_checkpointing_kwargs), attn_implementation=attn_implementation,
            rngs=nnx.Rngs(0))
        del mesh  # one device here: the trainer puts the parameters on its mesh (the same device)
        return model, hf_config
    return load_model


def make_trainer(plan: Plan, hf_config, *, batch: int, remat: bool, name: str):
    """The JAX ``IterativeSFTTrainer`` a user builds for bf16 training, on random weights (module docstring)."""
    from common import offline

    make_tokenizer = offline().make_tokenizer

    import itersft_jax.engine as engine_module  # JaxEngine loads the model
    from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer

    ckpt_kwargs = {"policy": plan.remat_policy} if remat and plan.remat_policy else None
    init_kwargs = {"attn_implementation": plan.attn} if plan.attn != "auto" else None
    args = IterativeSFTConfig(output_dir=os.path.join(plan.workdir, name), per_device_train_batch_size=batch,
                              bf16=True, gradient_checkpointing=remat, gradient_checkpointing_kwargs=ckpt_kwargs,
                              model_init_kwargs=init_kwargs, learning_rate=1e-4, report_to="none",
                              logging_steps=10**6, disable_tqdm=True, save_strategy="no")
    with mock.patch.object(engine_module, "load_model", random_model_loader(hf_config)):
        return IterativeSFTTrainer(f"random {plan.preset}", args=args, processing_class=make_tokenizer())


def attention_used(module, seq: int) -> str:
    """The attention implementation ``module`` resolves for rows of ``seq`` tokens (its "auto" is per length)."""
    from itersft_jax.models.attention import resolve_attention_implementation

    return resolve_attention_implementation(module.attn_requested, seq_len=seq, **dict(module.attn_case))


def update_batch(trainer, ids_BT: np.ndarray) -> dict:
    """The ``[1, B, T]`` update ``step(input_ids=ids_BT)`` packs (one sample per row), on the trainer's sharding."""
    import jax

    labels = ids_BT.astype(np.int32).copy()
    labels[:, 0] = -100  # pack_update: a row's first label is never trained
    batch = {"input_ids": ids_BT.astype(np.int32)[None], "attention_mask": np.ones((1, *ids_BT.shape), np.int32),
             "labels": labels[None]}
    return jax.device_put(batch, trainer.batch_sharding)


def time_train_step(trainer, batch: dict, warmup: int, steps: int) -> tuple[float, float, dict]:
    """``(first call s, seconds per update, last metrics)`` of ``trainer.train_step`` on one fixed update."""
    import jax

    def update():
        with trainer.precision():  # what step() wraps the call in (a no-op for bf16)
            trainer.train_state, metrics = trainer.train_step(trainer.train_state, batch)
        return metrics

    timer = Timer()
    update()
    jax.block_until_ready(trainer.train_state)
    first = timer.lap()
    for _ in range(warmup - 1):
        update()
    jax.block_until_ready(trainer.train_state)
    timer.lap()
    for _ in range(steps):
        metrics = update()
    jax.block_until_ready(trainer.train_state)
    return first, timer.lap() / steps, jax.device_get(metrics)


def _train_row(plan: Plan, rec: Recorder, trainer, hf_config, device: str, b: int, t: int, *,
               api_steps: int = 0) -> bool:
    """One ``[b, t]`` row: ``train_step`` tokens/s, MFU, peak memory (the process's high-water mark: callers go
    from small to large shapes); with ``api_steps`` also a ``trainer.step()`` row. False when it did not run."""
    from common import count_compilations

    label = f"{b} x {t}"
    common = dict(engine="jax", batch=b, seq=t, remat=trainer.model.remat or "no")  # the policy the model applies
    try:
        ids_BT = np.random.default_rng(t + b).integers(3, hf_config.vocab_size, size=(b, t))
        first, per_step, metrics = time_train_step(trainer, update_batch(trainer, ids_BT), plan.warmup, plan.steps)
        tps = b * t / per_step
        rec.row(label=label, status="ok", path="trainer.train_step", attention=attention_used(trainer.model, t),
                tokens_per_s=tps, mfu=mfu(tps, hf_config, t, device, plan), peak_gib=peak_gib(), first_s=first,
                loss=float(metrics["loss"]), skipped=int(metrics.get("skipped", 0)), **common)
        if api_steps:
            with count_compilations() as compiles:
                trainer.step(input_ids=ids_BT)  # warm: the host-side path's first call
                timer = Timer()
                for _ in range(api_steps):
                    stats = trainer.step(input_ids=ids_BT)
                seconds = timer.lap() / api_steps
            rec.row(label=label, status="ok", path="trainer.step()", tokens_per_s=b * t / seconds,
                    mfu=mfu(b * t / seconds, hf_config, t, device, plan), recompiles=compiles.count,
                    loss=float(stats["loss"]), **common)
        return True
    except Exception as err:  # noqa: BLE001 - an out-of-memory shape is a result; the caller goes on or stops
        rec.failure(label, err, is_out_of_memory(err), **common)
        return False


def fixed(plan: Plan, rec: Recorder) -> None:
    """Part b: ``[B, seq]`` bf16, no remat, one trainer per B (``per_device_train_batch_size=B``), B increasing;
    after a B that does not fit, the larger ones are not tried."""
    import gc

    import jax

    device = _setup(plan, rec)
    hf_config = llama_config(PRESETS[plan.preset])
    for b in plan.batches:
        trainer = make_trainer(plan, hf_config, batch=b, remat=False, name=f"fixed-{b}")
        if b == plan.batches[0]:
            rec.row("model", engine="jax", params=sum(int(x.size) for x in jax.tree.leaves(trainer.params)),
                    expected_params=param_count(hf_config))
        ok = _train_row(plan, rec, trainer, hf_config, device, b, plan.seq, api_steps=max(1, plan.steps // 2))
        del trainer
        gc.collect()
        if not ok:
            return


def long_context(plan: Plan, rec: Recorder) -> None:
    """Part d, JAX side: ``[1, T]`` with gradient checkpointing (the default policy unless --remat-policy)."""
    device = _setup(plan, rec)
    hf_config = llama_config(PRESETS[plan.preset])
    trainer = make_trainer(plan, hf_config, batch=1, remat=True, name="long")
    for t in plan.long_lengths:
        if not _train_row(plan, rec, trainer, hf_config, device, 1, t):
            return


def generate(plan: Plan, rec: Recorder) -> None:
    """Part f: ``trainer.generate()`` on one ``plan.prompt``-token prompt (flash prefill), greedy, no EOS stop."""
    _setup(plan, rec)
    hf_config = llama_config(PRESETS[plan.preset])
    trainer = make_trainer(plan, hf_config, batch=1, remat=False, name="generate")
    prompt = np.random.default_rng(0).integers(3, hf_config.vocab_size, size=plan.prompt).tolist()
    label = f"prompt {plan.prompt}"

    def run(new_tokens: int) -> float:
        timer = Timer()
        out = trainer.generate(input_ids=[prompt], max_new_tokens=new_tokens, eos_token_id=[], seed=0)
        assert len(out.sequences[0]) == new_tokens, (len(out.sequences[0]), new_tokens)
        return timer.lap()

    try:
        first = run(plan.new_tokens)  # compiles the prefill, the cache copy and the decode loop
        prefill = run(1)  # the decode loop exits at once: prefill + cache copy
        total = run(plan.new_tokens)
        rec.row(label=label, status="ok", engine="jax", attention=attention_used(trainer.model, plan.prompt),
                first_s=first, prefill_s=prefill, prefill_tokens_per_s=plan.prompt / prefill,
                decode_tokens_per_s=(plan.new_tokens - 1) / (total - prefill) if total > prefill else None,
                new_tokens=plan.new_tokens,
                peak_gib=peak_gib())
    except Exception as err:  # noqa: BLE001
        rec.failure(label, err, is_out_of_memory(err))


def parity(plan: Plan, rec: Recorder) -> None:
    """Part a, JAX side: fp32 logits at 'highest' matmul precision against the PyTorch worker's (same weights)."""
    import jax

    from itersft_jax.io.weights import load_model
    from itersft_jax.models.attention.masks import positions_from_mask

    _setup(plan, rec)
    path = os.path.join(plan.workdir, "parity")
    saved = np.load(os.path.join(path, "logits.npz"))
    ids, mask, ref = saved["input_ids"], saved["attention_mask"], saved["logits"]
    real = mask.astype(bool)
    for attn in ("auto", "xla"):
        module, _ = load_model(path, attn_implementation=attn)
        label = f"attn_implementation={attn}"
        try:
            with jax.default_matmul_precision("highest"):
                logits = jax.jit(lambda m, i, p, a: m(i, p, a)[0])(module, ids, positions_from_mask(mask), mask)
            diff = float(np.abs(np.asarray(logits) - ref)[real].max())
            rec.row(label=label, status="ok", engine="jax", attention=attention_used(module, ids.shape[1]),
                    max_abs_diff=diff, torch_device=str(saved["device"]))
        except Exception as err:  # noqa: BLE001
            rec.failure(label, err, False)


def iterative(plan: Plan, rec: Recorder) -> None:
    """Part g, JAX side: the iterative workload through ``IterativeSFTTrainer(backend="jax")``, bf16."""
    _setup(plan, rec)
    run_iterative(plan, rec, "jax")


def sampler(plan: Plan, rec: Recorder) -> None:
    """Part h: the continuous engine (``sampler.engine.sample_ids`` on the trainer's live bf16 params, as
    ``generate()`` runs it, with ``plan.sampler``'s slot count) on ``prompts x n`` rows of random prompts, no EOS
    stop: tokens/s and the fraction of the HBM roofline, i.e. (weights read once per decode step + the KV the
    decode attention read, ``stats["kv_slot_steps"]`` slots) / HBM bandwidth, over the measured time."""
    import jax

    from itersft_jax.sampler.engine import sample_ids

    device = _setup(plan, rec)
    hf_config = llama_config(PRESETS[plan.preset])
    prompts, n, prompt_len, new_tokens, slots, _ = plan.sampler
    trainer = make_trainer(plan, hf_config, batch=1, remat=False, name="sampler")
    rng = np.random.default_rng(0)
    rows = [rng.integers(3, hf_config.vocab_size, size=prompt_len).tolist() for _ in range(prompts)]
    label = f"{prompts} prompts x {n}, prompt {prompt_len}, {new_tokens} new, {slots} slots"

    def run(count: int):
        timer = Timer()
        res = sample_ids(trainer.graphdef, trainer.train_state.model_state(), rows[:count], num_return_sequences=n,
                         max_new_tokens=new_tokens, do_sample=True, temperature=1.0, eos_token_id=[],
                         key=jax.random.key(0), num_slots=slots)
        return timer.lap(), res

    try:
        # Warm-up: one slot-full of rows, >= 8 distinct prompts (the full run's prefill batch): compiles the
        # prefill, chunk and copy programs at the run's shapes.
        first, _ = run(min(prompts, max(8, slots // n)))
        seconds, res = run(prompts)
        stats = res.stats
        weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.train_state.model_state()))
        weight_bytes = weight_bytes // 2 if weight_bytes and trainer.args.bf16 else weight_bytes  # read as bf16
        moved = stats["decode_steps"] * weight_bytes + stats["kv_slot_steps"] * kv_bytes_per_token(hf_config)
        bandwidth = hbm_bandwidth(device)
        rec.row(label=label, status="ok", engine="jax", seconds=seconds, first_s=first,
                tokens_per_s=stats["tokens"] / seconds, completions_per_s=len(res.sequences) / seconds,
                occupancy=stats["occupancy"], decode_steps=stats["decode_steps"], gb_moved=moved / 1e9,
                roofline=None if bandwidth is None else moved / bandwidth / seconds,
                kv_gib=stats["kv_bytes_peak"] / 2**30, slots=slots, peak_gib=peak_gib(),
                prompt_kv_gib=stats.get("prompt_kv_bytes_peak", 0) / 2**30,
                shared_prompts=bool(stats.get("shared_prompts", False)))
    except Exception as err:  # noqa: BLE001
        rec.failure(label, err, is_out_of_memory(err))
