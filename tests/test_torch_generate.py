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
