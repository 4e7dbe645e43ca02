"""Two processes keep their own sampling streams through periodic evaluations: the two members of a GRPO group
split over the processes sample different answers in every training rollout, also after an evaluation (before the
fix both processes were reseeded with the eval seed and sampled identical answers)."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 480


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_processes_keep_their_own_streams_after_evaluations(tmp_path):
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        os.path.join(REPO, "examples", "accelerate", "multi_gpu.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
        os.path.join(REPO, "tests", "distributed", "eval_rng_run.py"),
        str(tmp_path),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"launch timed out after {TIMEOUT_S}s:\n{stdout[-4000:]}\n{stderr[-8000:]}")
    assert process.returncode == 0, stderr[-8000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text())["sampled"] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # three rollouts: before the first evaluation, then after each
    for rollout, (mine, theirs) in enumerate(zip(*ranks)):
        assert mine != theirs, f"rollout {rollout}: both processes sampled the same answers"
