"""Two processes keep their own sampling streams through periodic evaluations: the two members of a GRPO group
split over the processes sample different answers in every training rollout, also after an evaluation (before the
fix both processes were reseeded with the eval seed and sampled identical answers)."""

import json

import pytest
from helpers.launches import REPO, launch_two_processes


@pytest.mark.slow
def test_processes_keep_their_own_streams_after_evaluations(tmp_path):
    result = launch_two_processes(str(REPO / "tests" / "distributed" / "eval_rng_run.py"), [tmp_path], timeout=480)
    assert result.returncode == 0, result.stderr[-8000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text())["sampled"] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # three rollouts: before the first evaluation, then after each
    for rollout, (mine, theirs) in enumerate(zip(*ranks)):
        assert mine != theirs, f"rollout {rollout}: both processes sampled the same answers"
