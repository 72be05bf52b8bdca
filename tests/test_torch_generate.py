"""generate() on the PyTorch backend: the JAX engine's signature, output and greedy tokens."""

import pytest

from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer

PROMPTS = ["The quick brown", "12 + 30 =", "Iterative supervised fine-tuning lets"]


def _trainer(model_dir, tokenizer, tmp_path, backend):
    args = IterativeSFTConfig(output_dir=str(tmp_path / backend), report_to="none", backend=backend,
                              gradient_checkpointing=False)
    return IterativeSFTTrainer(model_dir, args=args, processing_class=tokenizer)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_greedy_tokens_equal_the_jax_engine(model_type, tiny_model_dir, tokenizer, tmp_path):
    model_dir = tiny_model_dir(model_type)
    kwargs = dict(max_new_tokens=12, eos_token_id=[])  # no early stop: every row makes 12 tokens
    jax_out = _trainer(model_dir, tokenizer, tmp_path, "jax").generate(PROMPTS, **kwargs)
    torch_out = _trainer(model_dir, tokenizer, tmp_path, "torch").generate(PROMPTS, **kwargs)
    assert type(torch_out) is type(jax_out)  # one GenerationOutput class for both engines
    assert [jax_out.prompt_index(r) for r in range(3)] == [0, 1, 2]
    assert torch_out.sequences == jax_out.sequences
    assert torch_out.prompt_ids == jax_out.prompt_ids and torch_out.texts == jax_out.texts
    assert all(len(s) == 12 for s in torch_out.sequences) and not any(torch_out.finished)


def test_processors_and_stop_strings_equal_the_jax_engine(tiny_model_dir, tokenizer, tmp_path):
    """Greedy with ``repetition_penalty``, ``min_new_tokens`` and ``stop_strings`` (a piece of row 0's text): the
    torch engine (transformers' processors and ``StopStringCriteria``) returns the JAX engine's tokens, texts and
    ``finish_reasons``; one prompt per call (transformers also penalizes left padding's pad token)."""
    model_dir = tiny_model_dir("llama")
    engines = [_trainer(model_dir, tokenizer, tmp_path, backend) for backend in ("jax", "torch")]
    base = dict(max_new_tokens=10, repetition_penalty=1.4, min_new_tokens=3)
    free = engines[0].generate(PROMPTS[:1], eos_token_id=[], **base)
    text = free.texts[0]
    stop = next(text[j:j + 2] for j in range(2, len(text) - 1) if text[j:j + 2].isprintable()
                and text[j:j + 2].strip() and "\ufffd" not in text[j:j + 2])
    unused = next(t for t in range(3, 300) if t not in free.sequences[0])
    outs = [e.generate(PROMPTS[:1], eos_token_id=unused, stop_strings=stop, **base) for e in engines]
    assert outs[0].sequences == outs[1].sequences and outs[0].texts == outs[1].texts
    assert outs[0].finish_reasons == outs[1].finish_reasons == ["stop_string"] and stop in outs[1].texts[0]
    assert len(outs[1].sequences[0]) < 10 and outs[1].finished == [True]
    for engine in engines:  # `messages` need a chat template, which this tokenizer lacks: refused on both
        with pytest.raises(ValueError, match="no chat template"):
            engine.generate(messages=[[{"role": "user", "content": "hi"}]])


def test_sampling_seeds_rows_and_eos(tiny_model_dir, tokenizer, tmp_path):
    trainer = _trainer(tiny_model_dir("llama"), tokenizer, tmp_path, "torch")
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, num_return_sequences=3, eos_token_id=[])
    a = trainer.generate(PROMPTS[:2], seed=1, **kw)
    assert len(a.sequences) == 6 and a.prompt_ids[0] == a.prompt_ids[2] != a.prompt_ids[3]
    assert a.prompt_index(4) == 1
    assert trainer.generate(PROMPTS[:2], seed=1, **kw).sequences == a.sequences
    assert trainer.generate(PROMPTS[:2], **kw).sequences != trainer.generate(PROMPTS[:2], **kw).sequences
    # EOS stops a row and stays in its sequence: make the first greedy token the EOS.
    first = trainer.generate(PROMPTS[:1], max_new_tokens=1, eos_token_id=[]).sequences[0][0]
    trainer.model.train()
    out = trainer.generate(PROMPTS[:1], max_new_tokens=8, eos_token_id=first)
    assert out.sequences == [[first]] and out.finished == [True]
    assert trainer.model.training  # decoding ran in eval mode; the caller's mode is restored


def test_bad_generate_arguments(tiny_model_dir, tokenizer, tmp_path):
    trainer = _trainer(tiny_model_dir("llama"), tokenizer, tmp_path, "torch")
    for kwargs, exc in ((dict(), ValueError), (dict(prompts="abc"), TypeError),
                        (dict(prompts=["a"], max_new_tokens=0), ValueError),
                        (dict(prompts=["a"], do_sample=True, temperature=0), ValueError),
                        # checks shared with the JAX engine (the torch copy had missed these two)
                        (dict(prompts=["a"], top_k=-1), ValueError), (dict(input_ids=[[1.5, 2.0]]), TypeError)):
        with pytest.raises(exc):
            trainer.generate(**kwargs)


def test_logprobs_are_the_models_at_temperature_one(tiny_model_dir, tokenizer, tmp_path):
    """``return_logprobs``: sampled at temperature 1.5 with top-k, each token's logprob equals ``log_softmax``
    of the model's own logits of the finished sequence (a full forward, fp32, 1e-5), not the warped
    distribution's; greedy logprobs equal the JAX engine's on the same weights (1e-4: two frameworks' fp32)."""
    import numpy as np
    import torch

    model_dir = tiny_model_dir("llama")
    trainer = _trainer(model_dir, tokenizer, tmp_path, "torch")
    out = trainer.generate(PROMPTS, max_new_tokens=10, do_sample=True, temperature=1.5, top_k=30, seed=0,
                           num_return_sequences=2, eos_token_id=[2], return_logprobs=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    diffs = []
    for prompt, seq, got in zip(out.prompt_ids, out.sequences, out.logprobs):
        assert len(got) == len(seq) > 0
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + seq])).logits[0].float()
        want = torch.log_softmax(logits, -1)[len(prompt) - 1:-1].gather(-1, torch.tensor(seq)[:, None])[:, 0]
        diffs.append(np.abs(np.asarray(got) - want.numpy()).max())
    assert max(diffs) <= 1e-5
    kwargs = dict(max_new_tokens=8, eos_token_id=[], return_logprobs=True)
    torch_greedy = trainer.generate(PROMPTS, **kwargs)
    jax_greedy = _trainer(model_dir, tokenizer, tmp_path, "jax").generate(PROMPTS, **kwargs)
    assert torch_greedy.sequences == jax_greedy.sequences
    assert np.abs(np.array(torch_greedy.logprobs) - np.array(jax_greedy.logprobs)).max() <= 1e-4
    assert trainer.generate(PROMPTS, max_new_tokens=2).logprobs is None


def test_prompt_and_top_logprobs_on_both_engines(tiny_model_dir, tokenizer, tmp_path):
    """``return_prompt_logprobs`` equal ``compute_logprobs`` of the prompts and ``return_top_logprobs=4`` the 4
    largest entries of a full forward's ``log_softmax`` at each generated position (fp32, 1e-5), on both engines
    (sampled, 2 rows per prompt, prompts of different lengths: left padding); the torch engine's tokens are those
    of a call without them (its prompts' KV came from its own prefill); ``k`` not a positive int or above the
    vocabulary refused naming the argument."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir("llama")
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    vocab = reference.config.vocab_size
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.2, num_return_sequences=2, seed=3, eos_token_id=[2])
    for backend in ("jax", "torch"):
        trainer = _trainer(model_dir, tokenizer, tmp_path, backend)
        out = trainer.generate(PROMPTS, return_prompt_logprobs=True, return_top_logprobs=4, **kw)
        want = trainer.compute_logprobs(out.prompt_ids)
        assert [len(p) for p in out.prompt_logprobs] == [len(p) - 1 for p in out.prompt_ids]
        assert max(np.abs(np.asarray(g) - w).max() for g, w in zip(out.prompt_logprobs, want)) <= 1e-5
        if backend == "torch":
            assert trainer.generate(PROMPTS, **kw).sequences == out.sequences
        for name, bad, exc in (("return_top_logprobs", 0, ValueError), ("return_top_logprobs", 2.0, TypeError),
                               ("return_top_logprobs", vocab + 1, ValueError),
                               ("return_prompt_logprobs", 1, TypeError)):
            with pytest.raises(exc, match=f"`{name}`"):
                trainer.generate(PROMPTS, **{name: bad})
        for prompt, seq, top, top_ids in zip(out.prompt_ids, out.sequences, out.top_logprobs, out.top_logprob_ids):
            with torch.no_grad():  # the reference: one full forward of prompt + completion (torch, fp32)
                logits = reference(input_ids=torch.tensor([prompt + seq])).logits[0].float()
            full = torch.log_softmax(logits, -1)[len(prompt) - 1:-1].numpy()
            top, top_ids = np.asarray(top), np.asarray(top_ids)
            assert top.shape == top_ids.shape == (len(seq), 4)
            assert np.abs(top - -np.sort(-full, axis=-1)[:, :4]).max() <= 1e-5
            assert np.abs(np.take_along_axis(full, top_ids, axis=-1) - top).max() <= 1e-5
