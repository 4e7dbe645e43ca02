"""ScienceWorld env throughput: steps/s with 1 and N `EnvPool` workers (process backend, one JVM each), reset time,
JVM start time and resident memory per JVM, with and without the per-step valid-action list.

The "policy" replays gold action sequences (computed once, untimed) of tasks drawn from the train split, up to the
move limit, so the simulator does realistic work; slots are refilled as soon as their episode ends.

    PYTHONPATH=. python benchmarks/bench_sciworld_env.py --workers 2 --episodes 24
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import psutil

from trl_epo.envs import EnvPool
from trl_epo.envs.sciworld import ScienceWorldEnv, check_java, gold_episodes, make_tasks


def java_children(pid: int | None) -> list[psutil.Process]:
    if pid is None:
        return []
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if p.name() == "java"]
    except psutil.NoSuchProcess:
        return []


def measure_single_env(tasks, env_kwargs) -> dict:
    """JVM start (first reset, JVM launch included) and warm reset times in this process."""
    env = ScienceWorldEnv(**env_kwargs)
    try:
        t0 = time.perf_counter()
        env.reset(tasks[0])
        first = time.perf_counter() - t0
        resets = []
        for spec in tasks[1:]:
            t0 = time.perf_counter()
            env.reset(spec)
            resets.append(time.perf_counter() - t0)
        rss = psutil.Process(env.jvm_pid).memory_info().rss / 2**20
    finally:
        env.close()
    return {
        "first_reset_s": first,
        "reset_s_mean": statistics.mean(resets),
        "reset_s_median": statistics.median(resets),
        "jvm_rss_mib_after_resets": rss,
    }


def run_pool(plans, workers: int, env_kwargs) -> dict:
    """Play every (task, actions) plan, `workers` at a time, refilling a slot as soon as its episode ends."""
    factory = functools.partial(ScienceWorldEnv, **env_kwargs)
    pool = EnvPool(factory, size=workers, backend="process", step_timeout=120)
    try:
        # Warm-up: start every worker and its JVM (untimed, like a trainer's first rollout).
        pool.reset([(slot, plans[slot % len(plans)][0]) for slot in range(workers)])
        queue = list(range(len(plans)))
        slots: dict[int, list] = {}  # slot -> [plan index, turn]
        steps = resets = errors = 0
        step_time = reset_time = 0.0
        t_start = time.perf_counter()
        while queue or slots:
            free = [s for s in range(workers) if s not in slots]
            assign = [(s, queue.pop(0)) for s in free if queue]
            if assign:
                t0 = time.perf_counter()
                results = pool.reset([(s, plans[i][0]) for s, i in assign])
                reset_time += time.perf_counter() - t0
                resets += len(assign)
                for (s, i), r in zip(assign, results):
                    if r.env_error is None:
                        slots[s] = [i, 0]
                    else:
                        errors += 1
            if not slots:
                continue
            calls = [(s, plans[i][1][turn]) for s, (i, turn) in slots.items()]
            t0 = time.perf_counter()
            results = pool.step(calls)
            step_time += time.perf_counter() - t0
            steps += len(calls)
            for (s, _), r in zip(calls, results):
                slots[s][1] += 1
                i, turn = slots[s]
                if r.env_error is not None:
                    errors += 1
                if r.done or r.env_error is not None or turn >= len(plans[i][1]):
                    del slots[s]
        total = time.perf_counter() - t_start
        rss = [p.memory_info().rss / 2**20 for pid in pool.worker_pids() for p in java_children(pid)]
        worker_rss = [psutil.Process(pid).memory_info().rss / 2**20 for pid in pool.worker_pids() if pid]
    finally:
        pool.close()
    return {
        "workers": workers,
        "episodes": len(plans),
        "steps": steps,
        "errors": errors,
        "steps_per_s": steps / step_time,
        "steps_per_s_incl_resets": steps / total,
        "reset_s_mean": reset_time / max(1, resets),
        "jvm_rss_mib": statistics.mean(rss) if rss else float("nan"),
        "worker_rss_mib": statistics.mean(worker_rss) if worker_rss else float("nan"),
        "wall_s": total,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="N of the N-worker run (default 2)")
    parser.add_argument("--episodes", type=int, default=24, help="episodes per run (train tasks, balanced)")
    parser.add_argument("--max-turns", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-admissible", action="store_true", help="skip the runs with the valid-action list")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    check_java()

    tasks = make_tasks("train", num_tasks=args.episodes, seed=args.seed, balanced=True)
    print(f"Computing gold paths of {len(tasks)} train tasks (untimed)...", flush=True)
    episodes = gold_episodes(tasks, env_kwargs={"max_turns": args.max_turns}, keep_unsolved=True)
    plans = [(e.task, e.actions) for e in episodes]
    print(f"{len(plans)} episodes, {sum(len(a) for _, a in plans)} gold steps (cut at {args.max_turns} turns)\n")

    results = {"single_env": measure_single_env(tasks[:12], {"max_turns": args.max_turns})}
    print(
        "single env: first reset (JVM start + load) {first_reset_s:.2f} s, warm reset mean {reset_s_mean:.3f} s "
        "(median {reset_s_median:.3f} s), JVM RSS {jvm_rss_mib_after_resets:.0f} MiB".format(**results["single_env"])
    )
    configs = [(False, 1), (False, args.workers)]
    if not args.skip_admissible:
        configs += [(True, 1), (True, args.workers)]
    header = (
        f"{'admissible':>10} {'workers':>7} {'steps':>6} {'steps/s':>8} {'+resets':>8} {'reset s':>8} "
        f"{'JVM MiB':>8} {'worker MiB':>10}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    results["runs"] = []
    for admissible, workers in configs:
        run = run_pool(plans, workers, {"max_turns": args.max_turns, "admissible_actions": admissible})
        run["admissible_actions"] = admissible
        results["runs"].append(run)
        print(
            f"{str(admissible):>10} {workers:>7} {run['steps']:>6} {run['steps_per_s']:>8.1f} "
            f"{run['steps_per_s_incl_resets']:>8.1f} {run['reset_s_mean']:>8.3f} {run['jvm_rss_mib']:>8.0f} "
            f"{run['worker_rss_mib']:>10.0f}" + (f"  ({run['errors']} errors)" if run["errors"] else ""),
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
