"""Runs a grid of arms x seeds: each run is `examples/train_toy.py --config <run>.yaml` in its own process, up to
`jobs` at a time, in SEED-MAJOR order (all arms of seed 0, then of seed 1, ...) so that a partial grid is balanced
over the arms.

Resumable: a run whose result JSON exists is never redone; an interrupted run (its folder holds a `checkpoint-*`)
restarts from its newest checkpoint through the script's `--resume_from_checkpoint`. The result JSON is written
atomically when the run has finished, from its final checkpoint's `trainer_state.json`.

Stoppable: SIGTERM (or Ctrl-C) to the runner starts nothing more and forwards SIGTERM to the running runs, which
finish their optimizer step, checkpoint and exit 75 (`trl_epo.preemption`); each such attempt is recorded (wall and
CPU seconds) in its run folder's `study_attempts.json`, and the runner exits 75.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Any

import yaml


PREEMPTED_EXIT = 75  # `trl_epo.preemption`: a run that checkpointed on SIGTERM and stopped
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def write_json(path: str, data: Any) -> None:
    """Write `data` atomically (a reader sees the old file or the whole new one)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    scratch = f"{path}.tmp{os.getpid()}"
    with open(scratch, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(scratch, path)


def latest_checkpoint(run_dir: str) -> str | None:
    """The run's newest complete checkpoint folder (one with a trainer_state.json), or None."""
    if not os.path.isdir(run_dir):
        return None
    found = []
    for name in os.listdir(run_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.exists(os.path.join(run_dir, name, "trainer_state.json")):
            found.append((int(match.group(1)), name))
    return os.path.join(run_dir, max(found)[1]) if found else None


def grid_runs(grid: dict[str, Any], arms: list[str] | None = None, seeds: list[int] | None = None):
    """(arm, seed) pairs of a grid, seed-major."""
    arms = arms or list(grid["arms"])
    seeds = seeds if seeds is not None else grid["seeds"]
    return [(arm, seed) for seed in seeds for arm in arms]


def result_path(results_dir: str, arm: str, seed: int) -> str:
    return os.path.join(results_dir, f"{arm}_seed{seed}.json")


def curves(log_history: list[dict[str, Any]], k: int, eval_splits: list[str]) -> dict[str, Any]:
    """Per-optimizer-step training curves and the periodic evaluations of a run's `log_history`."""
    steps = [h for h in log_history if "loss" in h and "step" in h]
    out: dict[str, Any] = {
        "step": [int(h["step"]) for h in steps],
        "entropy": [h.get("epo/entropy") for h in steps],
        "train_success": [h.get("rollout/success_rate") for h in steps],
        "mean_turns": [h.get("rollout/mean_turns") for h in steps],
        "learning_rate": [h.get("learning_rate") for h in steps],
        "beta": [h.get("epo/beta") for h in steps],
        "out_of_corridor_frac": [h.get("epo/out_of_corridor_frac") for h in steps],
        "anchor_coverage": [h.get("gigpo/anchor_coverage") for h in steps],  # GiGPO arms only
        "step_adv_std": [h.get("gigpo/step_adv_std") for h in steps],
        "eval": [],
    }
    for h in log_history:
        if not any(f"eval/{s}/success_rate" in h for s in eval_splits):
            continue
        point = {"step": int(h.get("step", 0)), "rollout": int(h.get("step", 0)) // k}
        if any(p["step"] == point["step"] for p in out["eval"]):
            continue  # an evaluation repeated at a resume step
        for split in eval_splits:
            if f"eval/{split}/success_rate" in h:
                rate, episodes = h[f"eval/{split}/success_rate"], int(h[f"eval/{split}/episodes"])
                point[split] = {
                    "success_rate": rate,
                    "successes": round(rate * episodes),
                    "episodes": episodes,
                    "wilson_ci": [h[f"eval/{split}/success_ci_low"], h[f"eval/{split}/success_ci_high"]],
                    "mean_turns": h.get(f"eval/{split}/mean_turns"),
                }
        out["eval"].append(point)
    return out


class Run:
    """One (arm, seed) of a grid: its folder, its config file, its process."""

    def __init__(
        self, grid_name: str, grid: dict[str, Any], arm: str, seed: int, sft_dir: str, runs_dir: str, results_dir: str
    ):
        from grids import run_config

        self.grid_name, self.grid, self.arm, self.seed = grid_name, grid, arm, seed
        self.run_dir = os.path.join(runs_dir, f"{arm}_seed{seed}")
        self.result = result_path(results_dir, arm, seed)
        self.config = run_config(grid, arm, seed, sft_dir, self.run_dir)
        self.process: subprocess.Popen | None = None
        self.attempt: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return f"{self.arm}_seed{self.seed}"

    def attempts_path(self) -> str:
        return os.path.join(self.run_dir, "study_attempts.json")

    def previous_attempts(self) -> list[dict[str, Any]]:
        if os.path.exists(self.attempts_path()):
            with open(self.attempts_path()) as f:
                return json.load(f)
        return []

    def start(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        config = dict(self.config)
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint:
            config["resume_from_checkpoint"] = checkpoint
            config["eval_on_start"] = False  # the start was evaluated by the first attempt
        config_path = os.path.join(self.run_dir, "run_config.yaml")
        with open(config_path, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        script = os.path.join(REPO, self.grid.get("script", "examples/train_toy.py"))
        command = [*self.grid.get("launcher", [sys.executable]), script, "--config", config_path]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        env["TOKENIZERS_PARALLELISM"], env["WANDB_MODE"] = "false", "disabled"
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.attempt = {
            "command": shlex.join(command),
            "config": config,
            "resumed_from": checkpoint,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_average_start": load_average(),
            "_t0": time.perf_counter(),
        }
        log = open(os.path.join(self.run_dir, "train.log"), "a")
        log.write(f"\n==== {self.attempt['started_at']} {self.attempt['command']}\n")
        log.flush()
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def reap(self) -> bool:
        """Whether the process has ended; then its exit code and CPU seconds are recorded (`os.wait4`: this run's
        own CPU time, which, with one torch thread, is what the run costs on an idle core however loaded we are)."""
        pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.process.returncode = os.waitstatus_to_exitcode(status)
        self.attempt["cpu_s"] = usage.ru_utime + usage.ru_stime
        return True

    def finish(self) -> bool:
        """After the process ended: record the attempt, and write the result JSON when the run is complete."""
        rc = self.process.returncode
        attempt = {k: v for k, v in self.attempt.items() if k != "_t0"}
        attempt.update(
            returncode=rc,
            wall_s=time.perf_counter() - self.attempt["_t0"],
            load_average_end=load_average(),
            ended_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        attempts = self.previous_attempts() + [attempt]
        write_json(self.attempts_path(), attempts)
        checkpoint = latest_checkpoint(self.run_dir)
        max_steps = self.config["max_steps"]
        if rc != 0 or checkpoint is None or not checkpoint.endswith(f"checkpoint-{max_steps}"):
            return False
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            state = json.load(f)
        k = int(self.config["env_updates_per_rollout"])
        write_json(
            self.result,
            {
                "grid": self.grid_name,
                "arm": self.arm,
                "seed": self.seed,
                "overrides": self.grid["arms"][self.arm],
                "command": attempt["command"],
                "config": self.config,
                "updates_per_rollout": k,
                "wall_s": sum(a["wall_s"] for a in attempts),
                "cpu_s": sum(a.get("cpu_s", 0.0) for a in attempts),
                "load_average_start": attempts[0]["load_average_start"],
                "load_average_end": attempt["load_average_end"],
                "attempts": attempts,
                "curves": curves(state["log_history"], k, list(self.config.get("eval_splits", ["iid", "ood"]))),
            },
        )
        return True


def run_grid(
    grid_name: str,
    runs_dir: str,
    results_dir: str,
    jobs: int = 2,
    arms: list[str] | None = None,
    seeds: list[int] | None = None,
    poll_s: float = 2.0,
) -> dict[str, list[str]]:
    """Run every missing (arm, seed) of a grid; returns the names of the runs done, skipped and failed."""
    from grids import GRIDS
    from sft import run_sft

    if grid_name not in GRIDS:
        raise ValueError(f"Unknown grid {grid_name!r}; known: {sorted(GRIDS)}.")
    grid = GRIDS[grid_name]
    runs_dir, results_dir = os.path.join(runs_dir, grid_name), os.path.join(results_dir, grid_name)
    os.makedirs(results_dir, exist_ok=True)
    sft_dir = None  # without a warm start of its own, a grid's model is its config's model_name_or_path
    if grid.get("sft") is not None:
        sft_dir = os.path.join(runs_dir, "sft")
        print(f"[study] {grid_name}: warm start in {sft_dir}", flush=True)
        record = run_sft(grid["sft"], sft_dir)
        write_json(os.path.join(results_dir, "sft.json"), record)
    todo = [Run(grid_name, grid, a, s, sft_dir, runs_dir, results_dir) for a, s in grid_runs(grid, arms, seeds)]
    report = {"done": [], "skipped": [r.name for r in todo if os.path.exists(r.result)], "failed": [], "preempted": []}
    pending = [r for r in todo if not os.path.exists(r.result)]
    running: list[Run] = []
    begin = time.perf_counter()
    stop: list[int] = []  # SIGTERM/SIGINT: start nothing more, let the runs checkpoint, record their attempts

    def on_signal(signum, frame):
        if not stop:
            print(f"[study] {signal.Signals(signum).name}: stopping the running runs at their next step", flush=True)
            for run in running:
                run.process.send_signal(signal.SIGTERM)  # EPOTrainer: finish the step, checkpoint, exit 75
        stop.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        _loop(pending, running, jobs, poll_s, stop, report, begin)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(f"[study] {grid_name}: {report}", flush=True)
    return report


def _loop(pending, running, jobs, poll_s, stop, report, begin) -> None:
    while (pending and not stop) or running:
        while pending and not stop and len(running) < jobs:
            run = pending.pop(0)
            run.start()
            running.append(run)
            print(
                f"[study] start {run.name} ({run.attempt['resumed_from'] or 'fresh'}), load {load_average()}",
                flush=True,
            )
        time.sleep(poll_s)
        for run in [r for r in running if r.reap()]:
            running.remove(run)
            ok = run.finish()
            preempted = not ok and run.process.returncode == PREEMPTED_EXIT
            status = "done" if ok else "preempted" if preempted else "failed"
            report[status].append(run.name)
            print(
                f"[study] {status if ok or preempted else 'FAILED'} {run.name} rc={run.process.returncode} "
                f"({(time.perf_counter() - begin) / 60:.1f} min elapsed; log: {run.run_dir}/train.log)",
                flush=True,
            )


def refresh_curves(results_dir: str) -> list[str]:
    """Re-extract the curves of every finished run of `results_dir` (one grid's) from its run folder's final
    `trainer_state.json` (e.g. after `curves` learned a new metric); a run whose folder is gone keeps its JSON."""
    refreshed = []
    for name in sorted(os.listdir(results_dir)):
        if not name.endswith(".json") or name == "sft.json":
            continue
        with open(os.path.join(results_dir, name)) as f:
            result = json.load(f)
        state_path = os.path.join(result["config"]["output_dir"], "trainer_state.json")
        if not os.path.exists(state_path):
            continue
        with open(state_path) as f:
            state = json.load(f)
        splits = list(result["config"].get("eval_splits", ["iid", "ood"]))
        result["curves"] = curves(state["log_history"], result["updates_per_rollout"], splits)
        write_json(os.path.join(results_dir, name), result)
        refreshed.append(name)
    return refreshed
