"""Every TrainingArguments field is honoured, refused or not applicable, per engine (itersft_jax.shared.fields), and the
torch-side features (NEFTune, Liger, torch_compile) plus the shared data_seed / num_input_tokens_seen.

Tolerances: fp32 on CPU. Runs that must be identical (same model, data, RNG sequence) compare exactly or to 1e-6
(reduction order only); "differs" means by more than 1e-4, far above that noise.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import sys

import pytest
import torch

from itersft_jax.shared import fields
from itersft_jax.shared.config import IterativeSFTConfig
from itersft_jax.shared.fields import FIELDS, REFUSED, check_fields, markdown_table, refusals
from tests.support.offline import tiny_model

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Question: what is two plus two? Answer: four.",
         "def add(a, b):\n    return a + b\n", "12 + 30 = 42.", "Rejection sampling keeps only the verified."]
FIELDS_PAGE = os.path.join(os.path.dirname(__file__), "..", "docs", "configuration.md")

# A value each refused (field, engine) refuses, in the form __post_init__ leaves it in.
REFUSED_VALUES = {
    ("num_train_epochs", "both"): 2.0,
    ("lr_scheduler_type", "torch"): "reduce_lr_on_plateau",
    ("optim_args", "both"): "beta1=0.8,amsgrad=True",  # JAX's AdamW: no amsgrad; torch's AdamW reads no key
    ("optim_target_modules", "jax"): ["q_proj"],
    ("average_tokens_across_devices", "both"): False,
    ("fp16", "jax"): True,
    ("bf16_full_eval", "both"): True,
    ("fp16_full_eval", "both"): True,
    ("activation_checkpointing_kwargs", "jax"): {"use_reentrant": False, "offload": True},
    ("torch_empty_cache_steps", "torch"): 4,
    ("mesh", "torch"): "fsdp:2",
    ("auto_find_batch_size", "both"): True,
    ("eval_do_concat_batches", "both"): False,
    ("eval_use_gather_object", "both"): True,
    ("include_for_metrics", "both"): ["inputs"],
    ("batch_eval_metrics", "both"): True,
    ("eval_on_start", "both"): True,
    ("save_only_model", "jax"): True,
    ("save_strategy", "jax"): "best",
    ("enable_jit_checkpoint", "both"): True,
    ("load_best_model_at_end", "both"): True,
    ("restore_callback_states_from_checkpoint", "both"): True,
    ("parallelism_config", "both"): {"tp_size": 2},
    ("train_sampling_strategy", "both"): "group_by_length",
    ("fsdp", "jax"): "full_shard",
    ("fsdp_config", "jax"): {"min_num_params": 1000},
    ("deepspeed", "both"): "ds_config.json",
    ("debug", "both"): ["underflow_overflow"],
    ("skip_memory_metrics", "jax"): False,
}


@pytest.fixture(scope="module")
def default_args(tmp_path_factory):
    return IterativeSFTConfig(output_dir=str(tmp_path_factory.mktemp("fields")), report_to="none")


def with_value(args, name, value):
    args = copy.copy(args)  # the check reads attributes: set the value as __post_init__ would leave it
    setattr(args, name, value)
    return args


# ----------------------------------------------------------------------------------------------------------
# The table


def test_every_field_has_a_decision_on_both_engines():
    # A new transformers release adds fields: each needs a decision here before it can be trusted.
    missing = [f.name for f in dataclasses.fields(IterativeSFTConfig) if f.init and f.name not in FIELDS]
    assert not missing, f"fields without a decision in itersft_jax/shared/fields.py: {missing}"
    for name, rules in FIELDS.items():
        assert set(rules) == {"jax", "torch"}, name
        for rule in rules.values():
            assert rule.status in (fields.HONOURED, REFUSED, fields.NOT_APPLICABLE) and rule.note, name
            assert rule.status != REFUSED or rule.refuse is not None, name


def test_fields_module_imports_neither_jax_nor_torch():
    import subprocess

    code = "import sys, itersft_jax.shared.fields; print(sorted({'jax', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_default_config_refuses_nothing(default_args):
    assert refusals(default_args, "jax") == [] and refusals(default_args, "torch") == []


def test_every_refusal_is_tested():
    refusing = {(name, engine) for name, rules in FIELDS.items() for engine, rule in rules.items()
                if rule.refuse is not None and name not in ("gradient_checkpointing_kwargs", "full_determinism")}
    tested = {(name, engine) for name, where in REFUSED_VALUES for engine in
              (("jax", "torch") if where == "both" else (where,))}
    assert refusing == tested


@pytest.mark.parametrize(("name", "where"), sorted(REFUSED_VALUES))
def test_refused_value_raises_naming_the_field(default_args, name, where):
    args = with_value(default_args, name, REFUSED_VALUES[name, where])
    for engine in ("jax", "torch"):
        if where in (engine, "both"):
            with pytest.raises(ValueError, match=re.escape(f"`{name}=")):
                check_fields(args, engine)
        else:
            assert refusals(args, engine) == []


@pytest.mark.parametrize(("name", "value"), [
    ("num_train_epochs", 1), ("full_determinism", True),
    ("activation_checkpointing_kwargs", {"use_reentrant": True, "every_n_layers": 1}),
    ("lr_scheduler_type", "cosine"), ("neftune_noise_alpha", 5.0), ("include_num_input_tokens_seen", "all"),
    ("data_seed", 7), ("torch_compile", True)])
def test_honoured_values_pass(default_args, name, value):
    args = with_value(default_args, name, value)
    assert refusals(args, "jax") == [] and refusals(args, "torch") == []  # XLA:CPU is deterministic


def test_optim_args_keys_each_engine_reads(default_args):
    """The JAX AdamW reads beta1/beta2 from optim_args; transformers' AdamW reads none (before: dropped without a
    word on the torch engine — its betas are adam_beta1/adam_beta2); both SGDs read momentum."""
    adamw = with_value(default_args, "optim_args", "beta1=0.8, beta2=0.95")
    assert refusals(adamw, "jax") == []
    assert "adam_beta1" in refusals(adamw, "torch")[0]
    sgd = with_value(with_value(default_args, "optim", "sgd"), "optim_args", "momentum=0.9,nesterov=True")
    assert refusals(sgd, "jax") == [] and refusals(sgd, "torch") == []


def test_unknown_field_is_refused_when_set(tmp_path):
    @dataclasses.dataclass
    class Newer(IterativeSFTConfig):
        shiny_new_knob: int = 0

    args = Newer(output_dir=str(tmp_path))
    assert refusals(args, "jax") == []
    with pytest.raises(ValueError, match="shiny_new_knob=3.*no decision"):
        check_fields(with_value(args, "shiny_new_knob", 3), "torch")


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_trainers_refuse_before_loading_the_model(backend, tmp_path):
    from itersft_jax import IterativeSFTTrainer

    args = IterativeSFTConfig(output_dir=str(tmp_path), num_train_epochs=5, backend=backend)
    with pytest.raises(ValueError, match="`num_train_epochs=5"):  # not an OSError about the missing model
        IterativeSFTTrainer(str(tmp_path / "no-such-model"), args=args)


def test_docs_show_the_generated_table():
    with open(FIELDS_PAGE) as f:
        text = f.read()
    found = re.search(r"<!-- fields-table:start -->\n(.*?)<!-- fields-table:end -->", text, flags=re.S)
    assert found, "docs/configuration.md lacks the field table markers"
    assert found.group(1) == markdown_table(), "regenerate: python -m itersft_jax.shared.fields --markdown"


# ----------------------------------------------------------------------------------------------------------
# Torch features


def torch_trainer(model, tokenizer, tmp_path, **config):
    from itersft_torch import IterativeSFTTrainer

    config = {"per_device_train_batch_size": 2, "report_to": "none", "gradient_checkpointing": False,
              "learning_rate": 1e-3, **config}
    args = IterativeSFTConfig(output_dir=str(tmp_path / "out"), **config)
    return IterativeSFTTrainer(model, args=args, processing_class=tokenizer)


def test_neftune_noise_is_uniform_at_the_papers_scale_on_attended_tokens_only():
    from itersft_torch.features import NEFTune

    torch.manual_seed(0)
    model = tiny_model("llama", 64)
    embed = model.get_input_embeddings()
    ids_BT = torch.randint(3, 64, (2, 6))
    mask_BT = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    clean_BTD = embed(ids_BT)
    neftune = NEFTune(model, alpha=5.0)
    with neftune.active(mask_BT):
        noisy_BTD = embed(ids_BT)
    noise_BTD = noisy_BTD - clean_BTD
    d = clean_BTD.shape[-1]
    for b, length in enumerate((6, 4)):
        bound = 5.0 / (length * d) ** 0.5
        assert noise_BTD[b, :length].abs().max() <= bound * (1 + 1e-5)
        assert noise_BTD[b, :length].abs().max() > 0.9 * bound  # uniform on [-bound, bound]: its max nears it
    assert torch.equal(noise_BTD[1, 4:], torch.zeros_like(noise_BTD[1, 4:]))  # padding untouched
    assert torch.equal(embed(ids_BT), clean_BTD)  # outside active(): no noise
    with pytest.raises(RuntimeError, match="neftune_noise_alpha"), neftune.active(mask_BT):
        pass  # a forward that never reaches the embeddings would silently train without noise


def test_neftune_changes_training_but_not_generate_or_evaluate(tokenizer, tmp_path):
    model = tiny_model("llama", len(tokenizer))
    plain = torch_trainer(copy.deepcopy(model), tokenizer, tmp_path)
    noisy = torch_trainer(copy.deepcopy(model), tokenizer, tmp_path, neftune_noise_alpha=5.0)
    ids = tokenizer(TEXTS[3])["input_ids"]
    eval_set = [{"input_ids": ids, "labels": ids}]
    for trainer in (plain, noisy):
        trainer.model.train()  # transformers' hook would add noise to any forward in training mode
    with torch.no_grad():
        train_mode_logits = [t.model(input_ids=torch.tensor([ids])).logits for t in (plain, noisy)]
    assert torch.equal(*train_mode_logits)
    gens = [t.generate(TEXTS[:2], max_new_tokens=6).sequences for t in (plain, noisy)]
    evals = [t.evaluate(eval_set)["eval_loss"] for t in (plain, noisy)]
    assert gens[0] == gens[1] and evals[0] == evals[1]

    losses = [[t.step(texts=TEXTS)["loss"] for _ in range(2)] for t in (plain, noisy)]
    assert abs(losses[0][0] - losses[1][0]) > 1e-4 and abs(losses[0][1] - losses[1][1]) > 1e-4


def test_jax_neftune_changes_training_but_not_generate_or_evaluate(tokenizer, tiny_model_dir, tmp_path):
    from itersft_jax.trainer import IterativeSFTTrainer as JaxTrainer

    def make(**config):
        args = IterativeSFTConfig(output_dir=str(tmp_path / "jax"), per_device_train_batch_size=2, report_to="none",
                                  gradient_checkpointing=False, learning_rate=1e-3, **config)
        return JaxTrainer(tiny_model_dir("llama"), args=args, processing_class=tokenizer)

    plain, noisy = make(), make(neftune_noise_alpha=5.0)
    gens = [t.generate(TEXTS[:2], max_new_tokens=6).sequences for t in (plain, noisy)]
    evals = [t.evaluate(texts=TEXTS[3:])["eval_loss"] for t in (plain, noisy)]
    assert gens[0] == gens[1] and evals[0] == evals[1]
    losses = [[t.step(texts=TEXTS)["loss"] for _ in range(2)] for t in (plain, noisy)]
    assert abs(losses[0][0] - losses[1][0]) > 1e-4 and abs(losses[0][1] - losses[1][1]) > 1e-4
    with pytest.raises(ValueError, match="neftune_noise_alpha"):
        make(neftune_noise_alpha=float("nan"))


def test_neftune_noises_an_encoder_decoders_encoder_inputs(tokenizer, tmp_path):
    # BART's get_input_embeddings() is the decoder's module (weights tied, a different module): a hook there
    # would never see the encoder's inputs.
    model = tiny_model("bart", len(tokenizer))
    batch = dict(texts=["hello world", "the quick brown fox"], texts_labels=["bonjour", "le renard"])
    losses = [torch_trainer(copy.deepcopy(model), tokenizer, tmp_path, **config).step(**batch)["loss"]
              for config in ({}, {"neftune_noise_alpha": 5.0})]
    assert abs(losses[0] - losses[1]) > 1e-4


def test_torch_compile_compiles_the_model_step_runs(tokenizer, tmp_path):
    # The "eager" dynamo backend traces without generating code: cheap, and it runs the compiled graph path.
    from accelerate.utils import is_compiled_module
    from torch._dynamo.utils import counters

    model = tiny_model("llama", len(tokenizer), num_hidden_layers=1)
    plain = torch_trainer(copy.deepcopy(model), tokenizer, tmp_path, neftune_noise_alpha=5.0)
    compiled = torch_trainer(copy.deepcopy(model), tokenizer, tmp_path, neftune_noise_alpha=5.0,
                             torch_compile=True, torch_compile_backend="eager")
    assert is_compiled_module(compiled.model_wrapped) and not is_compiled_module(plain.model_wrapped)
    frames = counters["stats"]["unique_graphs"]
    torch.manual_seed(0)
    expected = plain.step(texts=TEXTS)["loss"]
    torch.manual_seed(0)
    got = compiled.step(texts=TEXTS)["loss"]
    assert counters["stats"]["unique_graphs"] > frames
    assert got == pytest.approx(expected, abs=1e-6)  # same noise (same RNG stream) through the compiled graph


def test_liger_kernel_needs_the_package_and_a_cuda_gpu(tokenizer, tmp_path, monkeypatch):
    model = tiny_model("llama", len(tokenizer))
    with pytest.raises((ImportError, ValueError), match="use_liger_kernel"):  # CPU: a GPU is needed either way
        torch_trainer(model, tokenizer, tmp_path, use_liger_kernel=True)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # importlib's "not installed"
    with pytest.raises(ImportError, match="use_liger_kernel.*pip install"):
        torch_trainer(model, tokenizer, tmp_path, use_liger_kernel=True)


# ----------------------------------------------------------------------------------------------------------
# Shared: data_seed and num_input_tokens_seen


def test_data_seed_seeds_the_shuffle(tokenizer, tmp_path):
    model = tiny_model("llama", len(tokenizer))

    def first_call_loss(**config):  # batch 1: the call's loss depends on the order of its 5 updates
        trainer = torch_trainer(copy.deepcopy(model), tokenizer, tmp_path, per_device_train_batch_size=1,
                                **config)
        return trainer.step(texts=TEXTS)["loss"]

    reference = first_call_loss(seed=1, data_seed=7)
    assert first_call_loss(seed=2, data_seed=7) == pytest.approx(reference, abs=1e-6)
    assert abs(first_call_loss(seed=1, data_seed=8) - reference) > 1e-4


def test_both_engines_report_the_same_num_input_tokens_seen(tiny_model_dir, tokenizer, tmp_path):
    from itersft_jax import IterativeSFTTrainer

    expected = sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    for backend in ("jax", "torch"):
        args = IterativeSFTConfig(output_dir=str(tmp_path / backend), per_device_train_batch_size=2,
                                  report_to="none", gradient_checkpointing=False, backend=backend,
                                  include_num_input_tokens_seen=True)
        trainer = IterativeSFTTrainer(tiny_model_dir("llama"), args=args, processing_class=tokenizer)
        assert trainer.step(texts=TEXTS)["num_input_tokens_seen"] == expected, backend
        assert trainer.step(texts=TEXTS[:2])["num_input_tokens_seen"] == trainer.state.num_input_tokens_seen


def test_remat_policy_names_come_from_the_models_table():
    # The policy names live in models.remat.REMAT_POLICIES alone: the field table accepts the key, the model
    # loader refuses a name outside that table, naming the field.
    from itersft_jax.io.weights import remat_setting

    args = IterativeSFTConfig(output_dir="unused", report_to="none", gradient_checkpointing_kwargs={"policy": "dots"})
    check_fields(args, "jax")
    assert remat_setting(True, {"policy": "dots"}) == "dots"
    with pytest.raises(ValueError, match="gradient_checkpointing_kwargs.*'nope'.*'full'"):
        remat_setting(True, {"policy": "nope"})
