"""``generate`` for the PyTorch backend: ``transformers`` ``model.generate`` behind the JAX engine's signature.

Same arguments and the same ``GenerationOutput`` as ``itersft_jax.sampler.generate.generate``, so a
generate -> filter -> step loop runs unchanged on either backend. Greedy decoding is token-identical to the
JAX engine for the same weights (tested).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from transformers import GenerationConfig

from itersft_jax.shared import outputs
from itersft_jax.shared.outputs import GenerationOutput
from itersft_jax.shared.stops import StopStrings, check_stop_strings
from itersft_torch.distributed import release_gathered_parameters


def _root_parameters_gathered(trainer) -> contextlib.AbstractContextManager:
    """FSDP1: ``generate`` runs the unwrapped model, past the root FSDP unit's forward that would gather the
    parameters it holds itself (embeddings, final norm, LM head), so they are gathered here; the nested units
    (decoder layers) gather theirs in their own forward. transformers' ``synced_gpus`` (on for FSDP-managed
    modules) keeps the processes' forwards in step when they generate different lengths."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = trainer.model_wrapped
    if isinstance(wrapped, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(wrapped, recurse=False, writeback=False)
    return contextlib.nullcontext()


def generate(trainer, prompts: Sequence[str] | None = None, input_ids=None, *, max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             num_return_sequences: int = 1, eos_token_id: int | Sequence[int] | None = None,
             seed: int | None = None, return_text: bool = True, return_logprobs: bool = False, min_p: float = 0.0,
             min_new_tokens: int = 0, repetition_penalty: float = 1.0,
             stop_strings: str | Sequence[str] | None = None, messages=None, return_prompt_logprobs: bool = False,
             return_top_logprobs: int | None = None) -> GenerationOutput:
    """Generate completions with the trainer's current model (see ``itersft_jax.sampler.generate.generate``).

    ``return_logprobs``: each generated token's log-probability under the model at temperature 1:
    ``log_softmax`` (fp32) of transformers' raw ``output_logits`` (before temperature/top-k/top-p), as the
    JAX engine returns. ``return_top_logprobs=k``: the ``k`` largest entries of that ``log_softmax`` and their
    ids at each generated position. ``return_prompt_logprobs``: the prompts but their last token are run
    through the model here (``_prefill``: the logits give each prompt token's logprob) and that KV cache is
    handed to ``model.generate``, which runs only the last token: no extra forward. Shapes: ``GenerationOutput``.

    ``min_p``, ``min_new_tokens``, ``repetition_penalty`` and ``stop_strings`` go to transformers' own
    processors and ``StopStringCriteria`` (with the trainer's tokenizer); rows are cut after the token that
    completed a stop string (found by ``shared/stops.py``, as the JAX engine) and ``finish_reasons`` filled.
    One difference from the JAX engine: transformers also penalizes the pad token of left-padded rows (it is
    in their ``input_ids``).

    ``seed=None`` draws fresh samples on every call (a per-trainer counter folded into ``args.seed``);
    a fixed seed reproduces them.
    """
    outputs.check_generation_args(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                  top_k=top_k, top_p=top_p, num_return_sequences=num_return_sequences, seed=seed,
                                  return_text=return_text, return_logprobs=return_logprobs, min_p=min_p,
                                  min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty)
    outputs.check_logprob_args(return_prompt_logprobs, return_top_logprobs, trainer.vocab_size)
    tokenizer = trainer.text_tokenizer
    stop_strings = check_stop_strings(stop_strings, tokenizer)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if return_prompt_logprobs and model.config.is_encoder_decoder:
        raise ValueError("`return_prompt_logprobs` needs a decoder-only model: an encoder-decoder's prompt is the "
                         "encoder's input, which it does not predict")
    if eos_token_id is not None:
        outputs.eos_id_list(eos_token_id, trainer.vocab_size)  # refused before the prompts are tokenized
    prompt_name = "prompts" if prompts is not None else "messages" if messages is not None else "input_ids"
    rows = outputs.prompt_rows(prompts, input_ids, tokenizer, vocab_size=trainer.vocab_size, messages=messages,
                               no_tokenizer_hint="pass `processing_class` to the trainer")
    outputs.check_generation_positions(rows, max_new_tokens, trainer.position_limit, prompt_name)

    eos = outputs.default_eos_ids(eos_token_id, tokenizer, model.config, trainer.vocab_size)
    pad = outputs.generation_pad_id(tokenizer, model.config, eos)
    longest = max(len(r) for r in rows)
    device = next(model.parameters()).device
    ids = torch.tensor([[pad] * (longest - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows], device=device)

    if seed is None:  # a fresh stream per call: the trainer's unseeded-call counter folded into args.seed
        seed = (int(trainer.args.seed) * 1_000_003 + trainer.next_generation_call() + 1) & 0x7FFFFFFF
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    # Only the knobs of this signature: a checkpoint's own generation_config (repetition penalty, n-gram
    # bans, sampling defaults) would make the two backends decode differently.
    base = model.generation_config
    config = GenerationConfig(
        bos_token_id=base.bos_token_id, decoder_start_token_id=base.decoder_start_token_id,
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
        temperature=temperature if do_sample else None, top_k=(top_k or None) if do_sample else None,
        top_p=top_p if do_sample else None, min_p=(min_p or None) if do_sample else None,
        repetition_penalty=repetition_penalty if repetition_penalty != 1.0 else None, stop_strings=stop_strings,
        num_return_sequences=num_return_sequences,
        eos_token_id=eos or None, pad_token_id=pad, use_cache=True,
        return_dict_in_generate=True, output_logits=return_logprobs or return_top_logprobs is not None)
    prompt_logprobs = None
    try:
        with torch.no_grad(), _root_parameters_gathered(trainer):
            extra = {}
            if return_prompt_logprobs:
                prompt_logprobs, extra = _prefill(model, ids, mask, rows, num_return_sequences)
                ids, mask = extra.pop("input_ids"), extra.pop("attention_mask")
                config.num_return_sequences = 1  # the rows are repeated already, as generate would
            generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                       tokenizer=tokenizer if stop_strings else None, **extra)
    finally:
        model.train(was_training)
        torch.random.set_rng_state(generator_state)
        if getattr(trainer, "is_fsdp_enabled", False):
            release_gathered_parameters(model)

    out = generated.sequences
    new = out if model.config.is_encoder_decoder else out[:, longest:]
    sequences, finished, reasons = [], [], []
    stops = StopStrings(stop_strings, tokenizer) if stop_strings else None
    for i, row in enumerate(new.tolist()):
        if model.config.is_encoder_decoder and row and row[0] == model.config.decoder_start_token_id:
            row = row[1:]
        cut = next((j for j, t in enumerate(row) if t in eos), None)
        reason = "length" if cut is None else "eos"
        if stops is not None:
            stop = stops.feed(stops.start(rows[i // num_return_sequences]), row if cut is None else row[:cut + 1])
            if stop is not None and (cut is None or stop < cut):
                cut, reason = stop, "stop_string"
        sequences.append(row if cut is None else row[:cut + 1])
        finished.append(cut is not None)
        reasons.append(reason)
    logprobs = top = top_ids = None
    if return_logprobs or return_top_logprobs is not None:
        steps = len(generated.logits)
        log_p_BNV = torch.log_softmax(torch.stack([x.float() for x in generated.logits], dim=1), dim=-1)
        if return_logprobs:
            all_BN = log_p_BNV.gather(-1, new[:, -steps:, None].long())[..., 0]
            logprobs = [all_BN[i, :len(seq)].tolist() for i, seq in enumerate(sequences)]
        if return_top_logprobs is not None:
            top_BNK, top_ids_BNK = torch.topk(log_p_BNV, return_top_logprobs, dim=-1)
            top = [top_BNK[i, :len(seq)].tolist() for i, seq in enumerate(sequences)]
            top_ids = [top_ids_BNK[i, :len(seq)].tolist() for i, seq in enumerate(sequences)]
    texts = None
    if return_text and tokenizer is not None:
        texts = tokenizer.batch_decode(sequences, skip_special_tokens=True)
    prompt_ids = [r for r in rows for _ in range(num_return_sequences)]
    return GenerationOutput(sequences=sequences, texts=texts, prompt_ids=prompt_ids, finished=finished,
                            num_return_sequences=num_return_sequences, logprobs=logprobs, finish_reasons=reasons,
                            prompt_logprobs=prompt_logprobs, top_logprobs=top, top_logprob_ids=top_ids)


def _prefill(model, ids, mask, rows: list[list[int]], n: int):
    """Every prompt but its last token through the model (positions from the mask, as ``generate`` makes them):
    each row's prompt logprobs (fp32 ``log_softmax`` of those logits at the next prompt token, ``len - 1`` per
    prompt, repeated for its ``n`` rows) and ``generate``'s inputs: ids, mask and the KV cache, each repeated
    ``n`` times per prompt (``generate`` expands ids and mask so, but not a given cache)."""
    longest = ids.shape[1]
    extra = {"input_ids": ids.repeat_interleave(n, 0), "attention_mask": mask.repeat_interleave(n, 0)}
    if longest == 1:  # every prompt is one token: nothing to prefill
        return [[] for _ in rows for _ in range(n)], extra
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True)
    log_p = torch.log_softmax(out.logits.float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)
    extra["cache"] = cache
    return [log_p[i, longest - len(r):].tolist() for i, r in enumerate(rows) for _ in range(n)], extra
