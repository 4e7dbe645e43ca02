"""A 2-process GiGPO + dynamic-sampling run for tests/distributed/test_gigpo_distributed.py (DDP on the CPU, gloo):

    accelerate launch --config_file examples/accelerate/multi_gpu.yaml --num_processes 2 --mixed_precision no \
        tests/distributed/gigpo_run.py REPORT_DIR

Groups of G=4 episodes with 2 episodes per process, so every group straddles the two processes. Each process writes
`REPORT_DIR/rank<r>.json`: per scored rollout its local episodes' turns (anchor keys, invalid answers), all processes'
rewards, and the advantage on every action token of its rows; and the logged metrics.
"""

import json
import os
import sys

import torch

from trl_epo import EPOConfig, EPOTrainer
from trl_epo.envs.toy import ToyEnv, make_dataset
from trl_epo.row_training import RowTrainingMixin
from trl_epo.tiny import build_tiny_model, build_tiny_tokenizer


def parity_reward(completions, task, **kwargs):
    """open-door groups: always 0 (zero variance, dropped); fetch-coin: the parity of the answers' length."""
    return [
        0.0 if t == "open-door" else float(sum(len(m["content"]) for m in c) % 2) for c, t in zip(completions, task)
    ]


def main(report_dir: str) -> None:
    rollouts = []
    real = RowTrainingMixin._assign_advantages

    def assign(self, rows, rewards, batch):
        real(self, rows, rewards, batch)
        tokens = []
        for row in rows:
            values = row.advantage if isinstance(row.advantage, list) else [row.advantage] * len(row.completion_ids)
            tokens += [[row.episode, t, v] for v, m, t in zip(values, row.env_mask, row.turn_ids) if m]
        rollouts.append(
            {
                "turns": [[e.anchor_keys(), e.invalid_answers] for e in batch.episodes],
                "rewards": rewards.tolist(),
                "tokens": tokens,
            }
        )

    RowTrainingMixin._assign_advantages = assign
    args = EPOConfig(
        output_dir=os.path.join(report_dir, "run"),
        per_device_train_batch_size=2,
        num_generations=4,
        max_completion_length=400,
        learning_rate=1e-3,
        max_steps=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        ddp_backend="gloo",
        seed=0,
        disable_tqdm=True,
        env_max_turns=3,
        env_max_turn_tokens=8,
        env_pool_backend="thread",
        env_history_turns=1,
        env_advantage_estimator="gigpo",
        env_advantage_baseline="rows",
        env_invalid_action_penalty=0.1,
        env_filter_groups=True,
        env_filter_max_rollouts=3,
    )
    torch.set_num_threads(1)
    tokenizer = build_tiny_tokenizer()
    trainer = EPOTrainer(
        build_tiny_model(tokenizer, seed=0),
        args=args,
        reward_funcs=[parity_reward],
        train_dataset=make_dataset("train", 8),
        processing_class=tokenizer,
        env_factory=ToyEnv,
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    log = next(h for h in trainer.state.log_history if "loss" in h)
    report = {"rank": rank, "world_size": trainer.accelerator.num_processes, "rollouts": rollouts, "log": log}
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1])
