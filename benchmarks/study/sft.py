"""The study's shared warm start: a tiny model SFT-trained on expert trajectories of a registered env, stopped early
on purpose so that RL has room (as `benchmarks/compare_grpo_epo.py` does for the toy env).

The SFT rows are the rollout's exact prompts (`trl_epo.envs.prompting.expert_turns`: the same instruction, task line,
observation text, admissible actions and window of history as training), one prompt-completion row per expert turn
(TRL's `SFTTrainer` puts the loss on the answer only). The tokenizer is a byte-level BPE trained on the env's text.
Every arm and seed of a grid starts from this one checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass


@dataclass
class SFTSettings:
    """The warm start of a grid (one per grid; all its arms and seeds start from it)."""

    env: str = "quest"
    tasks: int = 300  # expert trajectories (train split, task seed 1: disjoint from the RL tasks' seed 0)
    steps: int = 60  # optimizer steps: the early stop that leaves RL room
    batch_size: int = 16
    learning_rate: float = 1e-3
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    history_turns: int | None = 2  # must match the RL runs' env_history_turns
    instruction: str | None = None  # must match the RL runs' env_instruction
    show_admissible_actions: bool = True
    base_model: str | None = None  # a real model (e.g. "smollm2-135m") instead of a fresh tiny one


def expert_steps(env_name: str, task):
    """[(result shown before the action, action), ...] of the env's expert on `task`, and the task description."""
    from trl_epo.envs.registry import get_env

    entry = get_env(env_name)
    module = entry.load()
    env = entry.factory()()
    result = env.reset(task)
    description = result.info.get("task_description", "")
    steps = []
    for action in module.expert_actions(task):
        steps.append((result, action))
        result = env.step(action)
        if result.done:
            break
    if not result.won:  # pragma: no cover - the expert solves by construction
        raise RuntimeError(f"The {env_name} expert did not solve {task}.")
    return description, steps


def sft_dataset(settings: SFTSettings):
    """The prompt-completion rows of `settings.tasks` expert trajectories, as the rollout would prompt them."""
    from datasets import Dataset

    from trl_epo.envs.prompting import expert_turns
    from trl_epo.envs.registry import get_env

    entry = get_env(settings.env)
    style = entry.prompt_style(
        instruction=settings.instruction, show_admissible_actions=settings.show_admissible_actions
    )
    rows = {"prompt": [], "completion": []}
    for task in entry.make_tasks("train", num_tasks=settings.tasks, seed=1):
        description, steps = expert_steps(settings.env, task)
        for prompt, answer in expert_turns(style, description, steps, settings.history_turns):
            rows["prompt"].append(prompt)
            rows["completion"].append([answer])
    return Dataset.from_dict(rows).shuffle(seed=0)


def run_sft(settings: SFTSettings, out: str) -> dict:
    """SFT a fresh tiny model (or `base_model`) into `out` (model + tokenizer + `sft_result.json`); returns the
    record. Skipped when `out` already holds a finished warm start."""
    record_path = os.path.join(out, "sft_result.json")
    if os.path.exists(record_path):
        with open(record_path) as f:
            return json.load(f)
    import torch
    from trl import SFTConfig, SFTTrainer

    from trl_epo.tiny import build_tiny_model, build_tiny_tokenizer

    torch.set_num_threads(1)
    dataset = sft_dataset(settings)
    if settings.base_model:
        from trl_epo.models import load_pretrained

        model, tokenizer = load_pretrained(settings.base_model)
    else:
        base = build_tiny_tokenizer()
        texts = [
            base.apply_chat_template(p + c, tokenize=False)
            for p, c in zip(dataset["prompt"][:400], dataset["completion"][:400])
        ]
        tokenizer = build_tiny_tokenizer(texts, vocab_size=settings.vocab_size)
        model = build_tiny_model(
            tokenizer,
            hidden_size=settings.hidden_size,
            num_layers=settings.num_layers,
            num_heads=settings.num_heads,
            seed=0,
        )
    scratch = out + ".partial"
    config = SFTConfig(
        output_dir=os.path.join(scratch, "trainer"),
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        max_length=2048,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    start = time.perf_counter()
    trainer = SFTTrainer(model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    shutil.rmtree(os.path.join(scratch, "trainer"), ignore_errors=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    record = {
        "settings": asdict(settings),
        "rows": len(dataset),
        "time_s": time.perf_counter() - start,
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": losses[-1] if losses else None,
    }
    with open(os.path.join(scratch, "sft_result.json"), "w") as f:
        json.dump(record, f, indent=2)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(scratch, out)  # the folder appears complete or not at all
    return record
