"""IterativeSFTConfig: TRL's fields and defaults, CPU-safe bf16, ratios, secrets, parsing."""

import copy
import json
import pickle

import pytest
from transformers import HfArgumentParser, TrainingArguments

from itersft_jax.shared import config as config_module
from itersft_jax.shared.config import IterativeSFTConfig, resolve_config


def test_trl_quick_start_config_constructs_on_cpu(tmp_path):
    # TRL 0.23.1: bf16 defaulted to True and TrainingArguments refused it on a CPU-only machine.
    cfg = IterativeSFTConfig(max_length=512, output_dir=str(tmp_path))
    assert cfg.max_length == 512
    assert cfg.bf16 is False  # no bf16 accelerator here
    assert cfg.logging_steps == 10 and cfg.gradient_checkpointing is True
    assert cfg.truncation_mode == "keep_end" and cfg.backend == "jax"


def test_explicit_bf16_on_cpu_does_not_crash(tmp_path):
    cfg = IterativeSFTConfig(output_dir=str(tmp_path), bf16=True)
    assert cfg.bf16 is True and cfg.use_cpu is True


def test_fp16_turns_unset_bf16_off(tmp_path, monkeypatch):
    # As on a machine with a bf16 accelerator; the torch side has no bf16 GPU here (a JAX GPU install beside a
    # CPU torch): unset bf16 then means bf16 on, with the torch backend on the CPU rather than a crash.
    monkeypatch.setattr(config_module, "bf16_available", lambda: True)
    assert IterativeSFTConfig(output_dir=str(tmp_path), fp16=True).bf16 is False
    cfg = IterativeSFTConfig(output_dir=str(tmp_path), fp16=False)
    assert cfg.bf16 is True and cfg.use_cpu is True


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(truncation_mode="keep_middle"), "truncation_mode"),
    (dict(max_length=-5), "max_length"),
    (dict(backend="tf"), "backend"),
    (dict(logging_steps=0.25), "logging_steps"),
    (dict(save_steps=0.5, save_strategy="steps"), "save_steps"),
])
def test_bad_config_names_the_field(tmp_path, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        IterativeSFTConfig(output_dir=str(tmp_path), **kwargs)


def test_fractional_steps_resolve_against_max_steps(tmp_path):
    cfg = IterativeSFTConfig(output_dir=str(tmp_path), logging_steps=0.1, save_steps=0.5, max_steps=40)
    assert cfg.logging_steps == 4 and cfg.save_steps == 20


def test_secrets_are_never_printed_or_serialized(tmp_path):
    cfg = IterativeSFTConfig(output_dir=str(tmp_path), hub_token="hf_topsecret1",
                             model_init_kwargs={"token": "hf_topsecret2", "use_auth_token": "hf_topsecret3",
                                                "revision": "main"})
    pickled = pickle.dumps(cfg)  # what the torch backend's training_args.bin holds
    for text in (str(cfg), repr(cfg), cfg.to_json_string(), json.dumps(cfg.to_sanitized_dict()), str(pickled)):
        assert "topsecret" not in text
    assert "<HUB_TOKEN>" in str(cfg) and "<TOKEN>" in str(cfg)
    unpickled = pickle.loads(pickled)  # everything but the secrets survives
    assert unpickled.hub_token is None and unpickled.model_init_kwargs == {"revision": "main"}
    assert unpickled.to_dict() == {**cfg.to_dict(), "model_init_kwargs": {"revision": "main"}}
    assert cfg.model_init_kwargs["token"] == "hf_topsecret2" and cfg.hub_token == "hf_topsecret1"  # still usable
    for copied in (copy.copy(cfg), copy.deepcopy(cfg)):  # a copy is not a way out: it keeps them
        assert copied.hub_token == "hf_topsecret1" and copied.model_init_kwargs == cfg.model_init_kwargs


def test_hf_argument_parser(tmp_path):
    parser = HfArgumentParser(IterativeSFTConfig)
    (cfg,) = parser.parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--max_length", "64", "--truncation_mode", "keep_start",
        "--backend", "torch", "--model_init_kwargs", '{"revision": "v1"}', "--gradient_accumulation_steps", "4"])
    assert (cfg.max_length, cfg.truncation_mode, cfg.backend) == (64, "keep_start", "torch")
    assert cfg.model_init_kwargs == {"revision": "v1"} and cfg.gradient_accumulation_steps == 4


def test_plain_training_arguments_are_converted(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, gradient_accumulation_steps=3, seed=7)
    cfg = resolve_config(args)
    assert isinstance(cfg, IterativeSFTConfig)
    assert (cfg.learning_rate, cfg.gradient_accumulation_steps, cfg.seed) == (3e-4, 3, 7)
    assert resolve_config(cfg) is cfg
    assert isinstance(resolve_config(None), IterativeSFTConfig)
    with pytest.raises(TypeError, match="args"):
        resolve_config({"learning_rate": 1.0})
