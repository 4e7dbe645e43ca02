"""Supervised fine-tuning on ALFWorld expert demonstrations (a warm start before EPO/GRPO).

Each row is one expert turn in the chat layout the multi-turn rollout uses (system instruction, the task with the
first observation and the admissible actions, the previous actions and observations), and the target is the expert's
``<action>...</action>`` answer (TRL's conversational prompt-completion format: only the answer is trained on).
Demonstrations come from the games' walkthroughs (generated games) or from the constructive expert (official games).

Official games (``alfworld-download``, or any data root in the json_2.1.1 layout)::

    accelerate launch examples/sft_alfworld.py --model_name_or_path Qwen/Qwen2.5-3B-Instruct \\
        --data_root $ALFWORLD_DATA --split train --num_games 1000 --output_dir out/sft-alfworld \\
        --per_device_train_batch_size 4 --gradient_accumulation_steps 8 --learning_rate 1e-5 --bf16 true

Offline, on CPU, with games generated on the spot and a tiny randomly initialised model::

    python examples/sft_alfworld.py --tiny --generate_per_type 2 --data_root out/alfworld-games \\
        --output_dir out/sft-tiny --max_steps 20

The model and tokenizer are saved to ``--output_dir``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model to fine-tune (hub id or local path). Not needed with --tiny."}
    )
    tiny: bool = field(
        default=False,
        metadata={"help": "Use a tiny randomly initialised Qwen2 model and a tokenizer built locally (offline, CPU)."},
    )
    data_root: str | None = field(
        default=None, metadata={"help": "ALFWorld data root (holds json_2.1.1/); default $ALFWORLD_DATA."}
    )
    split: str = field(default="train", metadata={"help": "Split to take demonstrations from (train, iid, ...)."})
    task_types: list[str] | None = field(default=None, metadata={"help": "Only these task types (default: all six)."})
    num_games: int | None = field(default=None, metadata={"help": "Use a random subset of this many games."})
    history: int | None = field(
        default=None,
        metadata={
            "help": "Windowed prompts with the last k (observation, action) pairs, as the rollout's "
            "env_history_turns=k (default: the whole episode, as env_history_turns=None)."
        },
    )
    generate_per_type: int = field(
        default=0,
        metadata={"help": "First generate this many games per task type into --data_root (offline generator)."},
    )
    generate_seed: int = field(default=0, metadata={"help": "Seed of the generated games."})


def build_dataset(script_args: ScriptArguments):
    from trl_epo.envs.alfworld import expert_sft_dataset, make_tasks

    if script_args.generate_per_type > 0:
        from trl_epo.envs.alfworld.game_writer import generate_games

        if not script_args.data_root:
            raise SystemExit("--generate_per_type needs --data_root (where to write the games).")
        split = {"iid": "valid_seen", "ood": "valid_unseen"}.get(script_args.split, script_args.split)
        generate_games(
            script_args.data_root,
            split,
            script_args.generate_per_type,
            script_args.task_types,
            seed=script_args.generate_seed,
        )
    tasks = make_tasks(script_args.split, script_args.data_root, script_args.task_types, script_args.num_games)
    return expert_sft_dataset(tasks, data_root=script_args.data_root, history=script_args.history, skip_failures=True)


def main(argv: list[str] | None = None):
    from trl import SFTConfig, SFTTrainer, TrlParser

    parser = TrlParser((ScriptArguments, SFTConfig))
    script_args, training_args = parser.parse_args_and_config(argv)
    dataset = build_dataset(script_args)
    print(f"{len(dataset)} expert turns from {len(set(dataset['task']))} games", file=sys.stderr)
    dataset = dataset.remove_columns([c for c in dataset.column_names if c not in ("prompt", "completion")])

    if script_args.tiny:
        from trl_epo.tiny import build_tiny_model, build_tiny_tokenizer

        texts = [m["content"] for row in dataset.select(range(min(200, len(dataset)))) for m in row["prompt"]]
        tokenizer = build_tiny_tokenizer(texts, vocab_size=2048)
        model = build_tiny_model(tokenizer, max_position_embeddings=8192)
    else:
        if not script_args.model_name_or_path:
            raise SystemExit("Pass --model_name_or_path (or --tiny for an offline tiny model).")
        from transformers import AutoModelForCausalLM

        from trl_epo.models import load_tokenizer, resolve_model

        path = resolve_model(script_args.model_name_or_path)  # smollm2-135m: the offline real model
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")

    trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(training_args.output_dir)
    tokenizer.save_pretrained(training_args.output_dir)
    return trainer


if __name__ == "__main__":
    main()
