"""Write generated ALFWorld games (`games`) in the official ``json_2.1.1`` layout, many at once and in parallel, and
the command line that does it::

    trl-epo-alfworld-games --out data/alfworld --split train --per-type 100 --workers 8
    trl-epo-alfworld-games --out data/alfworld --split valid_unseen --per-type 20

Then ``make_dataset("train", data_root="data/alfworld")`` and ``AlfWorldEnv(data_root="data/alfworld")`` play them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence

from .games import GeneratedGame, generate_game
from .pddl import GAME_FILE, TASK_TYPES, TRAJ_FILE, canonical_task_type
from .scenes import SPLITS


def write_game(game: GeneratedGame, out_dir: str) -> str:
    """Write a game in the official layout under ``out_dir/json_2.1.1``; returns its ``game.tw-pddl`` path."""
    directory = os.path.join(out_dir, "json_2.1.1", game.relative_dir())
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "initial_state.pddl"), "w") as f:
        f.write(game.problem)
    with open(os.path.join(directory, TRAJ_FILE), "w") as f:
        json.dump(game.traj_json(), f, indent=1)
    path = os.path.join(directory, GAME_FILE)
    with open(path, "w") as f:
        json.dump(game.game_json(), f)
    return path


def _generate_one(job: tuple[str, str, int, int]) -> GeneratedGame:
    task_type, split, seed, index = job
    return generate_game(task_type, split, seed, index)


def generate_games(
    out_dir: str | None,
    split: str = "train",
    per_type: int = 10,
    task_types: Iterable[str] | None = None,
    seed: int = 0,
    workers: int = 1,
    progress: bool = False,
) -> list[GeneratedGame]:
    """Generate ``per_type`` verified games of each task type (all six by default), and write them under
    ``out_dir/json_2.1.1/<split>/`` when ``out_dir`` is given. ``workers`` > 1 generates in parallel processes
    (same games: each game depends only on (seed, split, type, index))."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {SPLITS}.")
    types = [canonical_task_type(t) for t in task_types] if task_types else list(TASK_TYPES)
    jobs = [(t, split, seed, i) for t in types for i in range(per_type)]
    games: list[GeneratedGame] = []
    start = time.perf_counter()

    def keep(game: GeneratedGame) -> None:  # written as soon as made: a long run interrupted keeps its games
        games.append(game)
        if out_dir is not None:
            write_game(game, out_dir)
        _report(progress, game, len(games), len(jobs), start)

    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for game in pool.imap(_generate_one, jobs):
                keep(game)
    else:
        for job in jobs:
            keep(_generate_one(job))
    return games


def _report(enabled: bool, game: GeneratedGame, done: int, total: int, start: float) -> None:
    if enabled:
        elapsed = time.perf_counter() - start
        print(
            f"[{done}/{total} {elapsed:.0f}s] {game.relative_dir()} ({len(game.walkthrough)} steps, "
            f"{game.attempts} draw{'s' if game.attempts > 1 else ''})",
            file=sys.stderr,
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trl-epo-alfworld-games",
        description="Generate solvable ALFWorld games offline (official json_2.1.1 layout, verified walkthroughs).",
    )
    parser.add_argument("--out", required=True, help="data root to write into (games go to OUT/json_2.1.1/SPLIT/)")
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--per-type", type=int, default=20, help="games per task type (default 20)")
    parser.add_argument(
        "--task-types", nargs="+", default=None, help=f"task types (default: all six: {' '.join(TASK_TYPES)})"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.per_type < 1:
        parser.error("--per-type must be >= 1")
    start = time.perf_counter()
    games = generate_games(
        args.out, args.split, args.per_type, args.task_types, args.seed, args.workers, progress=not args.quiet
    )
    elapsed = time.perf_counter() - start
    counts = Counter(g.task_type for g in games)
    for task_type, count in sorted(counts.items()):
        print(f"{task_type}: {count} games")
    print(
        f"{len(games)} games in {elapsed:.1f} s ({60 * len(games) / max(elapsed, 1e-9):.0f} games/min) -> "
        f"{os.path.join(args.out, 'json_2.1.1', args.split)}"
    )
    print(
        f"Use them with: make_dataset('{args.split}', data_root='{args.out}') and AlfWorldEnv(data_root='{args.out}')"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
