"""ALFWorld environment throughput: reset time and steps/s with 1 and N worker processes, the effect of the
translation cache and of prefetching, the stock TextWorld path for reference, and the game generator's rate.

    python benchmarks/bench_alfworld_env.py --data_root $ALFWORLD_DATA --split iid --workers 1 2 --games 12
    python benchmarks/bench_alfworld_env.py --generate_per_type 3        # offline: generated games only

Steps are random admissible commands (each slot plays its own game); a step round steps every slot once.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def bench_generator(out_dir: str, per_type: int, seed: int) -> dict[str, float]:
    from trl_epo.envs.alfworld import TASK_TYPES
    from trl_epo.envs.alfworld.game_writer import write_game
    from trl_epo.envs.alfworld.games import generate_game

    rates = {}
    for task_type in TASK_TYPES:
        start = time.perf_counter()
        for index in range(per_type):
            write_game(generate_game(task_type, "train", seed, index), out_dir)
        elapsed = time.perf_counter() - start
        rates[task_type] = 60.0 * per_type / elapsed
        print(
            f"  generator {task_type:32s} {per_type} games in {elapsed:6.1f} s = {rates[task_type]:6.1f} games/min",
            flush=True,
        )
    return rates


def bench_pool(data_root: str, tasks, workers: int, rounds: int, seed: int) -> dict[str, float]:
    from trl_epo.envs import AlfWorldEnv, EnvPool

    factory = functools.partial(AlfWorldEnv, data_root=data_root)
    rng = random.Random(seed)
    out = {}
    with EnvPool(factory, size=workers, backend="process", step_timeout=120, reset_timeout=600) as pool:
        # Start the workers (interpreter + imports + engine) outside the timings: reset once on a small game.
        pool.reset([(slot, tasks[0]) for slot in range(workers)])
        waves = [tasks[i : i + workers] for i in range(0, len(tasks), workers)]
        for label in ("cold", "cached"):
            start = time.perf_counter()
            for wave in waves:
                pool.reset(list(enumerate(wave)))
            elapsed = time.perf_counter() - start
            out[f"reset_{label}_s_per_game"] = elapsed / len(tasks)
            # With N workers, resets run in parallel: wall time per game.
        steps = 0
        start = time.perf_counter()
        for wave in waves:
            results = pool.reset(list(enumerate(wave)))
            for _ in range(rounds):
                calls = [
                    (slot, rng.choice(r.admissible_actions))
                    for slot, r in enumerate(results)
                    if r.admissible_actions and not r.done
                ]
                if not calls:
                    break
                stepped = pool.step(calls)
                steps += len(calls)
                for (slot, _), r in zip(calls, stepped):
                    results[slot] = r
        elapsed_total = time.perf_counter() - start
        # Subtract the (cached) resets of that loop to report stepping alone.
        step_time = elapsed_total - out["reset_cached_s_per_game"] * len(tasks)
        out["steps_per_s"] = steps / max(step_time, 1e-9)
        out["steps"] = steps
    return out


def bench_single_env(data_root: str, tasks, rounds: int, seed: int) -> dict[str, float]:
    """One env in this process: cold reset, cached reset, reset after a background prefetch, step time."""
    from trl_epo.envs import AlfWorldEnv

    env = AlfWorldEnv(data_root=data_root, cache_size=len(tasks) + 1)
    rng = random.Random(seed)
    cold, cached, step_times = [], [], []
    env.reset(tasks[0])  # engine start-up and imports
    env.cache = type(env.cache)(max_size=len(tasks) + 1)
    for task in tasks:
        start = time.perf_counter()
        result = env.reset(task)
        cold.append(time.perf_counter() - start)
        start = time.perf_counter()
        result = env.reset(task)
        cached.append(time.perf_counter() - start)
        for _ in range(rounds):
            start = time.perf_counter()
            result = env.step(rng.choice(result.admissible_actions))
            step_times.append(time.perf_counter() - start)
            if result.done:
                break
    # Prefetch: translate the next game while the current one is "played" (here: while we wait, as a model would
    # be generating), then reset into it.
    env.cache = type(env.cache)(max_size=len(tasks) + 1)
    prefetched = []
    for task in tasks:
        env.prefetch([task])
        while env.game_path(env_task(task)) not in env.cache:
            time.sleep(0.01)
        start = time.perf_counter()
        env.reset(task)
        prefetched.append(time.perf_counter() - start)
    env.close()
    return {
        "reset_cold_s": statistics.mean(cold),
        "reset_cold_max_s": max(cold),
        "reset_cached_s": statistics.mean(cached),
        "reset_prefetched_s": statistics.mean(prefetched),
        "step_ms": 1000 * statistics.mean(step_times),
        "steps_per_s": len(step_times) / sum(step_times),
    }


def env_task(task):
    from trl_epo.envs import TaskSpec

    return TaskSpec.from_row(task)


def bench_stock(data_root: str, tasks, rounds: int, seed: int) -> dict[str, float]:
    """Stock TextWorld (PddlEnv + AlfredDemangler): load+reset per game and steps/s, for reference."""
    from trl_epo.envs.alfworld import resolve_data_root
    from trl_epo.envs.alfworld.engine import stock_engine_play

    root = resolve_data_root(data_root)
    rng = random.Random(seed)
    resets, per_step = [], []
    for task in tasks:
        path = os.path.join(root, env_task(task).task)
        start = time.perf_counter()
        first = stock_engine_play(path, [])
        resets.append(time.perf_counter() - start)
        commands = [rng.choice([c for c in first[0][1] if c != "help"]) for _ in range(1)]
        start = time.perf_counter()
        played = stock_engine_play(path, commands * rounds)
        per_step.append((time.perf_counter() - start - resets[-1]) / max(1, len(played) - 1))
    return {"load_reset_s": statistics.mean(resets), "step_ms": 1000 * statistics.mean(per_step)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", default=None, help="ALFWorld data root; default: generate games offline")
    parser.add_argument("--split", default="train")
    parser.add_argument("--games", type=int, default=12, help="games to reset/step")
    parser.add_argument("--rounds", type=int, default=20, help="random steps per game")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--generate_per_type", type=int, default=3, help="games per type for the generator rate")
    parser.add_argument("--stock", action="store_true", help="also time stock TextWorld (slow)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from trl_epo.envs.alfworld import make_tasks

    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}", flush=True)
    gen_dir = tempfile.mkdtemp(prefix="alfworld-bench-")
    if args.generate_per_type > 0:
        print("Generator (one process):", flush=True)
        rates = bench_generator(gen_dir, args.generate_per_type, args.seed)
        print(f"  all types: {statistics.mean(rates.values()):.1f} games/min on average", flush=True)
    data_root = args.data_root or gen_dir
    split = args.split if args.data_root else "train"
    tasks = make_tasks(split, data_root, num_tasks=args.games, seed=args.seed)
    kinds = defaultdict(int)
    for t in tasks:
        kinds[t.extra["task_type"]] += 1
    print(f"Games: {len(tasks)} from {data_root} ({split}): {dict(kinds)}", flush=True)

    single = bench_single_env(data_root, tasks, args.rounds, args.seed)
    print("One env in-process: " + ", ".join(f"{k}={v:.3f}" for k, v in single.items()), flush=True)
    for workers in args.workers:
        result = bench_pool(data_root, tasks, workers, args.rounds, args.seed)
        print(
            f"EnvPool process backend, {workers} worker(s): "
            + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()),
            flush=True,
        )
    if args.stock:
        stock = bench_stock(data_root, tasks[: min(4, len(tasks))], min(args.rounds, 10), args.seed)
        print("Stock TextWorld (reference): " + ", ".join(f"{k}={v:.3f}" for k, v in stock.items()), flush=True)


if __name__ == "__main__":
    main()
