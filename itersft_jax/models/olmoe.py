"""OLMoE (HF ``model_type`` ``olmoe``): ``decoder.py`` with a sparse MoE MLP on every layer (``moe.py``) —
``num_experts`` SwiGLU experts of ``intermediate_size``, ``num_experts_per_tok`` per token, renormalised with
``norm_topk_prob`` —, RMSNorm over the whole query and key projections (before the split into heads), q/k/v clamped
to ``[-clip_qkv, clip_qkv]`` when set, ``attention_bias`` on q/k/v/o, no sliding window, every RoPE type of
``rope.py``. ``output_router_logits=True`` turns on the load-balancing loss (``router_aux_loss_coef``).

Checkpoints: the per-expert ``mlp.experts.{e}.gate_proj/up_proj/down_proj`` tensors ``save_pretrained`` writes (read
and written), or transformers 5's fused ``mlp.experts.gate_up_proj``/``down_proj`` (a model in memory; read).
"""

from __future__ import annotations

from itersft_jax.models import decoder, moe
from itersft_jax.models.rope import rope_from_config


def _spec(config) -> decoder.Spec:
    n = config.num_hidden_layers
    head_dim = config.hidden_size // config.num_attention_heads
    if (getattr(config, "head_dim", None) or head_dim) != head_dim:
        raise ValueError(f"olmoe: head_dim={config.head_dim} != hidden_size / num_attention_heads={head_dim} "
                         "(transformers' OLMoE sizes its q/k norms by the latter); use backend='torch'.")
    bias = bool(getattr(config, "attention_bias", False))
    sparse = moe.MoESpec(num_experts=config.num_experts, top_k=config.num_experts_per_tok,
                         intermediate_size=config.intermediate_size, norm_topk_prob=bool(config.norm_topk_prob),
                         sparse=(True,) * n, aux_loss_coef=moe.aux_loss_coef(config))
    return decoder.Spec.read(config, act=config.hidden_act, windows=(None,) * n,
                             ropes=(rope_from_config(config, head_dim),), layer_ropes=(0,) * n, qkv_bias=bias,
                             o_bias=bias, qk_norm_full=True, clip_qkv=getattr(config, "clip_qkv", None), moe=sparse)


# CausalLM(config, *, dtype, param_dtype, remat, attn_implementation, rngs); see models/__init__.py.
CausalLM, params_from_hf, params_to_hf, hf_layout = decoder.family(_spec, "OLMoE")
