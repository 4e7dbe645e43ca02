"""Warm-start a policy on ScienceWorld gold paths with TRL's SFTTrainer (behaviour cloning before EPO).

The expert data is built with `trl_epo.envs.sciworld.expert_sft_dataset`: each gold action sequence is replayed
through `ScienceWorldEnv` (real JVMs), and every turn becomes a prompt (system instruction, task, observations and
earlier answers, exactly as the multi-turn rollout shows them) with the expert's ``<action>...</action>`` answer as
the completion. The env settings are saved next to the model (``sciworld_env.json``) so the RL run can match them.

Offline, on CPU, with a tiny model built locally (a few minutes):

    python examples/sft_sciworld.py --tiny_model --num_tasks 64 --output_dir out/sft-sciworld-tiny \\
        --max_steps 200 --per_device_train_batch_size 4 --learning_rate 3e-3 --max_length 8192 \\
        --use_cpu --bf16 False --report_to none

A real model (one GPU; or `accelerate launch` for several):

    python examples/sft_sciworld.py --model_name_or_path Qwen/Qwen2.5-7B-Instruct --num_tasks 1024 --history_turns 2 \\
        --env_workers 8 --output_dir out/sft-sciworld-qwen7b --num_train_epochs 2 --learning_rate 1e-5 \\
        --per_device_train_batch_size 2 --gradient_accumulation_steps 8 --max_length 8192 --bf16 True \\
        --gradient_checkpointing True

Any `SFTConfig` / `ModelConfig` flag works, and so does ``--config file.yaml``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config, get_quantization_config  # noqa: E402

from trl_epo.chat_templates import enable_assistant_masks  # noqa: E402
from trl_epo.envs.registry import get_env  # noqa: E402
from trl_epo.envs.sciworld import (  # noqa: E402
    SCIWORLD_INSTRUCTION,
    check_java,
    expert_sft_dataset,
    to_prompt_completion,
)


@dataclass
class SciWorldSFTArguments:
    """What expert data to build, and (for offline runs) the tiny local model."""

    split: str = field(default="train", metadata={"help": "ScienceWorld split the gold paths come from."})
    num_tasks: int = field(default=256, metadata={"help": "Number of (task, variation) pairs to draw."})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the task draw."})
    task_types: list[str] | None = field(
        default=None, metadata={"help": "Only these task types (default: all of the split)."}
    )
    balanced: bool = field(
        default=True, metadata={"help": "Draw task types round-robin instead of by variation count."}
    )
    simplification: str = field(default="easy", metadata={"help": "Simulator simplification preset."})
    max_turns: int = field(
        default=30, metadata={"help": "Move limit: gold paths that do not finish within it are left out."}
    )
    show_objects: bool = field(
        default=True, metadata={"help": "Observations list the objects the agent can refer to."}
    )
    show_action_templates: str = field(
        default="task",
        metadata={"help": "Action templates with the task ('task'), in every observation ('every_step'), or 'never'."},
    )
    history_turns: int | None = field(
        default=None,
        metadata={
            "help": "Prompt layout of the RL run that follows: None = full conversation (EPOConfig "
            "env_history_turns=None), k = the paper's windowed prompts with the last k steps."
        },
    )
    env_workers: int = field(default=1, metadata={"help": "Parallel simulator JVMs used to replay the gold paths."})
    whole_episodes: bool = field(
        default=True,
        metadata={
            "help": "Train on whole episodes (loss on every answer) when the chat template can mark assistant "
            "turns; else, or with False, one prompt/completion row per turn."
        },
    )
    tiny_model: bool = field(
        default=False,
        metadata={"help": "Build a tiny tokenizer (trained on the expert data) and model locally: no download, CPU."},
    )
    tiny_hidden_size: int = field(default=128, metadata={"help": "Tiny model width."})
    tiny_num_layers: int = field(default=2, metadata={"help": "Tiny model depth."})
    tiny_vocab_size: int = field(default=2048, metadata={"help": "Tiny tokenizer vocabulary size."})


def env_kwargs_of(args: SciWorldSFTArguments) -> dict:
    return {
        "max_turns": args.max_turns,
        "show_objects": args.show_objects,
        "show_action_templates": args.show_action_templates,
    }


def load_model_and_tokenizer(args: SciWorldSFTArguments, model_args: ModelConfig, training_args: SFTConfig, dataset):
    """(model, tokenizer): a tiny local pair, or a Hub id / local path that SFTTrainer loads (TRL's sft script way)."""
    if args.tiny_model:
        from trl_epo.tiny import build_tiny_model, build_tiny_tokenizer

        texts = [
            m["content"]
            for row in dataset
            for m in (row["messages"] if "messages" in row else row["prompt"] + row["completion"])
        ]
        tokenizer = build_tiny_tokenizer(texts[:20_000], vocab_size=args.tiny_vocab_size)
        model = build_tiny_model(
            tokenizer, hidden_size=args.tiny_hidden_size, num_layers=args.tiny_num_layers, max_position_embeddings=8192
        )
        return model, tokenizer
    if not model_args.model_name_or_path:
        raise ValueError(
            "Give --model_name_or_path (a Hub id or a local directory), or --tiny_model for an offline run."
        )
    from transformers import AutoTokenizer

    from trl_epo.models import MODELS, load_tokenizer, resolve_model

    offline = model_args.model_name_or_path in MODELS  # e.g. smollm2-135m: a real model without a hub
    model_args.model_name_or_path = resolve_model(model_args.model_name_or_path)
    init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = init_kwargs
    if offline:
        tokenizer = load_tokenizer(model_args.model_name_or_path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model_args.model_name_or_path, tokenizer


def drop_too_long(dataset, tokenizer, max_length: int | None):
    """SFT truncates from the end (`keep_start`), which would cut a turn's expert answer: drop such rows instead."""
    if not max_length:
        return dataset

    def fits(row):
        text = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= max_length

    kept = dataset.filter(fits)
    if len(kept) < len(dataset):
        print(f"Left out {len(dataset) - len(kept)} of {len(dataset)} turns longer than max_length={max_length}.")
    if len(kept) == 0:
        raise ValueError(f"Every expert turn is longer than max_length={max_length} tokens; raise --max_length.")
    return kept


def main():
    parser = TrlParser((SciWorldSFTArguments, SFTConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    check_java()

    env_kwargs = env_kwargs_of(script_args)
    dataset = expert_sft_dataset(
        script_args.split,
        num_tasks=script_args.num_tasks,
        seed=script_args.dataset_seed,
        simplification=script_args.simplification,
        task_types=script_args.task_types,
        balanced=script_args.balanced,
        prompt_style=get_env("sciworld").prompt_style(),
        env_kwargs=env_kwargs,
        num_workers=script_args.env_workers,
        **(
            dict(format="messages")
            if script_args.history_turns is None
            else dict(format="prompt_completion", history=script_args.history_turns)
        ),
    )
    solved = len(set(zip(dataset["task"], dataset["variation"])))
    print(
        f"Expert data: {solved} solved gold episodes ({script_args.num_tasks} tasks drawn from {script_args.split})."
    )

    model, tokenizer = load_model_and_tokenizer(script_args, model_args, training_args, dataset)
    # Whole episodes with the loss on every expert answer when the chat template can mark assistant turns (ChatML,
    # e.g. the tiny tokenizer); otherwise one prompt/completion row per turn (loss on the completion).
    if "messages" in dataset.column_names and script_args.whole_episodes and enable_assistant_masks(tokenizer):
        training_args.assistant_only_loss = True
        dataset = dataset.select_columns(["messages"])
        print("Training on whole episodes (assistant_only_loss).")
    else:
        if "messages" in dataset.column_names:
            dataset = to_prompt_completion(dataset)
        dataset = drop_too_long(dataset, tokenizer, training_args.max_length)
        dataset = dataset.select_columns(["prompt", "completion"])
        print(f"Training on {len(dataset)} prompt/completion turns.")

    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        **({} if script_args.tiny_model else {"quantization_config": get_quantization_config(model_args)}),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    tokenizer.save_pretrained(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        with open(os.path.join(training_args.output_dir, "sciworld_env.json"), "w") as f:
            json.dump(
                {
                    "env_kwargs": env_kwargs,
                    "simplification": script_args.simplification,
                    "history_turns": script_args.history_turns,
                    "instruction": SCIWORLD_INSTRUCTION,
                },
                f,
                indent=2,
            )
    print(f"Saved the warm-started model and tokenizer to {training_args.output_dir}")


if __name__ == "__main__":
    main()
