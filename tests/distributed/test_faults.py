"""Faults in a real 2-process run (`accelerate launch`, DDP over gloo on the CPU, `examples/train_toy.py`, env workers
in processes): an env worker of rank 1 killed (SIGKILL, from outside) while its rollout plays, and a disk that fails
on rank 0 while a checkpoint is written."""

import json
import os
import signal
import time

import pytest
from helpers.launches import REPO, TOY_FLAGS, env_worker_pids, finish, prepare_tiny_model, rank_pid, start, wait_for
from transformers.trainer_utils import get_last_checkpoint

from trl_epo.row_training import ROW_BUFFER_NAME


TIMEOUT_S = 420


def transcripts(output_dir, step: int, rank: int) -> list[dict]:
    folder = os.path.join(output_dir, "_rollouts")
    (name,) = [
        n for n in os.listdir(folder) if n.startswith(f"train_step{step:06d}_") and n.endswith(f"rank{rank}.jsonl")
    ]
    with open(os.path.join(folder, name)) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_an_env_worker_killed_mid_rollout_fails_one_episode_and_training_goes_on(tmp_path):
    flags = [*TOY_FLAGS, "--tiny_model_dir", prepare_tiny_model(tmp_path / "tiny")]
    run_dir = tmp_path / "run"
    start_time = time.monotonic()
    launcher = start(run_dir, flags, processes=2)
    rank1 = wait_for(lambda: rank_pid(launcher.pid, 1), 120, "rank 1", launcher)
    # The pool starts its workers at the rollout's first reset: the first one to appear is killed mid-rollout.
    victim = wait_for(lambda: (env_worker_pids(rank1) or [None])[0], TIMEOUT_S, "rank 1's env workers", launcher)
    os.kill(victim, signal.SIGKILL)
    status, log = finish(launcher, TIMEOUT_S)
    assert status == 0, log[-6000:]
    assert time.monotonic() - start_time < TIMEOUT_S  # no hang

    with open(run_dir / "trainer_state.json") as f:
        logs = [h for h in json.load(f)["log_history"] if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3, 4, 5, 6]  # both ranks trained every step (DDP: in lockstep)
    assert logs[0]["rollout/env_error_episodes"] == 1  # reduced over both ranks: the killed worker's episode
    assert logs[3]["rollout/env_error_episodes"] == 0  # the next rollout: the slot got a fresh worker
    failed = [e for e in transcripts(run_dir, 0, 1) if e["env_error"]]
    assert len(failed) == 1 and "died" in failed[0]["env_error"]
    assert not any(e["env_error"] for e in transcripts(run_dir, 0, 0))
    assert not any(e["env_error"] for rank in (0, 1) for e in transcripts(run_dir, 3, rank))


@pytest.mark.slow
def test_a_disk_failing_on_rank_0_during_a_checkpoint_stops_both_ranks_cleanly(tmp_path):
    flags = [*TOY_FLAGS, "--tiny_model_dir", prepare_tiny_model(tmp_path / "tiny")]
    flags += ["--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1", "--fail_disk_at_step", "2"]
    run_dir = tmp_path / "run"
    script = str(REPO / "tests" / "distributed" / "failing_disk_run.py")
    status, log = finish(start(run_dir, flags, processes=2, script=script), TIMEOUT_S)  # finish() fails on a hang
    assert status != 0
    # Both ranks stop with the same clear error (rank 0 with the cause), none waits for the other.
    assert "CheckpointWriteError: Could not write the checkpoint" in log and "File too large" in log, log[-6000:]
    assert "failed on process 0" in log and "failed on another process" in log
    # The previous checkpoint is complete, nothing of checkpoint-2 is where a resume looks.
    assert sorted(p for p in os.listdir(run_dir) if "checkpoint" in p) == ["checkpoint-1"]
    assert get_last_checkpoint(str(run_dir)) == str(run_dir / "checkpoint-1")
    checkpoint = set(os.listdir(run_dir / "checkpoint-1"))
    assert {
        "model.safetensors",
        "optimizer.pt",
        "rng_state_0.pth",
        "rng_state_1.pth",
        "trainer_state.json",
    } <= checkpoint
    assert {ROW_BUFFER_NAME.format(rank=r) for r in (0, 1)} <= checkpoint  # inside the rollout
