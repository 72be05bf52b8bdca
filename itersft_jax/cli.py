"""The ``itersft`` command. ``itersft demo`` runs expert iteration on a built-in task (see ``demo.py``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="itersft",
        description="Iterative SFT (TRL's IterativeSFTTrainer) for JAX, with a PyTorch backend.")
    parser.add_argument("--version", action="version", version=f"itersft {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="expert iteration on a built-in string-reversal task, offline",
        description="Rejection-sampling fine-tuning (expert iteration) of a tiny built-in Llama on a "
                    "verifiable task (reverse a string of letters), after a small SFT warm start. "
                    "Nothing is downloaded. Writes the final HF model, metrics.json and curve.png.")
    from .demo import DemoConfig

    d = DemoConfig()
    demo.add_argument("--rounds", type=int, default=None,
                      help=f"expert-iteration rounds (default {d.rounds})")
    demo.add_argument("--samples-per-prompt", type=int, default=None,
                      help=f"completions sampled per training prompt (default {d.samples_per_prompt})")
    demo.add_argument("--prompts-per-round", type=int, default=None,
                      help=f"training prompts per round (default {d.prompts_per_round})")
    demo.add_argument("--seed", type=int, default=d.seed, help="seed of model, data and sampling")
    demo.add_argument("--backend", choices=("jax", "torch"), default=d.backend, help="training engine")
    demo.add_argument("--output-dir", default=d.output_dir, help="where the model, metrics and plot go")
    demo.add_argument("--quick", action="store_true", help="a tiny smoke-test run (for tests)")
    demo.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        from .demo import DemoConfig, run

        logging.getLogger("transformers").setLevel(logging.ERROR)
        given = {"rounds": args.rounds, "samples_per_prompt": args.samples_per_prompt,
                 "prompts_per_round": args.prompts_per_round}
        overrides = {k: v for k, v in given.items() if v is not None}
        overrides.update(seed=args.seed, backend=args.backend, output_dir=args.output_dir,
                         plot=not args.no_plot)
        cfg = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
        run(cfg)
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
