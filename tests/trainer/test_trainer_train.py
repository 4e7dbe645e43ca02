"""EPOTrainer end to end on a single-turn dataset: metrics, the once-per-step reference update, checkpoint/resume."""

import json
import os

import pytest
from conftest import base_config_kwargs, count_a_reward

from trl_epo import EPOConfig, EPOTrainer
from trl_epo.run_files import EPO_STATE_NAME


def train(make_model, tokenizer, dataset, output_dir, resume=None, **overrides):
    args = EPOConfig(**base_config_kwargs(output_dir, **overrides))
    trainer = EPOTrainer(
        make_model(), reward_funcs=count_a_reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def step_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def test_three_steps_with_gradient_accumulation_log_epo_metrics(make_model, tokenizer, single_turn_dataset, tmp_path):
    trainer = train(
        make_model,
        tokenizer,
        single_turn_dataset,
        tmp_path,
        max_steps=3,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
        num_generations=4,
    )
    logs = step_logs(trainer)
    assert len(logs) == 3
    for key in ("epo/entropy", "epo/beta", "epo/smooth_penalty", "epo/step_entropy", "entropy", "reward"):
        assert all(key in log for log in logs), key
    # No history at step 0: no corridor, no reference; from step 1 on both exist.
    assert "epo/reference" not in logs[0] and "epo/out_of_corridor_frac" not in logs[0]
    assert logs[0]["epo/smooth_penalty"] == 0.0
    assert all("epo/reference" in log and "epo/out_of_corridor_frac" in log for log in logs[1:])
    assert logs[0]["epo/beta"] == 2.0 and logs[1]["epo/beta"] < 2.0
    # One reference update per optimizer step (not per micro-batch), each the step's global token-mean entropy.
    ref = trainer.epo_reference
    assert ref.num_updates == 3
    assert ref.history == pytest.approx([log["epo/step_entropy"] for log in logs])
    assert logs[1]["epo/reference"] == pytest.approx(ref.history[0])
    assert logs[2]["epo/reference"] == pytest.approx(sum(ref.history[:2]) / 2)
    assert ref.value() == pytest.approx(sum(ref.history) / 3)


def test_step_entropy_is_the_token_mean_entropy_of_the_step(make_model, tokenizer, single_turn_dataset, tmp_path):
    # With one micro-batch per step, TRL's own `entropy` metric is the same token mean.
    trainer = train(make_model, tokenizer, single_turn_dataset, tmp_path, max_steps=2)
    for log in step_logs(trainer):
        assert log["epo/step_entropy"] == pytest.approx(log["entropy"], rel=1e-5)


def test_resume_gives_identical_losses_and_reference(make_model, tokenizer, single_turn_dataset, tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, epo_smoothing_alpha=0.5, epo_kappa_high=1.0001)
    straight = train(make_model, tokenizer, single_turn_dataset, tmp_path / "straight", **common)

    first = train(make_model, tokenizer, single_turn_dataset, tmp_path / "resumed", **dict(common, max_steps=4))
    # Re-run from the step-2 checkpoint of the second run, in a fresh trainer.
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    state = json.loads((checkpoint / EPO_STATE_NAME).read_text())
    assert state["reference"]["num_updates"] == 2
    resumed = train(make_model, tokenizer, single_turn_dataset, tmp_path / "resumed", resume=str(checkpoint), **common)

    def trace(trainer, after=0):
        # Flat [loss, grad_norm, reward, loss, ...]: pytest >= 9.2's approx compares flat sequences of numbers only.
        return [log[k] for log in step_logs(trainer) if log["step"] > after for k in ("loss", "grad_norm", "reward")]

    assert len(trace(straight)) == 4 * 3 and len(trace(resumed, after=2)) == 2 * 3
    assert trace(resumed, after=2) == pytest.approx(trace(straight)[2 * 3 :], rel=1e-5, abs=1e-7)
    assert trace(first) == pytest.approx(trace(straight), rel=1e-5, abs=1e-7)
    assert resumed.epo_reference.state_dict() == straight.epo_reference.state_dict()
    assert resumed.epo_reference.num_updates == 4
    # The smoothing term was active after step 0, so the resumed run really used the restored reference.
    assert any(log["epo/smooth_penalty"] > 0 for log in step_logs(resumed) if log["step"] > 2)


def test_checkpoint_state_is_written_atomically(make_model, tokenizer, single_turn_dataset, tmp_path):
    train(make_model, tokenizer, single_turn_dataset, tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    for step in (1, 2):
        folder = tmp_path / f"checkpoint-{step}"
        state = json.loads((folder / EPO_STATE_NAME).read_text())
        assert state["reference"]["num_updates"] == step
        assert not [name for name in os.listdir(folder) if name.startswith(".tmp-")]


def test_resume_without_epo_state_fails_clearly(make_model, tokenizer, single_turn_dataset, tmp_path):
    train(make_model, tokenizer, single_turn_dataset, tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    (tmp_path / "checkpoint-1" / EPO_STATE_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=EPO_STATE_NAME):
        train(make_model, tokenizer, single_turn_dataset, tmp_path, max_steps=2, resume=str(tmp_path / "checkpoint-1"))


def test_a_config_that_is_no_grpo_config_is_refused(make_model, tokenizer, single_turn_dataset, tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="EPOConfig"):
        EPOTrainer(
            make_model(),
            reward_funcs=count_a_reward,
            args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
            train_dataset=single_turn_dataset,
            processing_class=tokenizer,
        )
