"""Which attention implementation runs a case: the names accepted (ours and Hugging Face's), what each can run on,
and the "auto" rule."""


from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

KERNELS = ("cudnn", "pallas_gpu", "splash", "xla_chunked")  # what flash_attention runs

IMPLEMENTATIONS = ("xla", *KERNELS)  # what resolve_attention_implementation returns

HF_ALIASES = {"eager": "xla", "sdpa": "auto", "flash_attention_2": "flash", "flash_attention_3": "flash"}

ATTENTION_IMPLEMENTATIONS = ("auto", *IMPLEMENTATIONS, *HF_ALIASES)  # every accepted attn_implementation

CPU_CHUNKED_FROM = 4096  # tokens per row from which "auto" on CPU takes xla_chunked (see resolve_...)

_GPU_PLATFORMS = ("gpu", "cuda")

def unsupported_reason(name: str, *, platform: str, dtype, head_dim: int, softcap, max_segments) -> str | None:
    """Why ``name`` cannot run this case, or ``None`` if it can."""
    if name in ("xla", "xla_chunked"):
        return None
    if name == "cudnn":
        if platform not in _GPU_PLATFORMS:
            return "cuDNN runs on NVIDIA GPUs only"
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return f"cuDNN needs bfloat16 or float16 compute, not {jnp.dtype(dtype).name}"
        if head_dim > 256 or head_dim % 8:
            return f"cuDNN needs head_dim <= 256 and a multiple of 8, not {head_dim}"
        if softcap is not None:
            return "cuDNN has no logit soft-cap"
        if max_segments is None:
            return "cuDNN needs a static bound on the segments per row (max_segments) to honour packed rows"
        capability = gpu_compute_capability()
        if capability is not None and capability < (9, 0):
            return f"cuDNN's packed (ragged) layout needs Hopper (sm90) or newer, not sm{capability[0]}{capability[1]}"
        return None
    if name == "pallas_gpu":
        if platform not in _GPU_PLATFORMS:
            return "the Pallas Triton kernel runs on NVIDIA GPUs only"
        if head_dim > 256:
            return f"the Pallas GPU kernel supports head_dim <= 256, not {head_dim}"
        return None
    if name == "splash":
        return None if platform == "tpu" else "splash attention runs on TPUs only"
    raise AssertionError(name)

def gpu_compute_capability() -> tuple[int, int] | None:
    """The first local NVIDIA GPU's compute capability, or ``None`` without one (resolving for a GPU elsewhere)."""
    try:
        major, minor = jax.devices("gpu")[0].compute_capability.split(".")[:2]
        return int(major), int(minor)
    except (RuntimeError, AttributeError, ValueError, IndexError):
        return None

def choose_implementation(requested: str | None, *, platform: str, dtype: Any, head_dim: int,
                                     window: int | None = None, softcap: float | None = None,
                                     max_segments: int | None = None, seq_len: int | None = None) -> str:
    """The attention implementation to use: one of ``IMPLEMENTATIONS``.

    ``requested`` is ``None``/``"auto"`` (the best for the case), one of ``IMPLEMENTATIONS``, or a Hugging Face
    ``attn_implementation`` name: ``"eager"`` -> ``"xla"``, ``"sdpa"`` -> ``"auto"``, ``"flash_attention_2"``/
    ``"flash_attention_3"`` -> the best *flash* kernel (never the materializing ``"xla"``). ``platform`` is
    ``jax.default_backend()`` (``"cpu"``, ``"gpu"``, ``"tpu"``); ``dtype`` the compute dtype; ``max_segments``
    the caller's static bound on segments per row (``None``: unknown, which rules cuDNN out — see the module
    docstring). ``window`` is accepted for symmetry: every implementation supports sliding windows.

    "auto": GPU -> cudnn where it applies, else pallas_gpu, else xla_chunked; TPU -> splash; CPU -> "xla" below
    ``CPU_CHUNKED_FROM`` tokens per row (``seq_len``; unknown counts as short), xla_chunked from there on.
    On a CPU xla_chunked runs faster and in O(T) memory but compiles several times slower, so for the trainer's
    short, bucketed runs the compile dominates until the ``[T, T]`` fp32 scores do (the numbers:
    ``benchmarks/results/cpu_design_choices.md``).
    An explicit name that cannot run the case raises ``ValueError`` naming ``attn_implementation``.
    """
    del window
    platform = "gpu" if platform == "cuda" else platform
    name = "auto" if requested is None else requested
    if not isinstance(name, str) or name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={requested!r} is not one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    name = HF_ALIASES.get(name, name)
    case = dict(platform=platform, dtype=dtype, head_dim=head_dim, softcap=softcap, max_segments=max_segments)
    if name in ("auto", "flash"):
        order = {"gpu": ("cudnn", "pallas_gpu"), "tpu": ("splash",)}.get(platform, ())
        long_row = seq_len is not None and seq_len >= CPU_CHUNKED_FROM
        order += ("xla_chunked",) if name == "flash" or platform != "cpu" or long_row else ("xla",)
        return next(n for n in order if unsupported_reason(n, **case) is None)
    reason = unsupported_reason(name, **case)
    if reason is not None:
        can = [n for n in IMPLEMENTATIONS if unsupported_reason(n, **case) is None]
        described = (f"platform={platform}, dtype={jnp.dtype(dtype).name}, head_dim={head_dim}, "
                     f"softcap={softcap}, max_segments={max_segments}")
        raise ValueError(f"attn_implementation={requested!r} cannot run this case ({described}): {reason}. "
                         f"Use 'auto' or one of: {', '.join(can)}")
    return name
