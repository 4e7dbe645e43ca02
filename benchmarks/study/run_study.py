"""The EPO evidence study (issue 18): a grid of arms x seeds of normal `examples/train_toy.py` runs, and its summary.

    # run (resumable: finished runs are skipped, interrupted ones resume from their last checkpoint)
    python benchmarks/study/run_study.py --grid quest-tiny --jobs 2 \
        --runs_dir /work/study-runs --results_dir /work/study-results
    # summarise whatever has finished: markdown tables + PNG figures
    python benchmarks/study/run_study.py --action summarize --grid quest-tiny --results_dir /work/study-results \
        --summary_dir benchmarks/results/study/quest-tiny
    # re-read the finished runs' curves from their run folders (after `runner.curves` learned a metric)
    python benchmarks/study/run_study.py --action refresh --grid quest-tiny --results_dir /work/study-results

Grids and arms: `benchmarks/study/grids.py` (one table of config overrides per arm). Per-run results:
`<results_dir>/<grid>/<arm>_seed<k>.json`; run folders (checkpoints, logs): `<runs_dir>/<grid>/<arm>_seed<k>/`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class StudyArguments:
    action: str = field(
        default="run",
        metadata={"help": "'run' the grid, 'summarize' its results or 'refresh' their curves from the run folders."},
    )
    grid: str = field(default="quest-tiny", metadata={"help": "A grid of benchmarks/study/grids.py."})
    jobs: int = field(default=2, metadata={"help": "Runs trained at the same time (one process, one thread each)."})
    runs_dir: str = field(
        default=os.path.join(tempfile.gettempdir(), "study-runs"),
        metadata={"help": "Run folders (checkpoints): <runs_dir>/<grid>/."},
    )
    results_dir: str = field(
        default=os.path.join(tempfile.gettempdir(), "study-results"),
        metadata={"help": "Result JSONs: <results_dir>/<grid>/<arm>_seed<k>.json."},
    )
    arms: list[str] = field(default_factory=list, metadata={"help": "Only these arms (default: all of the grid)."})
    seeds: list[int] = field(default_factory=list, metadata={"help": "Only these seeds (default: the grid's)."})
    summary_dir: str | None = field(
        default=None, metadata={"help": "Where the summary goes (default: <results_dir>/<grid>/summary)."}
    )


def main(argv=None):
    from trl import TrlParser

    (args,) = TrlParser(StudyArguments).parse_args_and_config(args=argv)
    if args.action == "run":
        from runner import run_grid

        report = run_grid(args.grid, args.runs_dir, args.results_dir, args.jobs, args.arms or None, args.seeds or None)
        return 1 if report["failed"] else 75 if report["preempted"] else 0
    if args.action == "summarize":
        from summary import summarize_grid

        results = os.path.join(args.results_dir, args.grid)
        summarize_grid(results, args.summary_dir or os.path.join(results, "summary"))
        return 0
    if args.action == "refresh":
        from runner import refresh_curves

        print(refresh_curves(os.path.join(args.results_dir, args.grid)))
        return 0
    raise ValueError(f"Unknown action {args.action!r}; use 'run', 'summarize' or 'refresh'.")


if __name__ == "__main__":
    sys.exit(main())
