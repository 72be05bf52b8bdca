"""SmolLM3 (HF ``model_type`` ``smollm3``): ``decoder.py`` as Llama, plus NoPE layers.

* ``no_rope_layers[i]`` 1: layer ``i`` rotates q/k (RoPE, every type of ``rope.py``); 0: a NoPE layer, no
  position information at all (transformers' default: every 4th layer, ``no_rope_layer_interval``);
* sliding windows where ``layer_types`` says ``sliding_attention`` (``config.sliding_window`` keys). transformers'
  default ``layer_types`` marks the NoPE layers sliding when ``use_sliding_window`` is set; an explicit
  ``layer_types`` is followed as its eager/sdpa attention follows it — through the mask, whatever
  ``use_sliding_window`` says (its flash-attention path reads ``use_sliding_window`` too and may disagree);
* ``attention_bias`` on q/k/v/o, ``mlp_bias``, a tied head by default.
"""

from __future__ import annotations

from itersft_jax.models import decoder
from itersft_jax.models.rope import rope_from_config


def _spec(config) -> decoder.Spec:
    n = config.num_hidden_layers
    uses_rope = list(config.no_rope_layers)
    if len(uses_rope) < n:
        raise ValueError(f"no_rope_layers has {len(uses_rope)} entries, the model has num_hidden_layers={n}")
    windows = decoder.layer_windows(config)
    if any(kind == "sliding_attention" for kind in list(config.layer_types)[:n]) and config.sliding_window is None:
        raise ValueError("layer_types has sliding_attention layers but sliding_window is None")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    bias = bool(getattr(config, "attention_bias", False))
    return decoder.Spec.read(config, act=config.hidden_act, windows=windows,
                             ropes=(rope_from_config(config, head_dim),),
                             layer_ropes=tuple(0 if uses_rope[i] else None for i in range(n)),
                             qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(config, "mlp_bias", False)))


# CausalLM(config, *, dtype, param_dtype, remat, attn_implementation, rngs); see models/__init__.py.
CausalLM, params_from_hf, params_to_hf, hf_layout = decoder.family(_spec, "SmolLM3")
