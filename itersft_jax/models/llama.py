"""Llama-family causal LMs: Llama 2/3 (rope scaling), Mistral, Qwen2, Qwen3 — ``decoder.py`` with these switches:

* llama: ``attention_bias`` on q/k/v/o, ``mlp_bias``;
* mistral: no biases, one ``sliding_window`` for every layer (``None``: none);
* qwen2: bias on q/k/v (never o), sliding window on the layers ``layer_types`` marks ``sliding_attention``;
* qwen3: ``attention_bias`` on q/k/v/o, RMSNorm on each query/key head (``q_norm``/``k_norm``), windows as qwen2.

RoPE: every type of ``rope.py`` (default, linear, dynamic, llama3, yarn, longrope).
"""

from __future__ import annotations

from itersft_jax.models import FAMILIES, decoder
from itersft_jax.models.rope import rope_from_config, rope_parameters  # noqa: F401  (rope_parameters: part of this module's API)


def _spec(config) -> decoder.Spec:
    model_type = config.model_type
    if model_type not in FAMILIES["llama"]:
        raise ValueError(f"llama.py serves {FAMILIES['llama']}, not {model_type!r}")
    n = config.num_hidden_layers
    if model_type == "mistral":
        windows = (getattr(config, "sliding_window", None),) * n
    elif model_type in ("qwen2", "qwen3"):
        windows = decoder.layer_windows(config)
    else:
        windows = (None,) * n
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention_bias = bool(getattr(config, "attention_bias", False))
    return decoder.Spec.read(
        config, act=config.hidden_act, windows=windows, ropes=(rope_from_config(config, head_dim),),
        layer_ropes=(0,) * n,
        qkv_bias=attention_bias if model_type in ("llama", "qwen3") else model_type == "qwen2",
        o_bias=attention_bias if model_type in ("llama", "qwen3") else False,
        mlp_bias=bool(getattr(config, "mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type == "qwen3")


# CausalLM(config, *, dtype, param_dtype, remat, attn_implementation, rngs); see models/__init__.py.
CausalLM, params_from_hf, params_to_hf, hf_layout = decoder.family(_spec)
