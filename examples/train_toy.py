"""EPO on the toy multi-turn environment: a small, offline example of every launch mode.

The script follows TRL's script conventions (`TrlParser` over `EPOConfig` + `ModelConfig` + script arguments), so the
usual flags work: `--use_peft --lora_r 16 --lora_target_modules all-linear` (LoRA), `--load_in_4bit` (QLoRA: 4-bit
bitsandbytes base + LoRA), `--gradient_checkpointing`, `--push_to_hub`, `--config my.yaml`, every `--epo_*` and
`--env_*` field. `--model_name_or_path tiny` builds a tiny random model and tokenizer locally (no download), so the
script runs anywhere, CPU included; `--model_name_or_path smollm2-135m` is a real instruct model that also works
offline (`trl_epo.models`); any Hub id or local path works too.

    # one process (CPU)
    python examples/train_toy.py --model_name_or_path tiny --output_dir out/toy --bf16 false --use_cpu
    # PPO + EPO (a critic with GAE instead of GRPO's groups; EPOPPOConfig's flags, e.g. --critic_learning_rate)
    python examples/train_toy.py --trainer ppo --model_name_or_path tiny --output_dir out/toy-ppo --bf16 false \
        --use_cpu --num_generations 1
    # LoRA / QLoRA
    python examples/train_toy.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --use_peft --lora_r 16 \
        --lora_target_modules all-linear [--load_in_4bit] --output_dir out/toy-lora
    # several GPUs: DDP, DeepSpeed ZeRO-2 / ZeRO-3 (see README, "Launch modes")
    accelerate launch --config_file examples/accelerate/zero3.yaml examples/train_toy.py \
        --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --output_dir out/toy-z3
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trl_epo.trainers import TRAINER_HELP, trainer_classes, trainer_name


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


TINY = "tiny"


@dataclass
class ToyScriptArguments:
    """Arguments of this script (the training and model arguments are `EPOConfig`, or `EPOPPOConfig` with
    `--trainer ppo`, and TRL's `ModelConfig`)."""

    trainer: str = field(default="grpo", metadata={"help": TRAINER_HELP, "choices": ["grpo", "ppo"]})
    env_name: str = field(
        default="toy",
        metadata={"help": "Registered pure-Python env: 'toy' or 'quest' (the long-horizon gem quest of the study)."},
    )
    env_split: str = field(default="train", metadata={"help": "Toy split to train on: 'train', 'iid' or 'ood'."})
    num_tasks: int = field(default=16, metadata={"help": "Number of toy tasks (dataset rows) in the training set."})
    task_seed: int = field(default=0, metadata={"help": "Seed that draws the toy tasks."})
    eval_splits: list[str] = field(
        default_factory=lambda: ["iid", "ood"], metadata={"help": "Splits evaluated with --num_eval_tasks > 0."}
    )
    num_eval_tasks: int = field(
        default=0,
        metadata={
            "help": "Tasks per evaluated split, played every --eval_steps (--eval_strategy steps) and after "
            "training (0: no evaluation)."
        },
    )
    tiny_model_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where `--model_name_or_path tiny` saves the tiny base model (default: <output_dir>/_tiny_base; "
            "the leading underscore keeps it out of `push_to_hub` uploads)."
        },
    )
    tiny_hidden_size: int = field(default=64, metadata={"help": "Hidden size of the tiny model."})
    tiny_num_layers: int = field(default=2, metadata={"help": "Layers of the tiny model."})
    save_merged_dir: str | None = field(
        default=None,
        metadata={"help": "With --use_peft: also save the base model with the adapter merged into it here."},
    )
    final_eval: bool = field(
        default=True,
        metadata={
            "help": "Evaluate after training (false: when the periodic evaluation already ran at the last step)."
        },
    )


def prepare_tiny_model(script_args: ToyScriptArguments, training_args) -> str:
    """Build the tiny model and tokenizer and save them, once (main process first), so that the trainer loads them
    from a path like any other model (with `--load_in_4bit`, `--dtype`, ZeRO-3 partitioned loading...)."""
    from accelerate import PartialState

    from trl_epo.distributed import whole_model_init
    from trl_epo.tiny import build_tiny_model, build_tiny_tokenizer

    path = script_args.tiny_model_dir or os.path.join(training_args.output_dir, "_tiny_base")
    with PartialState().main_process_first(), whole_model_init(training_args):
        if not os.path.exists(os.path.join(path, "config.json")):
            tokenizer = build_tiny_tokenizer()
            model = build_tiny_model(
                tokenizer, hidden_size=script_args.tiny_hidden_size, num_layers=script_args.tiny_num_layers, seed=0
            )
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
    return path


def build_trainer(script_args: ToyScriptArguments, training_args, model_args, **trainer_kwargs):
    """The trainer of this script (`--trainer`: EPOTrainer or EPOPPOTrainer), following TRL's conventions: the model
    is loaded by the trainer from `model_args.model_name_or_path` with `model_init_kwargs`, `quantization_config` and
    `peft_config` built by TRL's `get_quantization_config` / `get_peft_config` from the `ModelConfig` flags."""
    from trl import get_peft_config, get_quantization_config

    from trl_epo.envs.registry import get_env

    if model_args.model_name_or_path is None:
        raise ValueError("Pass --model_name_or_path (a Hub id, a local path, or 'tiny' for a tiny local model).")
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not model_args.use_peft:
        raise ValueError(
            "--load_in_4bit/--load_in_8bit quantize the frozen base model: only an adapter can be trained on it. "
            "Add --use_peft (QLoRA), or drop the quantization flag for full fine-tuning."
        )
    from trl_epo.models import MODELS, load_tokenizer, resolve_model

    model_path = model_args.model_name_or_path
    if model_path == TINY:
        model_path = prepare_tiny_model(script_args, training_args)
    model_path = resolve_model(model_path)  # an offline model (e.g. smollm2-135m): its converted folder
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    processing_class = None
    if model_args.model_name_or_path == TINY or model_args.model_name_or_path in MODELS or os.path.isdir(model_path):
        processing_class = load_tokenizer(model_path)  # as saved (a Hub model's comes through TRL's AutoProcessor)
    env = get_env(script_args.env_name)
    dataset = env.make_dataset(script_args.env_split, num_tasks=script_args.num_tasks, seed=script_args.task_seed)
    evaluation = None
    if script_args.num_eval_tasks > 0:
        evaluation = {
            split: env.make_dataset(split, num_tasks=script_args.num_eval_tasks, seed=script_args.task_seed + 1)
            for split in script_args.eval_splits
        }
    _, trainer_cls = trainer_classes(script_args.trainer)
    return trainer_cls(
        model_path,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=evaluation,
        processing_class=processing_class,
        env_factory=env.factory(),
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        **trainer_kwargs,
    )


def main(script_args: ToyScriptArguments, training_args, model_args) -> None:
    trainer = build_trainer(script_args, training_args, model_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if trainer.eval_dataset is not None and script_args.final_eval:
        trainer.evaluate()  # the final evaluation, also written to eval_results.json for the model card
    trainer.save_model(training_args.output_dir)  # the adapter alone under --use_peft, else the full model
    if script_args.save_merged_dir:
        trainer.save_merged_model(script_args.save_merged_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    trainer.accelerator.print(f"final entropy reference: {trainer.epo_reference.value()}")
    trainer.end()  # finish trackers and destroy the process group


def make_parser(argv: list[str] | None = None):
    """The parser of this script, reading the training flags into the config of the `--trainer` in `argv`."""
    from trl import ModelConfig, TrlParser

    config_cls, _ = trainer_classes(trainer_name(argv))
    return TrlParser((ToyScriptArguments, config_cls, ModelConfig))


if __name__ == "__main__":
    script_args, training_args, model_args = make_parser().parse_args_and_config()
    main(script_args, training_args, model_args)
