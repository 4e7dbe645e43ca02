"""Checkpoints of env-row training: the rest of a rollout is stored without pickle and round-trips exactly, a tampered
file is refused without running it (row buffer, critic state), and a resume inside a rollout's `num_iterations`
passes trains on the same rollout."""

import json
import os

import pytest
import torch
from conftest import base_config_kwargs, windowed_config_kwargs

from trl_epo import EPOConfig, EPOTrainer, row_buffer
from trl_epo.env_training import EnvTrainingMixin
from trl_epo.envs.toy import ToyEnv, make_dataset
from trl_epo.row_training import LEGACY_ROW_BUFFER_NAME, ROW_BUFFER_NAME, MicroBatch
from trl_epo.rows import StepCounts, TrainingRow


class _Payload:
    """Unpickling it creates `path` (what a tampered checkpoint could do instead)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def windowed_args(tmp_path, **overrides):
    kwargs = dict(
        max_steps=3,
        per_device_train_batch_size=2,
    )
    kwargs.update(overrides)
    return EPOConfig(**windowed_config_kwargs(tmp_path, **kwargs))


def train_on_toy_tasks(model, tokenizer, args, resume=None) -> EPOTrainer:
    """Train on 4 toy tasks (resuming from `resume` when given); the trainer, its env workers closed."""
    trainer = EPOTrainer(
        model, args=args, train_dataset=make_dataset("train", 4), processing_class=tokenizer, env_factory=ToyEnv
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.close_envs()
    return trainer


def test_the_row_buffer_round_trips_every_field_exactly(tmp_path):
    a = TrainingRow([1, 2, 3], [4, 5], [1, 0], [0, 1], episode=0, logprobs=[-0.1234567890123, -2.5])
    a.advantage, a.epo_weights, a.old_logps = 0.1 + 0.2, [1 / 3, 0.0], [-1.0, -2.0000001]
    a.extra = {"returns": [0.5, 0.25], "value_mask": [1.0, 0.0]}
    b = TrainingRow([7], [8, 9, 10], [1, 1, 1], [2, 2, 2], episode=3, advantage=[0.1, -0.2, 1e-30])
    b.ref_logps, b.extra = [-3.0, -4.0, -5.0], {"returns": [1.0, 2.0, 3.0], "tag": 7}
    filler = TrainingRow([0], [0], [0], [0], episode=-1, epo_weights=[0.0], old_logps=[0.0], ref_logps=[0.0])
    buffer = [
        MicroBatch([a, filler], StepCounts(2.0, 3.0, 1.0)),
        MicroBatch([], StepCounts(0, 0, 0)),
        MicroBatch([b], StepCounts(1, 3, 1)),
    ]
    path = str(tmp_path / "buffer.safetensors")
    row_buffer.save(path, 5, buffer)
    step, loaded = row_buffer.load(path)
    assert step == 5 and [MicroBatch(*m) for m in loaded] == buffer  # dataclass equality: floats bit-exact
    assert isinstance(loaded[2][0][0].extra["tag"], int)


def test_a_tampered_row_buffer_is_refused_without_running_it(tokenizer, make_model, tmp_path):
    trainer = EPOTrainer(
        make_model(),
        args=windowed_args(tmp_path, env_updates_per_rollout=2, max_steps=2),
        train_dataset=make_dataset("train", 4),
        processing_class=tokenizer,
        env_factory=ToyEnv,
    )
    checkpoint = tmp_path / "checkpoint-1"  # step 1 of a rollout of 2 updates: its rows are in the checkpoint
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    marker = tmp_path / "pwned"
    for name in (ROW_BUFFER_NAME, LEGACY_ROW_BUFFER_NAME):  # the file it reads, and an older release's pickle
        for old in checkpoint.glob("epo_rollout_buffer*"):
            old.unlink()
        torch.save({"step": 1, "buffer": _Payload(marker)}, checkpoint / name.format(rank=0))
        with pytest.raises(ValueError, match="not loaded"):
            trainer._load_row_buffer(str(checkpoint))
        assert not marker.exists()
    trainer.close_envs()


def test_a_tampered_critic_state_is_refused_without_running_it(make_model, tmp_path):
    from transformers import AutoModelForTokenClassification

    from trl_epo.ppo.critic_engine import CRITIC_DIR, OPTIMIZER_NAME, SCHEDULER_NAME, CriticEngine

    def engine(seed):
        config = make_model(seed=seed).config
        config.num_labels = 1
        torch.manual_seed(seed)
        critic = CriticEngine(AutoModelForTokenClassification.from_config(config))
        critic.optimizer = torch.optim.AdamW(critic.model.parameters(), lr=1e-3)
        critic.scheduler = torch.optim.lr_scheduler.LambdaLR(critic.optimizer, lambda step: 1.0 / (1 + step))
        return critic

    saved = engine(0)
    saved.model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    saved.optimizer.step()
    saved.scheduler.step()
    saved.save_pretrained(str(tmp_path / CRITIC_DIR), should_save=True)
    saved.save_state(str(tmp_path), should_save=True)
    restored = engine(1)
    restored.load_state(str(tmp_path))  # the honest checkpoint restores
    assert restored.scheduler.state_dict()["last_epoch"] == 1 and restored.scheduler.get_last_lr() == [5e-4]
    assert restored.optimizer.state_dict()["state"][0]["step"] == 1

    marker = tmp_path / "pwned"
    for name in (SCHEDULER_NAME, OPTIMIZER_NAME):
        state = tmp_path / CRITIC_DIR / name
        original = state.read_bytes()
        torch.save({"state": _Payload(marker)}, state)
        with pytest.raises(ValueError, match="not loaded"):
            engine(1).load_state(str(tmp_path))
        assert not marker.exists(), f"{name} was unpickled"
        state.write_bytes(original)


def test_resume_inside_the_num_iterations_passes_trains_on_the_same_rollout(
    tokenizer, make_model, tmp_path, monkeypatch
):
    """TRL's num_iterations = 2 passes over one rollout: step 2 is the second pass over rollout 0. A checkpoint at
    step 1 carries the rollout, so the resumed run does not play a new one and ends where the straight one does."""

    def run(output_dir, resume=None):
        args = windowed_args(
            output_dir, num_iterations=2, max_steps=2, save_strategy="steps", save_steps=1, learning_rate=1e-2
        )
        return train_on_toy_tasks(make_model(), tokenizer, args, resume)

    straight = run(tmp_path)
    assert os.path.exists(tmp_path / "checkpoint-1" / ROW_BUFFER_NAME.format(rank=0))
    played = []
    monkeypatch.setattr(EnvTrainingMixin, "_play_rollout_batch", lambda self, rows: played.append(rows))
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "checkpoint-1"))
    assert played == []
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=1e-7, msg=key)


def test_resume_at_an_epoch_boundary_plays_the_same_tasks(tokenizer, make_model, tmp_path, monkeypatch):
    """4 tasks x G 2 = one rollout per epoch: checkpoint-1 is an epoch boundary, and the resumed rollout plays epoch 1's
    shuffle (TRL's sampler restarted from epoch 0's)."""
    played = []
    real = EnvTrainingMixin._play_rollout_batch

    def recording(self, rows):
        played.append([(r["task"], r["variation"], r["seed"]) for r in rows])
        return real(self, rows)

    monkeypatch.setattr(EnvTrainingMixin, "_play_rollout_batch", recording)

    def run(output_dir, resume=None):
        args = windowed_args(
            output_dir, per_device_train_batch_size=8, max_steps=2, save_strategy="steps", save_steps=1
        )
        return train_on_toy_tasks(make_model(), tokenizer, args, resume)

    run(tmp_path)
    straight, played[:] = list(played), []
    assert json.loads((tmp_path / "checkpoint-1" / "trainer_state.json").read_text())["epoch"] == 1.0
    assert straight[0] != straight[1]
    run(tmp_path / "resumed", resume=str(tmp_path / "checkpoint-1"))
    assert played == straight[1:]


def test_a_per_rollout_lr_schedule_saves_no_code(tmp_path):
    """`env_lr_per_rollout` wraps the LR functions; their state in scheduler.pt must load with weights_only=True
    (transformers' resume), and the restored schedule continues where it was."""
    from trl_epo.row_training import lr_scheduler_of

    args = EPOConfig(
        **base_config_kwargs(tmp_path, per_device_train_batch_size=4, num_generations=2),
        env_updates_per_rollout=2,
        env_lr_per_rollout=True,
        lr_scheduler_type="cosine",
    )
    make = lambda: lr_scheduler_of(args, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 8)  # noqa: E731
    scheduler = make()
    for _ in range(3):
        scheduler.optimizer.step()
        scheduler.step()
    torch.save(scheduler.state_dict(), tmp_path / "scheduler.pt")
    restored = make()
    restored.load_state_dict(torch.load(tmp_path / "scheduler.pt", weights_only=True))
    assert restored.get_last_lr() == scheduler.get_last_lr()
    restored.step(), scheduler.step()
    assert restored.get_last_lr() == scheduler.get_last_lr() != [1.0]
