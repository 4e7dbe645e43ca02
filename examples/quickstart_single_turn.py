"""Minimal offline EPO run on a single-turn dataset with a tiny local model (no downloads, CPU, ~10 s).

python examples/quickstart_single_turn.py
"""

import os
import tempfile


os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets import Dataset  # noqa: E402

from trl_epo import EPOConfig, EPOTrainer  # noqa: E402
from trl_epo.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402


def brevity_reward(completions, **kwargs):
    """Reward short answers that contain an <action> tag."""
    texts = [c[-1]["content"] for c in completions]
    return [float("<action>" in t) - 0.01 * len(t) for t in texts]


def main():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    prompts = ["Open the door.", "Take the key.", "Go north.", "Look around."]
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    args = EPOConfig(
        output_dir=tempfile.mkdtemp(prefix="epo-quickstart-"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=16,
        max_steps=5,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        epo_entropy_coef=1e-3,
        epo_smoothing_alpha=0.1,
    )
    trainer = EPOTrainer(
        model, reward_funcs=brevity_reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    last = [h for h in trainer.state.log_history if "epo/entropy" in h][-1]
    print(
        f"final: entropy={last['epo/entropy']:.3f} reference={trainer.epo_reference.value():.3f} beta={last['epo/beta']:.3f}"
    )


if __name__ == "__main__":
    main()
