"""``CausalLMBase``: what every family's ``CausalLM`` inherits (the forward = hidden states + head, caches, the
head as data)."""


from __future__ import annotations

import jax
from flax import nnx

from itersft_jax.models.attention import (
    AttentionContext,
    attention_context,
    resolve_attention_implementation,
)
from itersft_jax.models.cache import KVCache
from itersft_jax.models.layers import LMHead, head_logits
from itersft_jax.models.remat import normalize_remat, run_layers


class CausalLMBase(nnx.Module):
    """What every family's ``CausalLM`` shares; a family implements ``hidden_states`` and ``head_weight`` (and
    ``head_bias`` when its head has one).

    ``configure`` records the settings resolved once per model: compute dtype, remat policy, attention
    implementation, cache shape and final-logit soft-cap.
    """

    def configure(self, *, dtype, remat, attn_implementation: str | None, num_layers: int, num_kv_heads: int,
                  head_dim: int, window: int | None = None, softcap: float | None = None,
                  final_softcap: float | None = None) -> None:
        self.dtype = dtype
        self.remat = normalize_remat(remat)
        # Validated now (a name that cannot run raises here); resolved per forward, where "auto" on a CPU
        # depends on the call's length.
        self.attn_case = (("dtype", dtype), ("head_dim", head_dim), ("window", window), ("softcap", softcap))
        self.attn_requested = attn_implementation
        self.attn_implementation = resolve_attention_implementation(attn_implementation, **dict(self.attn_case))
        self.cache_shape = (num_layers, num_kv_heads, head_dim)
        self.final_softcap = final_softcap

    def attention_context(self, attention_mask_BS, num_queries: int, cache: KVCache | None) -> AttentionContext:
        seq_len = num_queries if cache is None or cache.empty else None  # decode steps take the XLA path anyway
        implementation = resolve_attention_implementation(self.attn_requested, seq_len=seq_len, **dict(self.attn_case))
        return attention_context(attention_mask_BS, num_queries, cache, implementation)

    def run_layers(self, layers, h_BTD, cache, *args):
        return run_layers(layers, h_BTD, cache, *args, remat=self.remat)

    def head_weight(self) -> tuple[jax.Array, bool]:
        """``(weight, transposed)`` of the output projection (see ``LMHead``)."""
        raise NotImplementedError

    def head_bias(self) -> jax.Array | None:
        """The output projection's bias ``[V]``, for the families that have one (GPT-J); ``None`` by default."""
        return None

    def head(self) -> LMHead:
        """The output projection as data (see ``LMHead``)."""
        weight, transposed = self.head_weight()
        return LMHead(weight, transposed, self.final_softcap, self.dtype, self.head_bias())

    def __call__(self, input_ids_BT, positions_BT, attention_mask_BS, cache: KVCache | None = None,
                 last_only: bool = False, neftune=None):
        h_BTD, cache = self.hidden_states(input_ids_BT, positions_BT, attention_mask_BS, cache, neftune=neftune)
        if last_only:  # generation's prefill needs only the next-token logits
            h_BTD = h_BTD[:, -1:]
        return head_logits(self.head(), h_BTD), cache

    def init_cache(self, batch: int, length: int, dtype=None) -> KVCache:
        return KVCache.zeros(self.cache_shape[0], batch, length, *self.cache_shape[1:],
                             dtype if dtype is not None else self.dtype)
