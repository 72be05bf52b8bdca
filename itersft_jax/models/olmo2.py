"""OLMo 2 (HF ``model_type`` ``olmo2``): ``decoder.py`` with these switches:

* post-norms: no norm before attention or the MLP; ``post_attention_layernorm`` and ``post_feedforward_layernorm``
  norm their outputs before the residual add;
* RMSNorm on the whole q and k projections (``q_norm`` over ``num_heads * head_dim``, ``k_norm`` over
  ``num_key_value_heads * head_dim``), before the split into heads and RoPE — not per head as Qwen3;
* RMSNorm scales the fp32 normed value by ``w`` and casts after (Llama casts first: equal in fp32, not in bf16);
* ``attention_bias`` on q/k/v/o, no MLP bias, every RoPE type of ``rope.py``.
"""

from __future__ import annotations

from itersft_jax.models import decoder
from itersft_jax.models.rope import rope_from_config


def _spec(config) -> decoder.Spec:
    n = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    bias = bool(getattr(config, "attention_bias", False))
    return decoder.Spec.read(config, act=config.hidden_act, windows=(None,) * n,
                             ropes=(rope_from_config(config, head_dim),), layer_ropes=(0,) * n,
                             qkv_bias=bias, o_bias=bias, qk_norm_full=True, post_norms=True, norm_scale_fp32=True)


# CausalLM(config, *, dtype, param_dtype, remat, attn_implementation, rngs); see models/__init__.py.
CausalLM, params_from_hf, params_to_hf, hf_layout = decoder.family(_spec, "OLMo 2")
