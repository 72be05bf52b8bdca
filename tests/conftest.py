import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.support.offline import make_tokenizer, save_tiny_model  # noqa: E402


@pytest.hookimpl(optionalhook=True)  # xdist's hook: unknown, and unused, under -p no:xdist
def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): one worker per usable core, at most 4 (each holds JAX, torch and its
    compiled programs: ~2 GB), or ``ITERSFT_TEST_WORKERS``."""
    wanted = os.environ.get("ITERSFT_TEST_WORKERS")
    if wanted:
        return int(wanted)
    return max(1, min(len(os.sched_getaffinity(0)), 4))


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer("standard")


@pytest.fixture(scope="session")
def tokenizer_pad_eq_eos():
    return make_tokenizer("pad_eq_eos")


@pytest.fixture(scope="session")
def tokenizer_no_pad():
    return make_tokenizer("no_pad")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """Factory: ``tiny_model_dir("llama", **config_overrides)`` -> a saved HF directory (cached)."""
    made = {}

    def build(model_type: str, seed: int = 0, **overrides):
        key = (model_type, seed, tuple(sorted(overrides.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(f"tiny-{model_type}")
            made[key] = save_tiny_model(path, model_type, tokenizer, seed=seed, **overrides)
        return made[key]

    return build


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dir):
    """The tiny Llama most tests train (a saved HF directory)."""
    return tiny_model_dir("llama")
