"""The vLLM-vs-trainer importance-sampling correction of env rows and the logged logprob gap.

The numbers of the long-episode test (30 turns x 64 action tokens = 1920 action tokens in one full-context row; vLLM's
logprob is 0.01 nat below the trainer's on every token, +-0.03 alternating):

| mode | ratio on the episode's tokens |
|---|---|
| `token_truncate` (EPO default) | exp(0.01 +- 0.03) = 0.980 / 1.041, mean 1.010, none zeroed |
| `sequence_mask` (TRL's default) | exp(19.2) = 2.2e8 > clip_max 3 -> 0 on all 1920 tokens: the episode is dropped |
| `sequence_truncate` | clipped to 3.0 on every token: the episode weighs 3x |
| `sequence_mask`, vLLM 0.01 *above* | exp(-19.2) = 4.6e-9: the episode is crushed to nothing |
"""

import math

import pytest
import torch
from conftest import base_config_kwargs

from trl_epo import EPOConfig, EPOTrainer
from trl_epo.envs.toy import ToyEnv, make_dataset
from trl_epo.importance import importance_ratios, mismatch_metrics, mismatch_sums
from trl_epo.rows import StepCounts, TrainingRow, episode_rows


TURNS, ANSWER, OBSERVATION = 30, 64, 20


def long_episode_row(drift: float) -> TrainingRow:
    """One full-context row of a 30-turn episode; vLLM's sampling logprob = trainer's - drift -+ 0.03."""
    completion, mask, turns, sampled = [], [], [], []
    for t in range(TURNS):
        if t:
            completion += [5] * OBSERVATION
            mask += [0] * OBSERVATION
            turns += [t] * OBSERVATION
            sampled += [0.0] * OBSERVATION
        completion += [9] * ANSWER
        mask += [1] * ANSWER
        turns += [t] * ANSWER
        sampled += [-1.5 - drift - 0.03 * (1 if i % 2 else -1) for i in range(ANSWER)]
    (row,) = episode_rows(0, [1, 2, 3], completion, mask, turns, sampled, "episode")
    row.old_logps = [-1.5 if m else 0.0 for m in mask]
    row.advantage = 1.0
    return row


@pytest.fixture
def trainer(tokenizer, make_model, tmp_path):
    args = EPOConfig(**base_config_kwargs(tmp_path, per_device_train_batch_size=2, num_generations=2))
    trainer = EPOTrainer(
        make_model(), args=args, train_dataset=make_dataset("train", 2), processing_class=tokenizer, env_factory=ToyEnv
    )
    trainer.use_vllm = True  # what GRPOTrainer sets with use_vllm=True (vLLM cannot be built here)
    yield trainer
    trainer.close_envs()


def chunk_ratio(trainer, row) -> torch.Tensor:
    inputs = trainer._chunk_inputs([row], StepCounts(rows=1, action_tokens=TURNS * ANSWER, trajectories=1))
    mask = (inputs["completion_mask"] * inputs["tool_mask"]).bool()
    return inputs["importance_sampling_ratio"][mask]


def test_default_correction_keeps_a_long_multi_turn_episode_that_sequence_mask_drops(trainer):
    assert trainer.args.env_importance_sampling == "token_truncate"  # the default, used by the trainer's chunks
    assert trainer.args.vllm_importance_sampling_mode == "sequence_mask"  # TRL's default, not used for env rows
    row = long_episode_row(drift=0.01)
    ratio = chunk_ratio(trainer, row)
    assert ratio.numel() == TURNS * ANSWER
    assert (ratio > 0).all() and ratio.min().item() == pytest.approx(math.exp(-0.02), rel=1e-4)
    assert ratio.max().item() == pytest.approx(math.exp(0.04), rel=1e-4)
    assert ratio.mean().item() == pytest.approx(1.010, abs=2e-3)

    trainer.args.env_importance_sampling = "sequence_mask"  # TRL's default mode, over the whole row
    assert math.exp(TURNS * ANSWER * 0.01) == pytest.approx(2.2e8, rel=0.05)
    assert (chunk_ratio(trainer, row) == 0).all()  # > clip_max 3: every token of the episode masked
    trainer.args.env_importance_sampling = "sequence_truncate"
    assert chunk_ratio(trainer, row).tolist() == [3.0] * (TURNS * ANSWER)  # the whole episode weighs 3x
    trainer.args.env_importance_sampling = "sequence_mask"
    crushed = chunk_ratio(trainer, long_episode_row(drift=-0.01))
    assert crushed.max().item() == pytest.approx(math.exp(-19.2), rel=1e-3) and crushed.max().item() < 1e-8
    trainer.args.env_importance_sampling = "turn_mask"  # per turn: 64 tokens, exp(0.64) = 1.9 < 3, kept
    assert chunk_ratio(trainer, row).min().item() == pytest.approx(math.exp(0.64), rel=1e-4)


def test_a_chunk_without_sampling_logprobs_gets_ratio_one(trainer):
    """Filler rows (no action token, no logprobs) still carry the ratio TRL's loss reads whenever the correction
    is on."""
    filler = TrainingRow([0], [0], [0], [0], episode=-1, epo_weights=[0.0], old_logps=[0.0])
    inputs = trainer._chunk_inputs([filler], StepCounts(rows=1, action_tokens=1, trajectories=1))
    assert inputs["importance_sampling_ratio"].tolist() == [[1.0]]


def test_a_reset_failure_row_leaves_the_ratios_of_its_chunk_mates(trainer):
    """An episode that failed at reset is one row without action tokens and without sampling logprobs; a real row in
    the same forward chunk still gets its own ratio (it used to get 1 for the whole chunk)."""
    real = TrainingRow([3, 4], [7, 8], [1, 1], [0, 0], episode=0, logprobs=[-2.0, -1.0], old_logps=[-1.5, -1.2])
    real.advantage, real.epo_weights = 1.0, [0.5, 0.5]
    (failed,) = episode_rows(1, [3, 4, 5], [2], [0], [0], None, "step")  # the placeholder row of a reset failure
    failed.old_logps, failed.epo_weights = [-0.3], [0.0]
    inputs = trainer._chunk_inputs([real, failed], StepCounts(rows=2, action_tokens=2, trajectories=1))
    ratio = inputs["importance_sampling_ratio"]
    expected = [math.exp(-1.5 + 2.0), min(3.0, math.exp(-1.2 + 1.0))]  # token_truncate, clip_max 3
    assert ratio[0, -2:].tolist() == pytest.approx(expected, rel=1e-6)
    assert ratio[1, -1].item() == 1.0  # the failed row itself: nothing to correct


def test_mismatch_sums_per_turn():
    row = TrainingRow(
        [1],
        [4, 5, 6, 7, 8],
        [1, 1, 0, 1, 1],
        [0, 0, 1, 1, 1],
        0,
        logprobs=[-1.0, -2.0, 0.0, -1.0, math.nan],  # the last token was not scored by vLLM
        old_logps=[-1.2, -1.9, 0.0, -0.5, -3.0],
    )
    sums, largest = mismatch_sums([row], 3, "token_mask", None, 1.5)
    metrics = mismatch_metrics(sums, largest)
    assert metrics["vllm/logprob_gap/mean"] == pytest.approx((0.2 + 0.1 + 0.5) / 3)
    assert metrics["vllm/logprob_gap/signed_mean"] == pytest.approx((-0.2 + 0.1 + 0.5) / 3)
    assert metrics["vllm/logprob_gap/max"] == pytest.approx(0.5)
    assert metrics["vllm/logprob_gap/turn/0"] == pytest.approx(0.15)
    assert metrics["vllm/logprob_gap/turn/1"] == pytest.approx(0.5)
    assert "vllm/logprob_gap/turn/2" not in metrics  # no scored token in turn 2
    assert metrics["vllm/is_ratio/zero_frac"] == pytest.approx(1 / 3)  # exp(0.5) = 1.65 > 1.5 is masked
    assert metrics["vllm/is_ratio/mean"] == pytest.approx((math.exp(-0.2) + math.exp(0.1)) / 3)


def test_sequence_ratio_is_the_product_over_the_row():
    old, sampled = torch.tensor([[-1.0, -1.0, -2.0]]), torch.tensor([[-1.1, -1.2, -2.0]])
    ratio = importance_ratios(
        old, sampled, torch.ones(1, 3), torch.zeros(1, 3, dtype=torch.long), "sequence_truncate", None, None
    )
    assert ratio[0].tolist() == pytest.approx([math.exp(0.3)] * 3, rel=1e-5)


def test_unknown_importance_sampling_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="env_importance_sampling.*token_truncate"):
        EPOConfig(**base_config_kwargs(tmp_path, env_importance_sampling="sequence"))
