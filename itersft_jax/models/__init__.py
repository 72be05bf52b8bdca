"""Flax NNX causal-LM families, keyed by Hugging Face ``config.model_type``.

The contract (``base.py``, ``layers.py``, ``cache.py``, ``remat.py`` and ``attention/`` hold what every family
shares):

* ``FAMILIES`` (below) lists the HF ``model_type`` strings each family module serves.
* ``CausalLM(config, *, dtype=jnp.float32, param_dtype=jnp.float32, remat=False, attn_implementation="auto",
  rngs=nnx.Rngs(0))``: an ``nnx.Module`` (a ``base.CausalLMBase``) built from the HF ``PretrainedConfig``;
  layers are a plain list (one module per layer, so parameter paths mirror HF's). ``remat``: False, True
  (= ``"full"``) or a policy name of ``remat.REMAT_POLICIES``; ``attn_implementation``: ``"auto"``, ``"xla"``
  or a kernel of ``attention/`` (or a Hugging Face name), validated when the model is built and resolved
  per forward (``"auto"`` on a CPU takes ``xla_chunked`` for rows of 4096 tokens and more).
* ``hidden_states(input_ids_BT, positions_BT, attention_mask_BS, cache=None, neftune=None) -> (h_BTD, cache)``:
  the LM head's input (final norm applied); ``head() -> LMHead`` the output projection as data (weight,
  transposed, final-logit soft-cap, dtype), so a loss can apply it chunk by chunk; ``__call__(input_ids_BT,
  positions_BT, attention_mask_BS, cache=None, last_only=False) -> (logits_BTV, cache)`` is the two together
  (``last_only``: the last position only, generation's prefill). The mask is 0/1, or segment ids for packed
  rows (see ``attention/__init__.py``); ``neftune=(alpha, key)`` adds NEFTune noise to the input embeddings.
  ``init_cache(batch, length, dtype)`` returns an empty ``KVCache`` (``[B, K, S, H]`` per layer).
* ``params_from_hf(tensors: dict[str, np.ndarray], config) -> dict``: HF state-dict names to the nested pure
  dict of ``nnx.state(model, nnx.Param)``, and ``params_to_hf(params, config) -> dict[str, np.ndarray]``, its
  inverse (tied weights written once, as HF saves them) — both through one table (``mapping.py``), which
  ``hf_layout(config) -> mapping.Layout`` returns (LoRA names its target modules by it).

Parameter naming: biases are called ``bias``; every normalization module's attribute name contains
``norm`` or starts with ``ln`` — the optimizer's weight-decay mask relies on it.

Adding a family: its file (a ``decoder.Spec`` reader for RoPE decoders, else modules on ``CausalLMBase``, plus a
``mapping.Layout``), one line in ``FAMILIES``, and its configs in ``tests/test_families.py``.
"""

from __future__ import annotations

import importlib

# Family module -> the HF ``model_type`` strings it serves: the one list of what the JAX engine supports.
FAMILIES = {
    "llama": ("llama", "mistral", "qwen2", "qwen3"),
    "phi3": ("phi3",),
    "gemma": ("gemma", "gemma2", "gemma3_text"),
    "gpt2": ("gpt2",),
    "opt": ("opt",),
    "olmo2": ("olmo2",),
    "smollm3": ("smollm3",),
    "gpt_neo": ("gpt_neo",),
    "gpt_neox": ("gpt_neox",),
    "gptj": ("gptj",),
    "mixtral": ("mixtral",),
    "qwen_moe": ("qwen2_moe", "qwen3_moe"),
    "olmoe": ("olmoe",),
}
_FAMILY_OF_TYPE = {model_type: family for family, types in FAMILIES.items() for model_type in types}


def supported_model_types() -> list[str]:
    return sorted(_FAMILY_OF_TYPE)


def get_family(model_type: str):
    """The family module serving ``model_type``; a clear error for anything else."""
    name = _FAMILY_OF_TYPE.get(model_type)
    if name is None:
        raise ValueError(
            f"model_type {model_type!r} is not supported by the JAX backend; supported: "
            f"{', '.join(supported_model_types())}. Use backend='torch' for any transformers model."
        )
    return importlib.import_module(f"{__name__}.{name}")


# Model types whose positions come from a learned table of ``max_position_embeddings`` rows (GPT-2's ``n_positions``
# is an alias of it): a position past the table has no embedding — JAX's lookup gives NaN, torch's an IndexError —
# so the trainers and the sampler refuse longer sequences. RoPE families take any length, as transformers does.
LEARNED_POSITIONS = ("gpt2", "opt", "gpt_neo")


def position_limit(config) -> int | None:
    """How many positions ``config``'s model has (its learned position table), or None when it has no such limit."""
    if config.model_type not in LEARNED_POSITIONS:
        return None
    return int(config.max_position_embeddings)
