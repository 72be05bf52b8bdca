"""What benchmarks/gpu_check.py's parent and its JAX and PyTorch workers share: the plan, the model presets,
FLOPs and MFU, and the JSON-lines recorder. Imports neither jax nor torch."""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))

# Llama-shaped presets. "llama-3.2-1b" is issue 9's shape: 1.24B parameters, tied embeddings, GQA 32/8, llama3 RoPE.
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
PRESETS = {
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True, rope_theta=500000.0,
                 rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=1,
                 eos_token_id=2),
    # Issue 29's MoE shape: OLMoE-1B-7B (allenai/OLMoE-1B-7B-0924): 6.9B parameters, 1.3B active (64 experts of
    # width 1024, 8 per token), q/k norms over the whole projections, untied head.
    "olmoe-1b-7b": dict(model_type="olmoe", hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
                        num_key_value_heads=16, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                        vocab_size=50304, tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=4096,
                        rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=50279, pad_token_id=1),
    "tiny-olmoe": dict(model_type="olmoe", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                       vocab_size=512, tie_word_embeddings=False, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0),
}
SMOKE_PRESETS = {"llama-3.2-1b": "tiny", "tiny": "tiny", "olmoe-1b-7b": "tiny-olmoe", "tiny-olmoe": "tiny-olmoe"}
# The iterative workload's model (part g): the 217M Llama of the earlier H100 run; "tiny" in smoke runs.
ITERATIVE_MODEL = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16,
                       intermediate_size=2752, vocab_size=32000, tie_word_embeddings=False,
                       max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# bf16 dense peak FLOP/s by device-name substring (first match wins). H200 and GH200 have the H100's compute.
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12))
# HBM bandwidth in bytes/s by device-name substring (part h's roofline): H200 4.8 TB/s, H100 SXM 3.35 TB/s.
PEAK_HBM_BYTES = (("H200", 4.8e12), ("H100", 3.35e12), ("H800", 3.35e12), ("A100", 2.0e12))


@dataclasses.dataclass
class Plan:
    """Everything a worker needs, fixed by the parent before the first fork."""

    preset: str
    smoke: bool
    seq: int
    batches: tuple[int, ...]
    long_lengths: tuple[int, ...]
    prompt: int
    new_tokens: int
    warmup: int
    steps: int
    attn: str
    remat_policy: str | None
    peak_tflops: float | None
    results: str  # the JSON-lines file every worker appends to
    workdir: str  # scratch space shared by the workers (parity logits, the iterative model)
    iterative: tuple[int, int, int, int, int] = (6, 64, 32, 1024, 16)  # calls, samples, min len, max len, batch
    # part h: prompts, samples per prompt, prompt tokens, max new tokens, decode slots, transformers' rows
    sampler: tuple[int, int, int, int, int, int] = (512, 8, 256, 512, 256, 256)

    @property
    def device(self) -> str:
        """The torch device of the PyTorch workers: the CPU in a smoke run, else CUDA or an error (never a silent
        CPU run of a 1B model). Asked inside the worker: the parent never touches CUDA."""
        if self.smoke:
            return "cpu"
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device (a CPU run is `--smoke`)")
        return "cuda"


def iterative_model(plan: Plan) -> dict:
    """The config overrides of part g's model (saved by the PyTorch worker, loaded by both trainers)."""
    return dict(PRESETS["tiny"], tie_word_embeddings=False) if plan.smoke else ITERATIVE_MODEL


def run_iterative(plan: Plan, rec: Recorder, backend: str) -> None:
    """Part g for one engine: ``step_throughput.run_backend`` (the iterative workload through
    ``IterativeSFTTrainer(backend=...)``, bf16, compile included) on the model the PyTorch worker saved."""
    from step_throughput import make_workload, run_backend

    calls, samples, lo, hi, batch = plan.iterative
    workload = make_workload(calls, samples, iterative_model(plan)["vocab_size"], lo=lo, hi=hi)
    label = f"{calls} calls x {samples} samples, U[{lo}, {hi}], batch {batch}"
    try:
        r = run_backend(backend, os.path.join(plan.workdir, "iterative"), workload,
                        os.path.join(plan.workdir, f"iterative-{backend}"), batch, bf16=True)
        rec.row(label=label, status="ok", engine=backend, seconds=r["seconds"], tokens_per_s=r["tokens_per_s"],
                padded_tokens=r["padded_tokens"], compiles=r["compiles"], loss=r["last_loss"])
    except Exception as err:  # noqa: BLE001 - recorded; the other parts still run
        rec.failure(label, err, is_out_of_memory(err))


def small_preset(plan: Plan) -> str:
    """Part a's small random model: the tiny preset of the run's family."""
    return SMOKE_PRESETS[plan.preset]


def llama_config(overrides: dict):
    """A preset's ``transformers`` config: a ``LlamaConfig``, or the family a ``model_type`` key names (OLMoE)."""
    import copy

    from transformers import AutoConfig, LlamaConfig

    overrides = copy.deepcopy(overrides)  # transformers edits rope dicts in place
    model_type = overrides.pop("model_type", None)
    return LlamaConfig(**overrides) if model_type is None else AutoConfig.for_model(model_type, **overrides)


def param_count(config, active: bool = False) -> int:
    """Parameters of a Llama or OLMoE config, a tied head counted once (as ``model.parameters()`` counts it);
    ``active``: a mixture of experts' parameters one token uses (``num_experts_per_tok`` of its experts)."""
    d, f, v, layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    h = getattr(config, "head_dim", None) or d // heads
    attention = d * heads * h * 2 + d * kv * h * 2  # q, o; k, v
    experts = getattr(config, "num_experts", None)
    if experts:  # OLMoE: q/k norms over the projections, a router, the experts
        used = config.num_experts_per_tok if active else experts
        per_layer = attention + heads * h + kv * h + d * experts + used * 3 * d * f + 2 * d
    else:
        per_layer = attention + 3 * d * f + 2 * d
    head = 0 if config.tie_word_embeddings else v * d
    return v * d + head + layers * per_layer + d


def flops_per_token(config, seq: int) -> float:
    """Issue 9's training FLOPs per token: 6 N + 12 L D T (attention, causal not halved), N from ``param_count``
    (a mixture of experts: its active parameters)."""
    return 6 * param_count(config, active=True) + 12 * config.num_hidden_layers * config.hidden_size * seq


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_name), None)


def hbm_bandwidth(device_name: str) -> float | None:
    return next((bw for key, bw in PEAK_HBM_BYTES if key in device_name), None)


def kv_bytes_per_token(config, itemsize: int = 2) -> int:
    """Keys + values of one token over all layers (bf16 by default)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * itemsize


def mfu(tokens_per_s: float, config, seq: int, device_name: str, plan: Plan) -> float | None:
    peak = peak_flops(device_name, plan.peak_tflops)
    return None if peak is None else tokens_per_s * flops_per_token(config, seq) / peak


class Recorder:
    """Appends one JSON object per line to the plan's results file and echoes it; a killed worker keeps what it
    wrote before."""

    def __init__(self, path: str, part: str, job: str):
        self.path, self.part, self.job = path, part, job

    def row(self, kind: str = "result", **fields) -> dict:
        row = {"kind": kind, "part": self.part, "job": self.job, **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(f"[{self.job}] {json.dumps({k: v for k, v in fields.items() if v is not None}, default=str)}",
              flush=True)
        return row

    def failure(self, label: str, err: BaseException, oom: bool, **fields) -> dict:
        """A case that raised: ``status`` "oom" (the measurement: it does not fit) or "error" (a broken script)."""
        message = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        if not oom:
            traceback.print_exc(limit=6)
        return self.row(label=label, status="oom" if oom else "error", error=f"{type(err).__name__}: {message}",
                        **fields)


def is_out_of_memory(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "OutOfMemoryError", "out of memory", "Out of memory"))


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self.t0 = now - self.t0, now
        return seconds
