"""EPO on ALFWorld (the paper's second benchmark): multi-turn RL of an LLM agent in TextWorld household games.

Paper settings (Qwen2.5-3B-Instruct, 150 steps, 16 games x 8 episodes per step, 50 turns, EPO lambda=1e-3,
alpha=0.1), on the official games (``alfworld-download`` fills ``$ALFWORLD_DATA``)::

    accelerate launch examples/train_alfworld.py --config examples/configs/alfworld_qwen2.5-3b.yaml
    accelerate launch --config_file examples/accelerate/zero3.yaml examples/train_alfworld.py \\
        --config examples/configs/alfworld_qwen2.5-3b.yaml --data_root /data/alfworld

Offline on CPU, a tiny model on games generated on the spot (no download of any kind)::

    python examples/train_alfworld.py --config examples/configs/alfworld_tiny.yaml

Any field of `EPOConfig` (TRL's GRPOConfig + the epo_* and env_* fields), of TRL's `ModelConfig` (model, dtype,
LoRA) and of `ScriptArguments` below can be set in the YAML file or on the command line (the command line wins).
Without official games, generate some first: ``trl-epo-alfworld-games --out DIR --per-type 500 --workers 16`` (or
``--generate_per_type`` here), then ``--data_root DIR``.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class ScriptArguments:
    data_root: str | None = field(
        default=None, metadata={"help": "ALFWorld data root (holds json_2.1.1/); default $ALFWORLD_DATA."}
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on (train, or valid_seen/iid, ...)."})
    task_types: list[str] | None = field(default=None, metadata={"help": "Only these task types (default: all six)."})
    num_train_games: int | None = field(default=None, metadata={"help": "A random subset of this many games."})
    games_seed: int = field(default=0, metadata={"help": "Seed of that subset (and of generated games)."})
    generate_per_type: int = field(
        default=0,
        metadata={
            "help": "Offline: first generate this many games per task type into --data_root (skipped when "
            "the split already holds games)."
        },
    )
    tiny: bool = field(
        default=False,
        metadata={"help": "A tiny randomly initialised Qwen2 model and a tokenizer built locally (offline tests)."},
    )
    eval_splits: list[str] = field(
        default_factory=lambda: ["iid", "ood"], metadata={"help": "Splits evaluated with --num_eval_games > 0."}
    )
    num_eval_games: int = field(
        default=0,
        metadata={
            "help": "Games per evaluated split, played every --eval_steps (--eval_strategy steps) and after "
            "training (0: no evaluation)."
        },
    )


def prepare_games(script_args) -> str:
    """The data root, after generating games into it if asked (on the main process only; the others wait)."""
    from accelerate import PartialState

    from trl_epo.envs.alfworld import find_games, resolve_data_root

    root = script_args.data_root
    if script_args.generate_per_type > 0:
        if not root:
            raise SystemExit("--generate_per_type needs --data_root (where to write the games).")
        split = {"iid": "valid_seen", "ood": "valid_unseen"}.get(script_args.train_split, script_args.train_split)
        with PartialState().main_process_first():
            try:
                have = find_games(script_args.train_split, root, script_args.task_types)
            except FileNotFoundError:
                have = []
            if not have and PartialState().is_main_process:
                from trl_epo.envs.alfworld.game_writer import generate_games

                generate_games(
                    root, split, script_args.generate_per_type, script_args.task_types, seed=script_args.games_seed
                )
    return resolve_data_root(root)  # absolute, so that the env worker processes find it too


def main(argv: list[str] | None = None):
    from trl import ModelConfig, TrlParser, get_peft_config

    from trl_epo import EPOConfig, EPOTrainer
    from trl_epo.envs.alfworld import AlfWorldEnv, make_dataset
    from trl_epo.rollout import RolloutConfig

    parser = TrlParser((ScriptArguments, EPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(argv)

    data_root = prepare_games(script_args)
    dataset = make_dataset(
        script_args.train_split,
        data_root,
        script_args.task_types,
        script_args.num_train_games,
        seed=script_args.games_seed,
    )
    print(f"Training on {len(dataset)} ALFWorld games from {data_root} ({script_args.train_split})", file=sys.stderr)
    # The env ends an episode at the same turn limit as the rollout; the data root travels to the worker processes.
    rollout_config = RolloutConfig.from_args(training_args, env="alfworld")
    env_factory = functools.partial(AlfWorldEnv, data_root=data_root, max_turns=rollout_config.max_turns)
    evaluation = None
    if script_args.num_eval_games > 0:
        evaluation = {
            split: make_dataset(
                split, data_root, script_args.task_types, script_args.num_eval_games, seed=script_args.games_seed
            )
            for split in script_args.eval_splits
        }

    if script_args.tiny:
        from trl_epo.tiny import build_tiny_model, build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer(vocab_size=1024)
        model = build_tiny_model(tokenizer, max_position_embeddings=32768)
    else:
        from transformers import AutoTokenizer

        from trl_epo.models import MODELS, load_tokenizer, resolve_model

        model = model_args.model_name_or_path
        if not model:
            raise SystemExit("Pass --model_name_or_path (or --tiny true for an offline tiny model).")
        offline = model in MODELS  # e.g. smollm2-135m: a real model without a hub
        model = resolve_model(model)
        tokenizer = (
            load_tokenizer(model)
            if offline
            else AutoTokenizer.from_pretrained(model, revision=model_args.model_revision)
        )
        training_args.model_init_kwargs = {
            **(training_args.model_init_kwargs or {}),
            "dtype": model_args.dtype or "auto",
            "revision": model_args.model_revision,
            **({"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}),
        }

    trainer = EPOTrainer(
        model,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        env_factory=env_factory,
        rollout_config=rollout_config,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    if evaluation is not None:
        trainer.evaluate()
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(training_args.output_dir)
    return trainer


if __name__ == "__main__":
    main()
