"""The study runner (`benchmarks/study/`): its seconds-long `smoke` grid run for real (SFT warm start, then a normal
`examples/train_toy.py` run in a subprocess), its result JSON, resume-skip, resume from a checkpoint, and the summary;
plus the quest env's long horizon."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUDY = os.path.join(ROOT, "benchmarks", "study", "run_study.py")


def study(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, STUDY, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_quest_needs_a_long_horizon_and_its_expert_solves_it():
    from trl_epo.envs.quest import QuestEnv, expert_actions, make_tasks
    from trl_epo.envs.registry import get_env

    assert get_env("quest").max_turns >= 26
    for split, shortest in (("train", 15), ("iid", 15), ("ood", 21)):
        for task in make_tasks(split, 24, seed=3):
            actions = expert_actions(task)
            assert len(actions) >= shortest
            env = QuestEnv()
            env.reset(task)
            results = [env.step(a) for a in actions]
            assert results[-1].won and results[-1].reward == 1.0
            assert all(r.reward == 0.0 and not r.done for r in results[:-1])  # sparse: only the last turn pays


def test_quest_gems_must_be_taken_in_order():
    from trl_epo.envs.quest import QuestEnv, make_tasks

    env = QuestEnv()
    task = make_tasks("train", 1, seed=0)[0]
    env.reset(task)
    second = env.order[1]
    env.room = env.gem_rooms[1]
    result = env.step(f"take {second}")
    assert result.info["invalid_action"] and second not in env.inventory and "first" in result.observation


@pytest.mark.slow
def test_smoke_grid_runs_resumes_skips_and_summarizes(tmp_path):
    runs, results = str(tmp_path / "runs"), str(tmp_path / "results")
    done = study("--grid", "smoke", "--jobs", "1", "--runs_dir", runs, "--results_dir", results)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    path = os.path.join(results, "smoke", "grpo_seed0.json")
    with open(path) as f:
        result = json.load(f)
    curves = result["curves"]
    assert result["arm"] == "grpo" and result["seed"] == 0 and "examples/train_toy.py --config" in result["command"]
    assert len(curves["entropy"]) == result["config"]["max_steps"] == 4  # one entry per optimizer step
    assert [e["step"] for e in curves["eval"]] == [0, 2, 4]  # eval on start, then every eval_steps
    for point in curves["eval"]:
        for split in ("iid", "ood"):
            low, high = point[split]["wilson_ci"]
            assert point[split]["episodes"] == 2 and 0.0 <= low <= point[split]["success_rate"] <= high <= 1.0
    assert result["wall_s"] > 0 and result["cpu_s"] > 0 and len(result["load_average_start"]) == 3

    # a finished run is never redone
    again = study("--grid", "smoke", "--jobs", "1", "--runs_dir", runs, "--results_dir", results)
    assert (
        again.returncode == 0
        and "'skipped': ['grpo_seed0']" in again.stdout
        and "start grpo_seed0" not in again.stdout
    )

    # an interrupted run (no result, a checkpoint halfway) restarts from its last checkpoint
    run_dir = os.path.join(runs, "smoke", "grpo_seed0")
    os.remove(path)
    subprocess.run(["rm", "-rf", os.path.join(run_dir, "checkpoint-4")], check=True)
    resumed = study("--grid", "smoke", "--jobs", "1", "--runs_dir", runs, "--results_dir", results)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    with open(path) as f:
        result = json.load(f)
    assert result["attempts"][-1]["resumed_from"].endswith("checkpoint-2")
    assert [e["step"] for e in result["curves"]["eval"]] == [0, 2, 4] and len(result["curves"]["entropy"]) == 4

    summary = study("--action", "summarize", "--grid", "smoke", "--results_dir", results)
    assert summary.returncode == 0, summary.stderr[-3000:]
    out = os.path.join(results, "smoke", "summary")
    assert os.path.getsize(os.path.join(out, "study.png")) > 10_000
    with open(os.path.join(out, "summary.md")) as f:
        text = f.read()
    assert "| grpo | 1 |" in text and "Wilson" in text and "bootstrap" in text

    # `refresh` re-reads the curves of a finished run from its run folder
    result["curves"] = {"eval": []}
    with open(path, "w") as f:
        json.dump(result, f)
    refreshed = study("--action", "refresh", "--grid", "smoke", "--results_dir", results)
    assert refreshed.returncode == 0 and "grpo_seed0.json" in refreshed.stdout, refreshed.stderr[-3000:]
    with open(path) as f:
        curves = json.load(f)["curves"]
    assert len(curves["entropy"]) == 4 and [e["step"] for e in curves["eval"]] == [0, 2, 4]
    assert curves["anchor_coverage"] == [None] * 4  # a GRPO arm logs no GiGPO anchors


@pytest.mark.slow
def test_a_stopped_grid_records_the_preempted_attempt_and_resumes_it(tmp_path):
    """SIGTERM to the runner: the running run finishes its step, checkpoints and exits 75; the runner records that
    attempt (wall and CPU seconds), starts nothing more and exits 75; the next launch resumes the run from there."""
    import signal
    import time

    runs, results = str(tmp_path / "runs"), str(tmp_path / "results")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["--grid", "smoke", "--jobs", "1", "--runs_dir", runs, "--results_dir", results]
    runner = subprocess.Popen(
        [sys.executable, STUDY, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    run_dir = os.path.join(runs, "smoke", "grpo_seed0")
    log, deadline = os.path.join(run_dir, "train.log"), time.time() + 300
    while time.time() < deadline and runner.poll() is None:  # wait for the first optimizer step of 4
        if os.path.exists(log) and "'loss'" in open(log).read():
            break
        time.sleep(0.2)
    runner.send_signal(signal.SIGTERM)
    out, _ = runner.communicate(timeout=300)
    assert runner.returncode == 75, out[-3000:]
    assert "preempted grpo_seed0 rc=75" in out and "'preempted': ['grpo_seed0']" in out
    assert not os.path.exists(os.path.join(results, "smoke", "grpo_seed0.json"))
    with open(os.path.join(run_dir, "study_attempts.json")) as f:
        (attempt,) = json.load(f)
    assert attempt["returncode"] == 75 and attempt["wall_s"] > 0 and attempt["cpu_s"] > 0
    with open(os.path.join(run_dir, "epo_preempted.json")) as f:
        stopped_at = json.load(f)["global_step"]
    assert 1 <= stopped_at < 4

    resumed = study(*args)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    with open(os.path.join(results, "smoke", "grpo_seed0.json")) as f:
        result = json.load(f)
    first, second = result["attempts"]
    assert first["returncode"] == 75 and second["resumed_from"].endswith(f"checkpoint-{stopped_at}")
    assert result["wall_s"] == pytest.approx(first["wall_s"] + second["wall_s"])
    assert len(result["curves"]["entropy"]) == 4
