"""EPOTrainer on environment rows: the step and packed layouts score and train alike, K optimizer steps consume a
rollout's rows exactly once, a checkpoint inside a rollout resumes onto the same rows, packed rows never meet a kernel
that would mix their blocks, and the LR schedule can step once per rollout."""

import pytest
import torch
from conftest import base_config_kwargs, windowed_config_kwargs

from trl_epo import EPOConfig, EPOTrainer
from trl_epo.env_training import EnvTrainingMixin
from trl_epo.envs.toy import ToyEnv, make_dataset
from trl_epo.objective import EntropyReference, EntropyWindow
from trl_epo.packing import check_packed_forward
from trl_epo.row_training import RowTrainingMixin
from trl_epo.rows import StepCounts, collate, episode_rows, schedule_rows, set_epo_weights


def windowed_args(tmp_path, **overrides):
    return EPOConfig(**windowed_config_kwargs(tmp_path, **overrides))


def test_step_and_packed_layouts_give_the_same_logps_entropies_and_loss(tokenizer, make_model, tmp_path):
    args = windowed_args(tmp_path, loss_type="dapo", epo_smoothing_alpha=0.5, epo_kappa_high=1.0001)
    trainer = EPOTrainer(
        make_model(initializer_range=0.5),
        args=args,
        train_dataset=make_dataset("train", 4),
        processing_class=tokenizer,
        env_factory=ToyEnv,
    )
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; this test drives the loss itself
    batch = trainer._play_rollout_batch([dict(r) for r in make_dataset("train", 2)] * 2)
    trainer.epo_reference.update(type("S", (), {"mean": 6.0, "turn_means": {}})())  # a reference: the corridor acts
    per_layout = {}
    for layout in ("step", "packed"):
        trainer.args.env_sample_layout = layout
        trainer._packed_block_marker = batch.block_marker if layout == "packed" else None
        rows = [
            row
            for i, e in enumerate(batch.episodes)
            for row in episode_rows(i, e.prompt_ids, e.completion_ids, e.env_mask, e.turn_ids, None, layout)
        ]
        for row in rows:
            row.advantage = 1.0 - 0.5 * row.episode
        (steps,), counts = schedule_rows(rows, 1, 1)
        set_epo_weights(steps[0], StepCounts(*counts[0].tolist()), "trajectory")
        tokens, loss = {}, 0.0
        for chunk in trainer._chunks(steps[0]):
            inputs = trainer._chunk_inputs(chunk, StepCounts(*counts[0].tolist()))
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            with torch.no_grad():
                logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
                    trainer.model, ids, mask, inputs["completion_ids"].size(1), compute_entropy=True
                )
                trainer._entropy_window = EntropyWindow()  # keep the reference fixed across layouts
                loss += trainer.compute_loss(trainer.model, inputs).item()
            for r, row in enumerate(chunk):
                offset = logps.size(1) - len(row.completion_ids)  # a row's completion ends the region
                turn_position = {}
                for j, (m, t) in enumerate(zip(row.env_mask, row.turn_ids)):
                    if m:
                        k = turn_position.setdefault(t, 0)
                        turn_position[t] += 1
                        tokens[(row.episode, t, k)] = (logps[r, offset + j].item(), entropies[r, offset + j].item())
        per_layout[layout] = (tokens, loss)
        trainer.epo_reference = EntropyReference()
        trainer.epo_reference.update(type("S", (), {"mean": 6.0, "turn_means": {}})())
    (step_tokens, step_loss), (packed_tokens, packed_loss) = per_layout["step"], per_layout["packed"]
    assert step_tokens.keys() == packed_tokens.keys() and len(step_tokens) > 20
    for key, (lp, h) in step_tokens.items():
        assert lp == pytest.approx(packed_tokens[key][0], abs=1e-5) and h == pytest.approx(
            packed_tokens[key][1], abs=1e-5
        )
    assert step_loss == pytest.approx(packed_loss, rel=1e-5, abs=1e-7)


def test_k_updates_consume_every_row_once_with_old_logps(tokenizer, make_model, tmp_path, monkeypatch):
    used, rollouts, seen_inputs = [], [], []
    real_chunk_inputs, real_score = RowTrainingMixin._chunk_inputs, RowTrainingMixin._score_rollout

    def chunk_inputs(self, chunk, counts):
        used.extend((self.state.global_step, id(row)) for row in chunk if row.episode >= 0)
        inputs = real_chunk_inputs(self, chunk, counts)
        seen_inputs.append(inputs)
        return inputs

    def score(self, inputs):
        micro = real_score(self, inputs)
        rollouts.append([id(row) for mb in micro for row in mb.rows])
        # Every step is normalised with the rollout's counts / K, whatever episodes it holds.
        rows = [row for mb in micro for row in mb.rows if row.episode >= 0]
        expected = (len(rows) / 3, sum(r.action_tokens for r in rows) / 3, len({r.episode for r in rows}) / 3)
        for mb in micro:
            assert (mb.counts.rows, mb.counts.action_tokens, mb.counts.trajectories) == pytest.approx(expected)
        return micro

    monkeypatch.setattr(RowTrainingMixin, "_chunk_inputs", chunk_inputs)
    monkeypatch.setattr(RowTrainingMixin, "_score_rollout", score)
    args = windowed_args(
        tmp_path, env_updates_per_rollout=3, per_device_train_batch_size=2, max_steps=6, env_forward_token_budget=64
    )
    assert args.steps_per_generation == 3 and args.generation_batch_size == 6
    trainer = EPOTrainer(
        make_model(), args=args, train_dataset=make_dataset("train", 6), processing_class=tokenizer, env_factory=ToyEnv
    )
    trainer.train()
    assert trainer.state.global_step == 6 and len(rollouts) == 2  # 3 optimizer steps per rollout
    for index, rows in enumerate(rollouts):
        consumed = [row for step, row in used if 3 * index <= step < 3 * index + 3]
        assert sorted(consumed) == sorted(rows)  # every row of the rollout once: none dropped, none repeated
    assert all("old_per_token_logps" in inputs for inputs in seen_inputs)  # K > 1: the clipped ratio needs them
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 6 and trainer.epo_reference.num_updates == 6


def test_resume_inside_a_rollout_trains_on_the_same_rows(tokenizer, make_model, tmp_path, monkeypatch):
    common = dict(
        env_updates_per_rollout=3,
        per_device_train_batch_size=2,
        max_steps=3,
        save_strategy="steps",
        save_steps=1,
        epo_smoothing_alpha=0.5,
        epo_kappa_high=1.0001,
    )

    def run(output_dir, resume=None):
        args = windowed_args(output_dir, **common)
        trainer = EPOTrainer(
            make_model(),
            args=args,
            train_dataset=make_dataset("train", 6),
            processing_class=tokenizer,
            env_factory=ToyEnv,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight")
    run(tmp_path / "resumed")
    assert (
        tmp_path / "resumed" / "checkpoint-1" / "epo_rollout_buffer_rank0.safetensors"
    ).exists()  # inside the rollout
    assert not (tmp_path / "resumed" / "checkpoint-3" / "epo_rollout_buffer_rank0.safetensors").exists()  # at its end
    played = []
    monkeypatch.setattr(EnvTrainingMixin, "_play_rollout_batch", lambda self, rows: played.append(rows))
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "resumed" / "checkpoint-1"))
    assert played == []  # no new rollout: steps 2 and 3 train on the rest of the saved one

    def trace(trainer, after=0):
        return [
            log[k]
            for log in trainer.state.log_history
            if "loss" in log and log["step"] > after
            for k in ("loss", "grad_norm")
        ]

    assert trace(resumed, after=1) == pytest.approx(trace(straight)[2:], rel=1e-5, abs=1e-7)
    assert resumed.epo_reference.state_dict()["history"] == pytest.approx(
        straight.epo_reference.state_dict()["history"]
    )


def test_a_checkpoint_inside_a_rollout_without_its_rows_is_refused(tokenizer, make_model, tmp_path):
    args = windowed_args(
        tmp_path,
        env_updates_per_rollout=3,
        per_device_train_batch_size=2,
        max_steps=1,
        save_strategy="steps",
        save_steps=1,
    )
    trainer = EPOTrainer(
        make_model(), args=args, train_dataset=make_dataset("train", 6), processing_class=tokenizer, env_factory=ToyEnv
    )
    trainer.train()
    (tmp_path / "checkpoint-1" / "epo_rollout_buffer_rank0.safetensors").unlink()
    fresh = EPOTrainer(
        make_model(),
        args=windowed_args(tmp_path, env_updates_per_rollout=3, per_device_train_batch_size=2, max_steps=3),
        train_dataset=make_dataset("train", 6),
        processing_class=tokenizer,
        env_factory=ToyEnv,
    )
    with pytest.raises(FileNotFoundError, match="inside a rollout"):
        fresh.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_packed_rows_go_one_per_forward_under_flash_attention_or_are_refused(tokenizer, make_model, tmp_path):
    args = windowed_args(tmp_path, env_sample_layout="packed")
    trainer = EPOTrainer(
        make_model(), args=args, train_dataset=make_dataset("train", 4), processing_class=tokenizer, env_factory=ToyEnv
    )
    rows = [
        row
        for i in range(3)
        for row in episode_rows(i, [1, 2], [5, 6, 7, 3, 8], [1, 1, 0, 0, 1], [0, 0, 1, 1, 1], None, "packed")
    ]
    assert max(len(c) for c in trainer._chunks(rows)) == 3  # sdpa: one forward for the three packed rows
    trainer.model.config._attn_implementation = "flash_attention_2"  # the kernel choice (no flash-attn needed)
    assert [len(c) for c in trainer._chunks(rows)] == [1, 1, 1]
    with pytest.raises(ValueError, match="single row"):
        check_packed_forward(trainer.model, collate(rows, 0), limit_gb=2.0)
    trainer.model.config._attn_implementation = "sdpa"
    long_rows = collate([row for row in rows for _ in range(4)], 0)
    with pytest.raises(ValueError, match="GiB.*env_sample_layout='step'"):
        check_packed_forward(trainer.model, long_rows, limit_gb=1e-9)


def test_lr_schedule_can_step_once_per_rollout(tokenizer, make_model, tmp_path):
    args = windowed_args(
        tmp_path,
        env_updates_per_rollout=2,
        per_device_train_batch_size=2,
        max_steps=6,
        lr_scheduler_type="linear",
        env_lr_per_rollout=True,
        learning_rate=1e-3,
    )
    trainer = EPOTrainer(
        make_model(), args=args, train_dataset=make_dataset("train", 6), processing_class=tokenizer, env_factory=ToyEnv
    )
    trainer.train()
    rates = [h["learning_rate"] for h in trainer.state.log_history if "loss" in h]
    assert rates[0] == rates[1] and rates[2] == rates[3] and rates[4] == rates[5]  # constant within a rollout
    assert rates[0] > rates[2] > rates[4] > 0  # linear decay over the 3 rollouts
    assert rates[2] == pytest.approx(1e-3 * 2 / 3) and rates[4] == pytest.approx(1e-3 / 3)


def test_updates_per_rollout_sets_the_generation_batch(tmp_path):
    args = EPOConfig(
        **base_config_kwargs(
            tmp_path,
            env_updates_per_rollout=4,
            gradient_accumulation_steps=2,
            per_device_train_batch_size=1,
            num_generations=2,
        )
    )
    assert args.steps_per_generation == 8 and args.env_updates == 4 and args.generation_batch_size == 8
    assert args.env_error_reward == "exclude"  # an env failure never counts as a real 0 by default
    with pytest.raises(ValueError, match="env_updates_per_rollout"):
        EPOConfig(**base_config_kwargs(tmp_path, env_updates_per_rollout=3, steps_per_generation=2))


def test_eq2_and_advantages_with_episodes_that_failed_at_reset(tokenizer, make_model, tmp_path, monkeypatch):
    """One task's env fails at reset (both group members: no action tokens). Every counted trajectory of the step
    weighs 1/B with the global B (the healthy episodes), the failed ones weigh nothing and get advantage 0, and the
    healthy groups' baselines are their own."""
    from datasets import Dataset
    from helpers.pool_envs import FaultyToyEnv

    from trl_epo.envs.base import task_rows
    from trl_epo.envs.toy import make_tasks

    rows = task_rows(make_tasks("train", 3))
    rows["extra"] = [{"fault": "raise", "fault_step": 0} if i == 1 else {} for i in range(3)]
    seen = []
    real = RowTrainingMixin._chunk_inputs

    def chunk_inputs(self, chunk, counts):
        seen.extend(
            (row.episode, sum(row.epo_weights or [0.0]), row.advantage, counts.trajectories)
            for row in chunk
            if row.episode >= 0
        )
        return real(self, chunk, counts)

    monkeypatch.setattr(RowTrainingMixin, "_chunk_inputs", chunk_inputs)
    args = windowed_args(
        tmp_path,
        per_device_train_batch_size=3,
        num_generations=2,
        gradient_accumulation_steps=2,
        steps_per_generation=2,
        env_forward_token_budget=200,
    )
    trainer = EPOTrainer(
        make_model(),
        args=args,
        train_dataset=Dataset.from_dict(rows),
        processing_class=tokenizer,
        env_factory=FaultyToyEnv,
    )
    trainer.train()
    failed = {e for e, ep in enumerate(trainer.env_rollout.last_batch.episodes) if ep.env_error is not None}
    assert len(failed) == 2, [ep.env_error for ep in trainer.env_rollout.last_batch.episodes]
    weight = {}
    for episode, w, advantage, trajectories in seen:
        weight[episode] = weight.get(episode, 0.0) + w
        assert trajectories == 4  # B: the 4 healthy episodes, counted over the whole rollout (2 micro-batches)
        if episode in failed:
            assert advantage == 0.0
    assert all(weight[e] == 0.0 for e in failed)
    assert sorted(round(weight[e], 6) for e in weight if e not in failed) == [0.25] * 4
