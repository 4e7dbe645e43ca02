"""EPO on ScienceWorld: multi-turn episodes in simulator JVMs, GRPO advantages, the EPO entropy terms.

Paper settings (Qwen2.5-7B-Instruct; edit the config for your GPUs):

    accelerate launch examples/train_sciworld.py --config examples/configs/sciworld_qwen2.5-7b.yaml
    # PPO + EPO (a critic with GAE; `--trainer ppo`, also read from the config's `trainer: ppo`)
    accelerate launch examples/train_sciworld.py --trainer ppo --config examples/configs/sciworld_qwen2.5-7b_ppo.yaml

Offline quickstart on a CPU (a tiny model and tokenizer built locally, warm-started on gold paths, then a few EPO
steps and a success evaluation; about 10 minutes on 2 cores):

    python examples/train_sciworld.py --config examples/configs/sciworld_quickstart_tiny.yaml

Any `EPOConfig` / `ModelConfig` field can be given as a flag (``--epo_entropy_coef 0`` is plain GRPO), as can the
`SciWorldTrainArguments` below. With ``--num_eval_tasks N`` the trainer evaluates N tasks of each ``--eval_splits``
split at ``--env_eval_temperature`` every ``--eval_steps`` (``--eval_strategy steps``) and after training, logged as
`eval/<split>/success_rate` with its 95% interval. The run writes the model, `trainer_state.json`, `epo_run.json`
(with the prompt settings `trl-epo evaluate` reuses), every episode's transcript (`_rollouts/*.jsonl`) and
`eval_results.json` (for the model card) to ``--output_dir``.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass, field

from accelerate import PartialState
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config

from trl_epo import EPOConfig, EPOTrainer
from trl_epo.chat_templates import enable_assistant_masks
from trl_epo.envs import TaskSpec
from trl_epo.envs.sciworld import (
    ScienceWorldEnv,
    check_java,
    expert_sft_dataset,
    make_dataset,
    make_tasks,
    to_prompt_completion,
)
from trl_epo.rollout import RolloutConfig
from trl_epo.trainers import TRAINER_HELP, trainer_classes, trainer_name


@dataclass
class SciWorldTrainArguments:
    """Tasks, environment settings, optional warm start and the final evaluation."""

    trainer: str = field(default="grpo", metadata={"help": TRAINER_HELP, "choices": ["grpo", "ppo"]})
    train_split: str = field(default="train", metadata={"help": "Training split (train, train_seen_types, ...)."})
    num_train_tasks: int | None = field(default=None, metadata={"help": "Draw this many training tasks (None: all)."})
    task_types: list[str] | None = field(default=None, metadata={"help": "Only these task types (default: all)."})
    balanced: bool = field(default=True, metadata={"help": "Draw task types round-robin rather than by variations."})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the task draws."})
    simplification: str = field(default="easy", metadata={"help": "Simulator simplification preset."})
    success_rule: str = field(
        default="score",
        metadata={
            "help": "'score' (won = score 100) or 'paper' (done and score > 0: gameable, replication only).",
            "choices": ["score", "paper"],
        },
    )
    show_objects: bool = field(default=True, metadata={"help": "Observations list the objects the agent can name."})
    show_action_templates: str = field(
        default="task",
        metadata={"help": "Action templates with the task ('task'), in every observation ('every_step'), or 'never'."},
    )
    admissible_actions: bool = field(
        default=False, metadata={"help": "Compute the valid-action list every step (slow; shown when listed)."}
    )
    # evaluation: periodic (--eval_strategy steps --eval_steps N) and after training
    eval_splits: list[str] = field(
        default_factory=lambda: ["iid"], metadata={"help": "Splits evaluated (iid, ood, held_out_types)."}
    )
    num_eval_tasks: int = field(default=0, metadata={"help": "Tasks per evaluated split (0: no evaluation)."})
    eval_on_train_tasks: bool = field(
        default=False,
        metadata={
            "help": "Evaluate on the training tasks (cycled to --num_eval_tasks episodes) instead of --eval_splits."
        },
    )
    # offline tiny model
    tiny_model: bool = field(
        default=False,
        metadata={
            "help": "Build a tiny tokenizer (trained on ScienceWorld text) and model locally (same as "
            "--model_name_or_path tiny)."
        },
    )
    tiny_hidden_size: int = field(default=128, metadata={"help": "Tiny model width."})
    tiny_num_layers: int = field(default=2, metadata={"help": "Tiny model depth."})
    tiny_vocab_size: int = field(default=2048, metadata={"help": "Tiny tokenizer vocabulary size."})
    # warm start on gold paths (behaviour cloning) before EPO
    warm_start_steps: int = field(default=0, metadata={"help": "SFT steps on gold paths before EPO (0: none)."})
    warm_start_tasks: int = field(default=32, metadata={"help": "Gold episodes drawn for the warm start."})
    warm_start_on_train_tasks: bool = field(
        default=False, metadata={"help": "Warm-start on the gold paths of the EPO training tasks themselves."}
    )
    warm_start_learning_rate: float = field(default=3e-3, metadata={"help": "Warm-start learning rate."})
    warm_start_batch_size: int = field(default=8, metadata={"help": "Warm-start batch size."})
    warm_start_max_length: int = field(default=4096, metadata={"help": "Warm-start sequence length limit."})


def env_kwargs_of(script_args: SciWorldTrainArguments, rollout_config: RolloutConfig) -> dict:
    return dict(
        max_turns=rollout_config.max_turns,  # the simulator's own move limit = the rollout's turn limit
        success_rule=script_args.success_rule,
        show_objects=script_args.show_objects,
        show_action_templates=script_args.show_action_templates,
        admissible_actions=script_args.admissible_actions,
    )


def warm_start(model, tokenizer, expert, script_args: SciWorldTrainArguments, training_args: EPOConfig):
    """Behaviour cloning on gold paths with TRL's SFTTrainer, loss on the expert answers only: whole episodes with
    `assistant_only_loss` when the layout is the full conversation and the chat template can mark assistant turns,
    else one prompt/completion row per turn."""
    whole_episodes = "messages" in expert.column_names and enable_assistant_masks(tokenizer)
    if whole_episodes:
        data = expert.select_columns(["messages"])
    else:

        def fits(row):
            text = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
            return len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= script_args.warm_start_max_length

        turns = to_prompt_completion(expert) if "messages" in expert.column_names else expert
        data = turns.filter(fits).select_columns(["prompt", "completion"])
    unit = "whole gold episodes" if whole_episodes else "gold-path turns"
    PartialState().print(f"Warm start: {script_args.warm_start_steps} SFT steps on {len(data)} {unit}")
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="sciworld-warm-start-"),
        max_steps=script_args.warm_start_steps,
        per_device_train_batch_size=script_args.warm_start_batch_size,
        learning_rate=script_args.warm_start_learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        max_length=script_args.warm_start_max_length,
        assistant_only_loss=whole_episodes,
        logging_steps=max(1, script_args.warm_start_steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=training_args.use_cpu,
        bf16=training_args.bf16,
        gradient_checkpointing=training_args.gradient_checkpointing,
        seed=training_args.seed,
        disable_tqdm=training_args.disable_tqdm,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    PartialState().print(f"Warm start done: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return trainer.accelerator.unwrap_model(trainer.model)


def eval_datasets(script_args: SciWorldTrainArguments, train_tasks, task_kwargs) -> dict | None:
    """The task datasets the trainer evaluates on: {split: dataset}, or None without evaluation."""
    from datasets import Dataset

    from trl_epo.envs import task_rows

    if script_args.num_eval_tasks <= 0:
        return None
    if script_args.eval_on_train_tasks:
        tasks = [train_tasks[i % len(train_tasks)] for i in range(script_args.num_eval_tasks)]
        return {"train_tasks": Dataset.from_dict(task_rows(tasks))}
    return {
        split: make_dataset(split, num_tasks=script_args.num_eval_tasks, seed=script_args.dataset_seed, **task_kwargs)
        for split in script_args.eval_splits
    }


def main(argv: list[str] | None = None) -> EPOTrainer:
    config_cls, trainer_cls = trainer_classes(trainer_name(argv))  # EPOConfig/EPOTrainer or EPOPPOConfig/EPOPPOTrainer
    parser = TrlParser((SciWorldTrainArguments, config_cls, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    check_java()
    log = PartialState().print  # main process only
    if model_args.model_name_or_path == "tiny":  # the convention of the other example scripts
        script_args.tiny_model = True

    # The rollout's settings (ScienceWorld's registry defaults + the env_* flags): the warm start uses its prompts.
    rollout_config = RolloutConfig.from_args(training_args, env="sciworld")
    style = rollout_config.prompt_style
    env_kwargs = env_kwargs_of(script_args, rollout_config)
    task_kwargs = dict(
        task_types=script_args.task_types, balanced=script_args.balanced, simplification=script_args.simplification
    )
    dataset = make_dataset(
        script_args.train_split, num_tasks=script_args.num_train_tasks, seed=script_args.dataset_seed, **task_kwargs
    )
    train_tasks = [TaskSpec.from_row(row) for row in dataset]
    log(
        f"Training on {len(dataset)} ScienceWorld tasks ({script_args.train_split}), "
        f"{len({t.task for t in train_tasks})} task types"
    )

    # Gold-path expert data: for the warm start, and as the tiny tokenizer's training text.
    expert = None
    if script_args.warm_start_steps > 0 or script_args.tiny_model:
        if script_args.warm_start_on_train_tasks:
            expert_tasks = train_tasks
        else:
            expert_tasks = make_tasks(
                script_args.train_split,
                num_tasks=script_args.warm_start_tasks,
                seed=script_args.dataset_seed + 1,
                **task_kwargs,
            )
        # The rollout's layout: whole conversations, or the paper's windowed prompts (one row per turn).
        layout = (
            dict(format="messages")
            if training_args.env_history_turns is None
            else dict(format="prompt_completion", history=training_args.env_history_turns)
        )
        expert = expert_sft_dataset(tasks=expert_tasks, prompt_style=style, env_kwargs=env_kwargs, **layout)
        solved = len(set(zip(expert["task"], expert["variation"])))
        log(f"Expert data: {solved} solved gold episodes of {len(expert_tasks)} drawn tasks")

    if script_args.tiny_model:
        from trl_epo.tiny import build_tiny_model, build_tiny_tokenizer

        conversations = (row["messages"] if "messages" in row else row["prompt"] + row["completion"] for row in expert)
        texts = [m["content"] for messages in conversations for m in messages[1:]] + [style.instruction]
        tokenizer = build_tiny_tokenizer(texts[:20_000], vocab_size=script_args.tiny_vocab_size)
        model = build_tiny_model(
            tokenizer,
            hidden_size=script_args.tiny_hidden_size,
            num_layers=script_args.tiny_num_layers,
            max_position_embeddings=16384,
            seed=training_args.seed,
        )
    else:
        if not model_args.model_name_or_path:
            raise ValueError("Give --model_name_or_path (a Hub id or local directory), or --tiny_model.")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from trl_epo.models import MODELS, load_tokenizer, resolve_model

        offline = model_args.model_name_or_path in MODELS  # e.g. smollm2-135m: a real model without a hub
        model_args.model_name_or_path = resolve_model(model_args.model_name_or_path)
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
        init_kwargs = dict(
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
            attn_implementation=model_args.attn_implementation,
            dtype=model_args.dtype,
        )
        if script_args.warm_start_steps > 0:
            model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **init_kwargs)
        else:  # let TRL load it (DeepSpeed ZeRO-3 friendly)
            training_args.model_init_kwargs = {**init_kwargs, **(training_args.model_init_kwargs or {})}
            model = model_args.model_name_or_path

    if script_args.warm_start_steps > 0:
        model = warm_start(model, tokenizer, expert, script_args, training_args)

    evaluation = eval_datasets(script_args, train_tasks, task_kwargs)
    trainer = trainer_cls(
        model,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        # GiGPO's anchor keys cost two free JVM calls a step: only when GiGPO reads them
        env_factory=functools.partial(
            ScienceWorldEnv, **env_kwargs, state_keys=training_args.env_advantage_estimator == "gigpo"
        ),
        rollout_config=rollout_config,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()

    history = [h for h in trainer.state.log_history if "rollout/success_rate" in h]
    for h in history:
        paper = h.get("rollout/success_rate_paper_rule")
        log(
            f"step {h.get('step', '?'):>4}: success {h['rollout/success_rate']:.3f}"
            + (f" (paper rule {paper:.3f})" if paper is not None else "")
            + f", turns {h['rollout/mean_turns']:.1f}, invalid turns {h['rollout/invalid_turn_rate']:.2f}, "
            f"entropy {h.get('epo/entropy', float('nan')):.3f}"
        )
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(training_args.output_dir)

    if evaluation is not None:  # the final evaluation (also written to eval_results.json for the model card)
        metrics = trainer.evaluate()
        for split in evaluation:
            rate = metrics[f"eval/{split}/success_rate"]
            low, high = metrics[f"eval/{split}/success_ci_low"], metrics[f"eval/{split}/success_ci_high"]
            log(
                f"Evaluation on {int(metrics[f'eval/{split}/episodes'])} {split} episodes (temperature "
                f"{training_args.env_eval_temperature}): success {rate:.3f} [95% CI {low:.3f}-{high:.3f}]"
            )
    trainer.end()  # finish the trackers and destroy the process group (last)
    return trainer


if __name__ == "__main__":
    main()
