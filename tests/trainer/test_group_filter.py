"""Dynamic sampling (trl_epo.group_filter): zero-variance groups are dropped and refilled from extra rollouts, every
kept row is trained exactly once and none is lost, decisions are global across processes, the refill tasks come from
their own RNG, and a checkpoint inside a refilled rollout resumes onto the same rows."""

import random

import pytest
import torch
from conftest import windowed_config_kwargs

from trl_epo import EPOConfig, EPOTrainer
from trl_epo.env_training import EnvTrainingMixin
from trl_epo.envs.toy import ToyEnv, make_dataset
from trl_epo.group_filter import filter_groups, informative_groups, refill_task_rows
from trl_epo.row_training import RowTrainingMixin
from trl_epo.rows import TrainingRow


NAN = float("nan")


def test_informative_groups():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, NAN, 1.0, NAN, 0.0, 0.5, NAN, NAN, NAN])
    assert informative_groups(rewards, 2) == [True, False, False, False, False, False]
    assert informative_groups(rewards, 3) == [True, False, True, False]


def scripted_play(rollouts, local, process_index):
    """`play` of filter_groups over scripted rollouts: rollout r's rewards (all processes'), two rows per local
    episode; records the task rows it was given."""
    calls = []

    def play(task_rows):
        rewards = torch.tensor(rollouts[len(calls)])
        calls.append(task_rows)
        rows = [
            TrainingRow([1], [2], [1], [0], i, extra={"id": (len(calls) - 1, i, k)})
            for i in range(local)
            for k in (0, 1)
        ]
        return rows, rewards

    return play, calls


@pytest.mark.parametrize("process_index", [0, 1])
def test_filter_keeps_the_first_informative_groups_and_renumbers_episodes(process_index):
    # 2 processes x 4 local episodes, G = 2: 4 groups per rollout (process 0 holds groups 0-1, process 1 groups 2-3).
    rollouts = [
        [1, 0, 1, 1, 0, 0, 1, 0],  # informative: groups 0, 3
        [0, 0, 1, 0, 1, 1, 0, 1],  # informative: 1, 3
        [1, 0, 1, 0, 1, 0, 1, 0],  # never reached
    ]
    play, calls = scripted_play(rollouts, 4, process_index)
    refill = lambda attempt: [{"attempt": attempt}] * 4  # noqa: E731
    rows, stats = filter_groups(play, [{"attempt": 0}] * 4, refill, 2, 10, process_index)
    assert len(calls) == 2 and calls[1] == [{"attempt": 1}] * 4
    assert stats.metrics() == {
        "filter/kept_groups": 4.0,
        "filter/dropped_groups": 4.0,
        "filter/unused_groups": 0.0,
        "filter/extra_rollouts": 1.0,
        "filter/cap_hit": 0.0,
        "filter/no_informative": 0.0,
    }
    kept = {(0, 0), (0, 3), (1, 1), (1, 3)}  # (rollout, global group)
    first = process_index * 4
    expected = [(r, i, k) for r in (0, 1) for i in range(4) for k in (0, 1) if (r, (first + i) // 2) in kept]
    assert [row.extra["id"] for row in rows] == expected  # every row of a kept episode, once; none other
    assert all(row.episode == r * 4 + i for row, (r, i, _) in zip(rows, expected))  # unique across rollouts


def test_filter_cap_and_nothing_informative():
    play, calls = scripted_play([[0, 0, 0, 0], [1, 1, 0, 1], [1, 1, 0, 0]], 4, 0)
    rows, stats = filter_groups(play, [{}] * 4, lambda a: [{}] * 4, 2, 3, 0)
    assert len(calls) == 3 and stats.cap_hit and not stats.no_informative  # trains on the one informative group
    assert stats.kept_groups == 1 and stats.dropped_groups == 5
    assert sorted({(row.extra["id"][0], row.extra["id"][1] // 2) for row in rows}) == [(1, 1)]
    assert [row.episode for row in rows] == [6, 6, 7, 7]
    play, calls = scripted_play([[1, 1, 0, 0], [0, 0, 0, 0]], 4, 0)
    rows, stats = filter_groups(play, [{}] * 4, lambda a: [{}] * 4, 2, 2, 0)
    assert stats.no_informative and stats.cap_hit and stats.kept_groups == 2
    assert [row.extra["id"] for row in rows] == [(0, i, k) for i in range(4) for k in (0, 1)]  # the first, unfiltered
    play, _ = scripted_play([[1, 0, 1, 0, 0, 1]], 6, 0)  # all informative: no extra rollout
    rows, stats = filter_groups(play, [{}] * 6, None, 2, 5, 0)
    assert stats.rollouts == 1 and len(rows) == 12


def test_refill_rows_are_dealt_like_trl_and_leave_the_training_rng_alone():
    dataset = make_dataset("train", 8)
    random.seed(1)
    torch.manual_seed(1)
    state, torch_state = random.getstate(), torch.get_rng_state()
    parts = [refill_task_rows(dataset, 3, 2, "s/0/1", p, 2) for p in (0, 1)]
    assert random.getstate() == state and torch.equal(torch.get_rng_state(), torch_state)
    rows = parts[0] + parts[1]
    assert len(rows) == 6 and all(rows[i] == rows[i + 1] for i in (0, 2, 4))  # groups of G across processes
    assert len({(r["task"], r["seed"]) for r in rows}) == 3
    assert refill_task_rows(dataset, 3, 2, "s/0/1", 0, 2) == parts[0]  # seeded: the same draw
    assert refill_task_rows(dataset, 3, 2, "s/0/2", 0, 2) != parts[0]


def parity_reward(completions, task, **kwargs):
    """open-door groups: always 0 (zero variance); fetch-coin: the parity of the answers' length."""
    return [
        0.0 if t == "open-door" else float(sum(len(m["content"]) for m in c) % 2) for c, t in zip(completions, task)
    ]


def filter_args(tmp_path, **overrides):
    kwargs = dict(
        max_steps=2,
        per_device_train_batch_size=2,
        env_updates_per_rollout=2,
        env_filter_groups=True,
        env_filter_max_rollouts=4,
        env_advantage_estimator="gigpo",
    )
    kwargs.update(overrides)
    return EPOConfig(**windowed_config_kwargs(tmp_path, **kwargs))


def make_trainer(make_model, tokenizer, args):
    return EPOTrainer(
        make_model(),
        args=args,
        reward_funcs=[parity_reward],
        train_dataset=make_dataset("train", 6),
        processing_class=tokenizer,
        env_factory=ToyEnv,
    )


def test_filtered_rollout_rows_are_trained_once(tokenizer, make_model, tmp_path, monkeypatch):
    used, scheduled, played = [], [], []
    real_chunk_inputs, real_score, real_play = (
        RowTrainingMixin._chunk_inputs,
        RowTrainingMixin._score_rollout,
        EnvTrainingMixin._play_rollout_batch,
    )

    def chunk_inputs(self, chunk, counts):
        used.extend(id(row) for row in chunk if row.episode >= 0)
        return real_chunk_inputs(self, chunk, counts)

    def score(self, inputs):
        micro = real_score(self, inputs)
        scheduled.extend(row for mb in micro for row in mb.rows)
        return micro

    def play(self, rows):
        batch = real_play(self, rows)
        played.append(batch)
        return batch

    monkeypatch.setattr(RowTrainingMixin, "_chunk_inputs", chunk_inputs)
    monkeypatch.setattr(RowTrainingMixin, "_score_rollout", score)
    monkeypatch.setattr(EnvTrainingMixin, "_play_rollout_batch", play)
    trainer = make_trainer(make_model, tokenizer, filter_args(tmp_path))
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert log["filter/extra_rollouts"] == len(played) - 1 >= 1  # a zero-variance group was refilled
    assert log["filter/dropped_groups"] >= 1 and "gigpo/anchor_coverage" in log
    assert sorted(used) == sorted(id(row) for row in scheduled) and len(set(used)) == len(used)  # each row once
    # none lost: every episode of the kept groups is there with all its turns, and only those
    kept = {row.episode for row in scheduled}
    assert len(kept) == 2 * log["filter/kept_groups"]
    for episode in kept:
        e = played[episode // 4].episodes[episode % 4]  # 4 episodes per rollout
        assert sum(row.episode == episode for row in scheduled) == max(1, e.turns)


def test_resume_inside_a_refilled_rollout_trains_on_the_same_rows(tokenizer, make_model, tmp_path, monkeypatch):
    def run(output_dir, resume=None):
        args = filter_args(output_dir, save_strategy="steps", save_steps=1)
        trainer = make_trainer(make_model, tokenizer, args)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight")
    assert next(h for h in straight.state.log_history if "loss" in h)["filter/extra_rollouts"] >= 1
    run(tmp_path / "resumed")
    assert (tmp_path / "resumed" / "checkpoint-1" / "epo_rollout_buffer_rank0.safetensors").exists()
    played = []
    monkeypatch.setattr(EnvTrainingMixin, "_play_rollout_batch", lambda self, rows: played.append(rows))
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "resumed" / "checkpoint-1"))
    assert played == []  # step 2 trains on the rest of the saved, refilled rollout

    def trace(trainer, after=0):
        return [
            h[k] for h in trainer.state.log_history if "loss" in h and h["step"] > after for k in ("loss", "grad_norm")
        ]

    assert trace(resumed, after=1) == pytest.approx(trace(straight)[2:], rel=1e-5, abs=1e-7)
