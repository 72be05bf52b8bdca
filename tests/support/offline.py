"""Offline builders for tests and benchmarks: a tiny tokenizer trained in-process, tiny random HF models.

Nothing here touches the network: the tokenizer is trained with ``tokenizers`` on an embedded corpus and
the models are random ``transformers`` models built from small configs.
"""

from __future__ import annotations

import os

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Iterative supervised fine-tuning lets the user's loop own the data.",
    "Generate with the model, filter the samples, then step on what survived.",
    "def add(a, b):\n    return a + b\n",
    "12 + 30 = 42. 7 * 6 = 42. 100 - 58 = 42.",
    "Question: what is two plus two? Answer: four.",
    "JAX and PyTorch compute the same loss on the same micro-batches.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789",
    "Rejection sampling keeps only the verified completions.",
] * 8

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def make_tokenizer(variant: str = "standard", vocab_size: int = 320):
    """A byte-level BPE tokenizer wrapped as ``PreTrainedTokenizerFast``.

    variants: ``standard`` (bos/eos/pad, BOS prepended like Llama's), ``pad_eq_eos`` (pad token is the
    EOS token, as in GPT-2/Llama-3 setups), ``no_pad`` (no pad token at all).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if variant == "standard":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    kwargs = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if variant == "standard":
        kwargs["pad_token"] = "<pad>"
    elif variant == "pad_eq_eos":
        kwargs["pad_token"] = "</s>"
    elif variant != "no_pad":
        raise ValueError(f"unknown tokenizer variant {variant!r}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def tiny_config(model_type: str, vocab_size: int, **overrides):
    """A tiny random-model config of a transformers family (fp32, eager attention)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if model_type in ("llama", "mistral", "qwen2", "qwen3"):
        kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, **common)
        if model_type == "qwen3":
            kw["head_dim"] = 16
        if model_type == "mistral":
            kw["sliding_window"] = 256
        kw.update(overrides)
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "qwen3": tf.Qwen3Config}[model_type]
        return cls(**kw)
    if model_type in ("gemma", "gemma2", "gemma3_text", "phi3"):
        kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, **common)
        if model_type == "phi3":
            kw.update(original_max_position_embeddings=256, resid_pdrop=0.0, embd_pdrop=0.0)
        else:
            kw["head_dim"] = 16
        if model_type in ("gemma2", "gemma3_text"):  # one sliding and one global layer; scale != head_dim**-0.5
            kw.update(sliding_window=8, query_pre_attn_scalar=24, layer_types=["sliding_attention", "full_attention"])
        if model_type == "gemma2":  # soft-caps low enough to bend tiny random logits
            kw.update(attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
        kw.update(overrides)
        cls = {"gemma": tf.GemmaConfig, "gemma2": tf.Gemma2Config, "gemma3_text": tf.Gemma3TextConfig,
               "phi3": tf.Phi3Config}[model_type]
        return cls(**kw)
    if model_type in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):  # 4 experts, 2 per token, 2 layers
        kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, num_experts_per_tok=2,
                  tie_word_embeddings=False, **common)
        if model_type == "mixtral":
            kw.update(num_local_experts=4, intermediate_size=32)
        else:
            kw.update(num_experts=4, moe_intermediate_size=32 if model_type != "olmoe" else None)
        if model_type == "olmoe":
            kw.update(intermediate_size=32)
            kw.pop("moe_intermediate_size")
        if model_type == "qwen2_moe":
            kw["shared_expert_intermediate_size"] = 48
        if model_type == "qwen3_moe":
            kw["head_dim"] = 16
        kw.update(overrides)
        cls = {"mixtral": tf.MixtralConfig, "qwen2_moe": tf.Qwen2MoeConfig, "qwen3_moe": tf.Qwen3MoeConfig,
               "olmoe": tf.OlmoeConfig}[model_type]
        return cls(**kw)
    if model_type == "gpt2":
        kw = dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2)
        kw.update(overrides)
        return tf.GPT2Config(**kw)
    if model_type == "opt":
        kw = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, word_embed_proj_dim=64, do_layer_norm_before=True,
                  dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, **common)
        kw.update(overrides)
        return tf.OPTConfig(**kw)
    if model_type in ("olmo2", "smollm3"):  # smollm3: 2 layers, so its default has no NoPE layer (every 4th)
        kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, **common)
        if model_type == "olmo2":
            kw["tie_word_embeddings"] = False
        kw.update(overrides)
        return {"olmo2": tf.Olmo2Config, "smollm3": tf.SmolLM3Config}[model_type](**kw)
    if model_type == "gpt_neo":  # one global and one local layer; the window is wider than the tests' rows
        # q.k is not scaled: weights of std 0.1 (not 0.02) make the attention far from uniform, so that a wrong
        # scale or window changes the logits by far more than the tests' tolerance
        kw = dict(hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=256,
                  attention_types=[[["global", "local"], 1]], window_size=256, initializer_range=0.1, **common)
        kw.update(overrides)
        return tf.GPTNeoConfig(**kw)
    # GPT-NeoX and GPT-J: weights drawn with std 0.05, not 0.02, so that attention scores (and with them the rotary
    # options) move the logits by more than 1e-3
    if model_type == "gpt_neox":  # Pythia's shape: parallel residual, rotary on a quarter of each head (4 of 16 dims)
        kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, rotary_pct=0.25, use_parallel_residual=True, initializer_range=0.05,
                  **common)
        kw.update(overrides)
        return tf.GPTNeoXConfig(**kw)
    if model_type == "gptj":  # rotary on every dim of the 16-dim heads (the options case takes fewer)
        kw = dict(n_embd=64, n_layer=2, n_head=4, n_inner=128, rotary_dim=16, n_positions=256, initializer_range=0.05,
                  **common)
        kw.update(overrides)
        return tf.GPTJConfig(**kw)
    if model_type == "bart":
        kw = dict(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96,
                  max_position_embeddings=256, dropout=0.0, attention_dropout=0.0,
                  decoder_start_token_id=2, forced_eos_token_id=2, **common)
        kw.update(overrides)
        return tf.BartConfig(**kw)
    raise ValueError(f"no tiny config for {model_type!r}")


def tiny_model(model_type: str, vocab_size: int, seed: int = 0, **overrides):
    """A random ``transformers`` model of the family, fp32, in eval mode."""
    import torch
    import transformers as tf

    config = tiny_config(model_type, vocab_size, **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    auto = tf.AutoModelForSeq2SeqLM if config.is_encoder_decoder else tf.AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation="eager")
    return model.float().eval()


def perturbed_tiny_model(model_type: str, vocab_size: int, **overrides):
    """``tiny_model`` whose biases and norm weights are random too (HF initialises them to constants), so a
    mis-mapped or ignored tensor cannot hide. ``overrides`` are copied: HF edits rope dicts in place."""
    import copy

    import torch

    model = tiny_model(model_type, vocab_size, **copy.deepcopy(overrides))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:  # ln_: GPT-2's and GPT-J's LayerNorms
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def save_tiny_model(path: str | os.PathLike, model_type: str, tokenizer=None, seed: int = 0, **overrides):
    """Save a tiny random model (and the tokenizer) to ``path``, as ``save_pretrained`` does."""
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
    model = tiny_model(model_type, len(tokenizer), seed=seed, **overrides)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
