"""The PyTorch backend's step() contract on tiny random models (offline, CPU, fp32).

Tolerances: fp32 on CPU; a reference that runs the same math in another order (one padded batch instead of
micro-batches, unfused AdamW) agrees to ~1e-7, so 1e-6 on losses / parameters and 1e-5 relative on grad
norms leave room for reduction order only. A failure at these tolerances is a real difference in the math.
"""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from itersft_torch import IterativeSFTConfig, IterativeSFTTrainer
from tests.support import root_on_path
from tests.support.engines import make_trainer
from tests.support.offline import tiny_model
from tests.support.torch_reference import max_diff, random_samples, reference_update, snapshot

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is two plus two? Answer: four.",
    "def add(a, b):\n    return a + b\n",
    "Rejection sampling keeps only the verified completions.",
    "12 + 30 = 42.",
]


# ----------------------------------------------------------------------------------------------------------


def test_update_equals_hand_computed_reference(tokenizer, tmp_path):
    """step() over 2 micro-batches x 2 accumulation == one forward over all 4 samples (sum CE / tokens),
    clipped to max_grad_norm=1, one AdamW step. Loss and parameters within 1e-6, grad norm 1e-5 relative."""
    model = tiny_model("llama", len(tokenizer))
    samples = random_samples(4, len(tokenizer))
    ref, ref_loss, ref_norm = reference_update(model, samples, lr=1e-3)
    trainer = make_trainer("torch", model, tokenizer, tmp_path / "out", per_device_train_batch_size=2,
                           gradient_accumulation_steps=2, learning_rate=1e-3)
    stats = trainer.step(input_ids=samples)
    assert stats["updates"] == 1
    assert stats["loss"] == pytest.approx(ref_loss, abs=1e-6)
    assert stats["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
    assert ref_norm > 1.0, "the test should exercise clipping"
    assert max_diff(snapshot(ref), snapshot(model)) <= 1e-6


def test_gradient_is_token_weighted_exactly(tokenizer, tmp_path):
    """With SGD(lr=1) and no clipping the update IS the gradient: it must equal the gradient of the
    token-weighted mean over the whole update (1e-6), although micro-batches hold different token counts."""
    model = tiny_model("llama", len(tokenizer))
    samples = random_samples(3, len(tokenizer), seed=1, lo=3, hi=25)
    ref = copy.deepcopy(model).train()
    lengths = [len(x) for x in samples]
    ids = torch.nn.utils.rnn.pad_sequence(samples, batch_first=True)
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    logits = ref(input_ids=ids, attention_mask=mask).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                    ignore_index=-100).backward()  # mean over all label tokens of the batch
    before = snapshot(model)
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = make_trainer("torch", model, tokenizer, tmp_path / "out", optimizers=(sgd, None),
                           per_device_train_batch_size=1, gradient_accumulation_steps=3, max_grad_norm=0.0)
    trainer.step(input_ids=samples)
    for name, p in model.named_parameters():
        grad = dict(ref.named_parameters())[name].grad
        torch.testing.assert_close(before[name] - p.detach(), grad, atol=1e-6, rtol=0)


def test_micro_batch_split_does_not_change_the_update(tokenizer, tmp_path):
    """(micro-batch, accumulation) = (4, 1), (2, 2), (1, 4) over the same 4 samples: one update each, equal
    loss (1e-6), grad norm (1e-5 relative) and parameters (1e-5)."""
    base = tiny_model("llama", len(tokenizer))
    samples = random_samples(4, len(tokenizer), seed=2)
    results = []
    for batch, accum in [(4, 1), (2, 2), (1, 4)]:
        model = copy.deepcopy(base)
        trainer = make_trainer("torch", model, tokenizer, tmp_path / "out", per_device_train_batch_size=batch,
                               gradient_accumulation_steps=accum, learning_rate=1e-3)
        results.append((trainer.step(input_ids=samples), snapshot(model)))
    (first, params), rest = results[0], results[1:]
    for stats, other in rest:
        assert stats["updates"] == 1
        assert stats["loss"] == pytest.approx(first["loss"], abs=1e-6)
        assert stats["grad_norm"] == pytest.approx(first["grad_norm"], rel=1e-5)
        assert max_diff(params, other) <= 1e-5


def test_global_step_counts_optimizer_updates(tokenizer, tmp_path):
    model = tiny_model("llama", len(tokenizer))
    trainer = make_trainer("torch", model, tokenizer, tmp_path / "out", per_device_train_batch_size=2,
                           gradient_accumulation_steps=2)
    samples = random_samples(10, len(tokenizer), hi=8)
    assert trainer.step(input_ids=samples)["updates"] == 3  # 4 + 4 + a trailing partial group of 2
    assert trainer.state.global_step == 3
    assert trainer.step(input_ids=samples[:5])["global_step"] == 5


def test_encoder_decoder_trains_on_texts_labels(tokenizer, tmp_path):
    """Tiny BART: `texts` feed the encoder, `texts_labels` are the decoder targets. The call's loss equals
    HF's own (token-mean) loss with those targets at the initial weights (1e-5)."""
    model = tiny_model("bart", len(tokenizer))
    sources, targets = TEXTS[:4], [t.upper() for t in TEXTS[:4]]
    ref = copy.deepcopy(model).train()
    enc = tokenizer(sources, padding=True, return_tensors="pt")
    dec = tokenizer(targets, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref_loss = ref(**enc, labels=dec["input_ids"].masked_fill(dec["attention_mask"] == 0, -100)).loss.item()
    trainer = make_trainer("torch", model, tokenizer, tmp_path / "out", per_device_train_batch_size=2,
                           gradient_accumulation_steps=2)
    stats = trainer.step(texts=sources, texts_labels=targets)
    assert stats["loss"] == pytest.approx(ref_loss, abs=1e-5)
    assert stats["num_tokens"] == int(dec["attention_mask"].sum())
    with pytest.raises(ValueError, match="texts_labels"):
        trainer.step(texts=sources)  # seq2seq needs decoder targets
    stats = trainer.step(prompts=sources, completions=targets)
    assert stats["updates"] == 1 and stats["global_step"] == 2


def test_peft_lora_trains_only_the_adapter(tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_model("llama", len(tokenizer))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules=["q_proj", "v_proj"]))
    trainer = make_trainer("torch", model, tokenizer, tmp_path / "out", per_device_train_batch_size=2,
                           learning_rate=1e-2)
    assert trainer.is_peft_model
    before = snapshot(model)
    for seed in range(2):  # lora_B starts at 0, so lora_A only gets a gradient from the second update on
        trainer.step(input_ids=random_samples(4, len(tokenizer), seed=seed))
    after = snapshot(model)
    lora = {n for n in before if "lora_" in n}
    assert lora and all((before[n] != after[n]).any() for n in lora)
    assert all(torch.equal(before[n], after[n]) for n in before if n not in lora)
    trainer.save_model(str(tmp_path / "adapter"))
    assert os.path.exists(tmp_path / "adapter" / "adapter_config.json")


def test_save_model_round_trips_through_auto_model(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", len(tokenizer))
    trainer = make_trainer("torch", model, tokenizer, tmp_path / "out", learning_rate=1e-3)
    trainer.step(texts=TEXTS)
    trainer.save_model(str(tmp_path / "saved"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved")).eval()
    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-6, rtol=0)


def test_constant_schedule_keeps_training_past_max_steps(tokenizer, tmp_path):
    # The warning and the held final LR past max_steps are contract tests (test_contract.py).
    samples = random_samples(4, len(tokenizer))
    constant = make_trainer("torch", tiny_model("llama", len(tokenizer)), tokenizer, tmp_path / "out", max_steps=1,
                            lr_scheduler_type="constant", learning_rate=1e-3)
    constant.step(input_ids=samples)
    before = snapshot(constant.model)
    assert constant.step(input_ids=samples)["learning_rate"] == pytest.approx(1e-3)
    assert max_diff(before, snapshot(constant.model)) > 0, "past max_steps a constant schedule keeps training"


def test_without_max_steps_schedule_is_warmup_then_constant(tokenizer, tmp_path, caplog):
    model = tiny_model("llama", len(tokenizer))
    trainer = make_trainer("torch", model, tokenizer, tmp_path / "out", per_device_train_batch_size=1, warmup_steps=2,
                           learning_rate=1e-3)  # linear (the default) has no length to decay over
    assert trainer.step(input_ids=random_samples(2, len(tokenizer)))["learning_rate"] == pytest.approx(5e-4)
    lrs = [trainer.step(input_ids=random_samples(1, len(tokenizer)))["learning_rate"] for _ in range(2)]
    assert lrs == pytest.approx([1e-3, 1e-3])
    caplog.set_level(logging.WARNING, logger="itersft_torch.trainer")
    cosine = make_trainer("torch", tiny_model("llama", len(tokenizer)), tokenizer, tmp_path / "out",
                          lr_scheduler_type="cosine", learning_rate=1e-3)
    assert "'cosine' needs `max_steps`" in caplog.text
    assert cosine.step(input_ids=random_samples(2, len(tokenizer)))["learning_rate"] == pytest.approx(1e-3)
    # A warmup ratio needs max_steps: refused when the config is built (it was ignored, with a warning).
    with pytest.raises(ValueError, match="`warmup_steps`=0.1 is a ratio of `max_steps`"):
        make_trainer("torch", model, tokenizer, tmp_path / "out", warmup_steps=0.1, lr_scheduler_type="cosine")


def test_model_id_loading_and_dtype_strings(tiny_model_dir, tmp_path):
    from transformers import BartForConditionalGeneration, LlamaForCausalLM

    args = IterativeSFTConfig(output_dir=str(tmp_path), model_init_kwargs={"torch_dtype": "bfloat16"},
                              gradient_checkpointing=False)
    trainer = IterativeSFTTrainer(tiny_model_dir("llama"), args=args)
    assert isinstance(trainer.model, LlamaForCausalLM) and trainer.model.dtype == torch.bfloat16
    assert args.model_init_kwargs == {"torch_dtype": "bfloat16"}, "the caller's kwargs are not rewritten"
    assert trainer.processing_class is not None  # AutoTokenizer from the directory
    assert trainer.step(texts=TEXTS)["updates"] == 1
    seq2seq = IterativeSFTTrainer(tiny_model_dir("bart"), args=IterativeSFTConfig(
        output_dir=str(tmp_path), model_init_kwargs={"dtype": "auto"}))
    assert isinstance(seq2seq.model, BartForConditionalGeneration) and seq2seq.is_encoder_decoder
    with pytest.raises(ValueError, match="dtype"):
        IterativeSFTTrainer(tiny_model_dir("llama"), args=IterativeSFTConfig(
            output_dir=str(tmp_path), model_init_kwargs={"dtype": "float77"}))


def test_optimize_device_cache_and_training_args(tokenizer, tmp_path):
    from transformers import TrainingArguments

    model = tiny_model("llama", len(tokenizer))
    trainer = IterativeSFTTrainer(model, args=TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3),
                                  processing_class=tokenizer)
    assert isinstance(trainer.args, IterativeSFTConfig)
    trainer.args.optimize_device_cache = True
    assert trainer.step(texts=TEXTS)["learning_rate"] == pytest.approx(1e-3)


def test_no_jax_import_and_facade_returns_the_torch_trainer(tmp_path):
    """In a fresh interpreter: importing the torch backend, and building it through the facade with
    backend="torch" (argument or config field), never imports jax/flax/optax."""
    code = textwrap.dedent(f"""
        import sys
        import itersft_torch
        engine = itersft_torch.IterativeSFTTrainer
        assert "jax" not in sys.modules
        import itersft_jax
        from tests.support.offline import make_tokenizer, tiny_model
        tok = make_tokenizer()
        out = {str(tmp_path)!r}
        a = itersft_jax.IterativeSFTTrainer(tiny_model("llama", len(tok)), backend="torch", processing_class=tok,
                                            args=itersft_jax.IterativeSFTConfig(output_dir=out))
        b = itersft_jax.IterativeSFTTrainer(tiny_model("llama", len(tok)), processing_class=tok,
                                            args=itersft_jax.IterativeSFTConfig(output_dir=out, backend="torch"))
        assert type(a) is engine and type(b) is engine, (type(a), type(b))
        assert isinstance(a.step(texts=["hello world", "two plus two"]), dict)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax", "optax"))
        assert not bad, bad
        print("OK")
    """)
    env = root_on_path(dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_trl_quick_start_runs_with_only_the_import_changed(tiny_model_dir, tmp_path, monkeypatch):
    """TRL's documented quick start, verbatim but for the import and the model id ("facebook/opt-350m" ->
    a local tiny OPT shaped like it: post-layer-norm, word_embed_proj_dim < hidden_size)."""
    model_id = tiny_model_dir("opt", do_layer_norm_before=False, word_embed_proj_dim=32)
    monkeypatch.chdir(tmp_path)

    from itersft_torch import IterativeSFTConfig, IterativeSFTTrainer
    # Using a model identifier
    trainer = IterativeSFTTrainer(
        model_id,
        args=IterativeSFTConfig(
            max_length=512,
            output_dir="./output",
        ),
    )
    # Or using a pre-instantiated model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(model_id)
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    trainer_2 = IterativeSFTTrainer(
        model,
        args=IterativeSFTConfig(
            max_length=512,
            output_dir="./output",
        ),
        processing_class=tokenizer,
    )
    assert model.model.decoder.project_in is not None  # the opt-350m shape is really exercised

    for t in (trainer, trainer_2):
        texts = TEXTS[:3]
        encoded = [tokenizer(x, return_tensors="pt") for x in texts]
        input_ids = [e["input_ids"][0] for e in encoded]
        attention_mask = [e["attention_mask"][0] for e in encoded]
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
        }
        assert t.step(**inputs)["updates"] == 1
        inputs = {
            "texts": texts,
            "texts_labels": texts,  # Optional, defaults to texts
        }
        stats = t.step(**inputs)
        assert stats["global_step"] == 2 and stats["learning_rate"] > 0
