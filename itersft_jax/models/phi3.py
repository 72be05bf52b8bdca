"""Phi-3 (HF ``model_type`` ``phi3``): ``decoder.py`` with HF's fused ``qkv_proj`` and ``gate_up_proj`` (split into
Llama's q/k/v and gate/up projections by the weight mapping, fused again on save), no biases, an optional sliding
window on every layer, ``partial_rotary_factor`` (the first dims of each head rotate, the rest pass through) and
every RoPE type of ``rope.py`` — ``longrope`` for the long-context checkpoints (see ``rope.py`` for its short/long
switch and what it means for generation).
"""

from __future__ import annotations

from itersft_jax.models import decoder
from itersft_jax.models.rope import rope_from_config


def _spec(config) -> decoder.Spec:
    n = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return decoder.Spec.read(config, act=config.hidden_act, windows=(getattr(config, "sliding_window", None),) * n,
                             ropes=(rope_from_config(config, head_dim, partial=True),), layer_ropes=(0,) * n,
                             fused=True)


# CausalLM(config, *, dtype, param_dtype, remat, attn_implementation, rngs); see models/__init__.py.
CausalLM, params_from_hf, params_to_hf, hf_layout = decoder.family(_spec, "Phi-3")
