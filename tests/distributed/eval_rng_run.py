"""A 2-process DDP run (gloo, CPU) for tests/distributed/test_eval_rng_distributed.py: one GRPO group of G=2 split
over the two processes, an evaluation after every optimizer step; writes `DIR/rank<r>.json` with the completion ids
this process sampled in each training rollout.

    accelerate launch --config_file examples/accelerate/multi_gpu.yaml --num_processes 2 --mixed_precision no \
        tests/distributed/eval_rng_run.py DIR
"""

import json
import os
import sys


def main(report_dir: str) -> None:
    from trl_epo import EPOConfig, EPOTrainer
    from trl_epo.envs.toy import ToyEnv, make_dataset
    from trl_epo.row_training import RowTrainingMixin
    from trl_epo.tiny import build_tiny_model, build_tiny_tokenizer

    sampled = []
    real_score = RowTrainingMixin._score_rollout

    def score(self, inputs):
        micro = real_score(self, inputs)
        sampled.append([e.completion_ids for e in self.env_rollout.last_batch.episodes])
        return micro

    RowTrainingMixin._score_rollout = score
    tokenizer = build_tiny_tokenizer()
    args = EPOConfig(
        output_dir=os.path.join(report_dir, "run"),
        per_device_train_batch_size=1,
        num_generations=2,
        max_completion_length=120,
        env_max_turns=2,
        env_max_turn_tokens=6,
        env_pool_backend="thread",
        temperature=1.0,
        max_steps=3,
        learning_rate=1e-6,
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=1,
        env_eval_seeds=[0],
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    trainer = EPOTrainer(
        build_tiny_model(tokenizer, initializer_range=0.5),
        args=args,
        train_dataset=make_dataset("train", 4),
        eval_dataset={"iid": make_dataset("iid", 2)},
        processing_class=tokenizer,
        env_factory=ToyEnv,
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"sampled": sampled}, f)
    trainer.end()


if __name__ == "__main__":
    main(sys.argv[1])
