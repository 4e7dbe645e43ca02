"""The `trl-epo` command line.

    trl-epo plot OUTPUT_DIR [--out DIR] [--kappa_low K] [--kappa_high K]   # PNG figures of a run's entropy dynamics
    trl-epo evaluate --model PATH --env toy --split iid ood ...           # = examples/evaluate.py

`python -m trl_epo ...` is the same.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _plot(args: argparse.Namespace) -> int:
    from .plotting import plot_run

    written = plot_run(args.output_dir, out_dir=args.out, kappa_low=args.kappa_low, kappa_high=args.kappa_high,
                       title=args.title)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trl-epo", description="EPO for multi-turn LLM agents, on TRL.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plot = commands.add_parser(
        "plot", help="Plot a run's entropy dynamics (PNG) from its trainer_state.json / checkpoints.",
        description="Write epo_dynamics.png (entropy and its corridor, beta_k, smoothing penalty, out-of-corridor "
        "fraction, success rate, turns) and entropy_turn_heatmap.png (turn x step) for a training run.",
    )
    plot.add_argument("output_dir", help="The run's output_dir (or one of its checkpoint-* folders).")
    plot.add_argument("--out", default=None, help="Folder for the PNG files (default: OUTPUT_DIR/plots).")
    plot.add_argument("--kappa_low", type=float, default=None, help="Corridor lower bound (default: the run's).")
    plot.add_argument("--kappa_high", type=float, default=None, help="Corridor upper bound (default: the run's).")
    plot.add_argument("--title", default=None, help="Figure title (default: the run's name and EPO settings).")
    plot.set_defaults(handler=_plot)

    commands.add_parser(
        "evaluate", help="Evaluate a model on an env split (see `trl-epo evaluate --help`).", add_help=False
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "evaluate":  # its own (TrlParser) argument parser
        from .evaluation import main as evaluate_main

        evaluate_main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
