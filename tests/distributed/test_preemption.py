"""Preemption with a real signal sent to a real training run (`examples/train_toy.py`, the toy env, a tiny model), in
one process and in two (accelerate launch, DDP over gloo): the run finishes its optimizer step, saves a checkpoint
although `save_strategy="no"` (with the rest of the rollout when it stops inside the rollout's K = 3 updates), closes
its env workers and exits with status 75 (`epo_preempted.json` names the checkpoint); resuming from it gives the
uninterrupted run's weights and losses. Each test runs the uninterrupted and the preempted run side by side, then the
resumed one."""

import json
import os
import signal

import pytest
import torch
from helpers.launches import TOY_FLAGS, finish, prepare_tiny_model, rank_pid, start, wait_for
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from trl_epo.preemption import PREEMPTED_EXIT_CODE, PREEMPTED_FILE
from trl_epo.row_training import ROW_BUFFER_NAME


TIMEOUT_S = 420
MAX_STEPS, K = 6, 3


def losses(output_dir) -> dict[int, float]:
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        return {h["step"]: h["loss"] for h in json.load(f)["log_history"] if "loss" in h}


def weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(output_dir, "model.safetensors"))


def preempt_and_resume(tmp_path, processes: int, send_signal):
    """Run uninterrupted and preempted side by side; `send_signal(run)` preempts the second once its first rollout
    was played (the transcript of rank `processes - 1` exists); then resume it. Returns (baseline, preempted dirs,
    the preempted run's record, its log)."""
    flags = [*TOY_FLAGS, "--tiny_model_dir", prepare_tiny_model(tmp_path / "tiny")]
    baseline_dir, run_dir = tmp_path / "baseline", tmp_path / "run"
    baseline = start(baseline_dir, flags, processes)
    run = start(run_dir, flags, processes)
    transcript = run_dir / "_rollouts" / f"train_step000000_batch00000_rank{processes - 1}.jsonl"
    wait_for(transcript.exists, TIMEOUT_S, "the first rollout", run)
    send_signal(run)
    status, log = finish(run, TIMEOUT_S)
    assert finish(baseline, TIMEOUT_S)[0] == 0

    with open(run_dir / PREEMPTED_FILE) as f:
        record = json.load(f)
    step = record["global_step"]
    checkpoint = run_dir / f"checkpoint-{step}"
    assert 1 <= step < MAX_STEPS, f"preempted at step {step} (the signal came too late for this test)\n{log[-3000:]}"
    assert record["checkpoint"] == str(checkpoint) and record["exit_status"] == PREEMPTED_EXIT_CODE
    assert get_last_checkpoint(str(run_dir)) == str(checkpoint)  # the only checkpoint (save_strategy="no")
    assert not (run_dir / "model.safetensors").exists()  # the script stopped: no final save_model
    assert not [p for p in os.listdir(run_dir) if p.startswith(".tmp-")]
    buffers = {p for p in os.listdir(checkpoint) if p.startswith("epo_rollout_buffer")}
    inside_rollout = step % K != 0
    assert buffers == ({ROW_BUFFER_NAME.format(rank=r) for r in range(processes)} if inside_rollout else set())
    assert "preempted by SIGTERM" in log

    resumed = start(run_dir, [*flags, "--resume_from_checkpoint", str(checkpoint)], processes, log_name="-resumed")
    status_resumed, log_resumed = finish(resumed, TIMEOUT_S)
    assert status_resumed == 0, log_resumed[-6000:]
    assert not (run_dir / PREEMPTED_FILE).exists()  # the run finished: no stale preemption record
    return baseline_dir, run_dir, record, status, log


@pytest.mark.slow
def test_sigterm_one_process_checkpoints_exits_75_and_resumes_exactly(tmp_path):
    baseline, run, record, status, log = preempt_and_resume(tmp_path, 1, lambda p: os.kill(p.pid, signal.SIGTERM))
    assert status == PREEMPTED_EXIT_CODE, log[-4000:]
    assert record["signal"] == "SIGTERM"
    # Exactly the uninterrupted run: every step's loss and every final weight, bit for bit.
    assert losses(run) == losses(baseline)
    expected, got = weights(baseline), weights(run)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """Only rank 1 gets the signal (as when a node's agent signals its own processes first): both ranks stop after
    the same optimizer step, both write their part of the checkpoint (the rest of the rollout, per rank)."""

    def signal_rank_1(launcher):
        pid = wait_for(lambda: rank_pid(launcher.pid, 1), 30, "rank 1's pid", launcher)
        os.kill(pid, signal.SIGTERM)

    baseline, run, record, status, log = preempt_and_resume(tmp_path, 2, signal_rank_1)
    # accelerate launch reports failed children with its own status 1 and names each rank's status 75.
    assert status != 0 and log.count(f"exitcode  : {PREEMPTED_EXIT_CODE}") >= 1, log[-4000:]
    assert log.count("preempted by SIGTERM") == 1  # printed by the main process
    assert losses(run) == losses(baseline)
    expected, got = weights(baseline), weights(run)
    worst = max((expected[k] - got[k]).abs().max().item() for k in expected)
    assert worst == 0.0, f"resumed 2-process run differs from the uninterrupted one by up to {worst:.3g}"
