"""Gemma 1, Gemma 2 and Gemma 3 text (``gemma``, ``gemma2``, ``gemma3_text`` = ``Gemma3ForCausalLM``): ``decoder.py``
with these switches:

* all: embeddings times sqrt(hidden_size) (cast to the compute dtype, as HF does), RMSNorm as ``x * (1 + w)`` in fp32,
  GeGLU (``gelu_pytorch_tanh``), ``attention_bias`` on q/k/v/o, a tied head by default;
* gemma2: sandwich norms (after attention, before and after the MLP), ``query_pre_attn_scalar ** -0.5`` as the
  q.k scale, attention-logit and final-logit soft-capping, sliding-window layers where ``layer_types`` says;
* gemma3_text: as gemma2, plus RMSNorm on each query/key head and a RoPE per layer type — the sliding layers'
  (``rope_local_base_freq``) and the global layers' (with their rope scaling). HF's Gemma 3 attention never applies
  ``attn_logit_softcapping``, so neither does this one; the final-logit soft-cap it does apply.
"""

from __future__ import annotations

from itersft_jax.models import FAMILIES, decoder
from itersft_jax.models.rope import rope_from_config


def _spec(config) -> decoder.Spec:
    model_type = config.model_type
    if model_type not in FAMILIES["gemma"]:
        raise ValueError(f"gemma.py serves {FAMILIES['gemma']}, not {model_type!r}")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("use_bidirectional_attention=True (an embedding model) is not a causal LM; "
                         "use backend='torch'.")
    n = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    bias = bool(getattr(config, "attention_bias", False))
    common = dict(qkv_bias=bias, o_bias=bias, gemma_norm=True, embed_scale=config.hidden_size ** 0.5)
    if model_type == "gemma":
        return decoder.Spec.read(config, act=config.hidden_act, windows=(None,) * n,
                                 ropes=(rope_from_config(config, head_dim),), layer_ropes=(0,) * n, **common)
    later = dict(act=config.hidden_activation, windows=decoder.layer_windows(config), sandwich_norms=True,
                 query_scale=float(config.query_pre_attn_scalar) ** -0.5,
                 final_softcap=getattr(config, "final_logit_softcapping", None), **common)
    if model_type == "gemma2":
        return decoder.Spec.read(config, ropes=(rope_from_config(config, head_dim),), layer_ropes=(0,) * n,
                                 attn_softcap=getattr(config, "attn_logit_softcapping", None), **later)
    layer_types = list(config.layer_types)[:n]
    kinds = sorted(set(layer_types))
    ropes = tuple(rope_from_config(config, head_dim, layer_type=kind) for kind in kinds)
    return decoder.Spec.read(config, ropes=ropes, layer_ropes=tuple(kinds.index(kind) for kind in layer_types),
                             qk_norm=True, **later)


# CausalLM(config, *, dtype, param_dtype, remat, attn_implementation, rngs); see models/__init__.py.
CausalLM, params_from_hf, params_to_hf, hf_layout = decoder.family(_spec)
