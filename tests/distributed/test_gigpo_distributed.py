"""GiGPO and dynamic sampling on 2 processes (DDP, gloo, CPU) with groups that straddle them: every process's turns
get exactly the advantages one process computes on the same episodes, and both processes make the same filtering
decisions (the same number of refill rollouts and kept groups)."""

import json

import pytest
import torch
from helpers.launches import REPO, launch_two_processes

from trl_epo.gigpo import gigpo_advantages
from trl_epo.rows import group_advantages


@pytest.mark.slow
def test_two_processes_match_one_on_the_same_episodes(tmp_path):
    result = launch_two_processes(str(REPO / "tests" / "distributed" / "gigpo_run.py"), [tmp_path], timeout=300)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    reports = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    r0, r1 = reports
    for key in ("filter/kept_groups", "filter/dropped_groups", "filter/extra_rollouts", "gigpo/anchor_coverage"):
        assert key in r0["log"], key
    shared = [k for k in r0["log"] if k.startswith(("filter/", "gigpo/", "reward"))]
    assert {k: r0["log"][k] for k in shared} == {k: r1["log"][k] for k in shared}  # global decisions and metrics
    assert len(r0["rollouts"]) == len(r1["rollouts"]) == r0["log"]["filter/extra_rollouts"] + 1
    for a, b in zip(r0["rollouts"], r1["rollouts"]):
        assert a["rewards"] == b["rewards"]  # all processes' rewards, in TRL's order
        turns = a["turns"] + b["turns"]  # process 0's episodes, then process 1's: one process's view
        rewards = torch.tensor(a["rewards"])
        weights = torch.tensor([max(1, len(anchors)) for anchors, _ in turns], dtype=torch.float32)
        episode = group_advantages(rewards, 4, "group", "rows", weights).tolist()
        expected, _ = gigpo_advantages(
            episode, a["rewards"], [t[0] for t in turns], [t[1] for t in turns], 4, invalid_penalty=0.1
        )
        assert len(a["tokens"]) > 0 and len(b["tokens"]) > 0
        for offset, report in ((0, a), (2, b)):  # 2 episodes per process; each group of 4 spans both
            for episode_index, turn, value in report["tokens"]:
                assert value == pytest.approx(expected[offset + episode_index][turn], abs=1e-6)
