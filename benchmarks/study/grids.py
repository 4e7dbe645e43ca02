"""The study's grids: a setting (one warm start + the flags every run shares) and a table of arms, each arm a dict
of `examples/train_toy.py` flags that override the setting's. Adding an arm is adding one entry to `ARMS`, e.g.
GiGPO once its branch lands: ``"gigpo": {"env_advantage_estimator": "gigpo", "epo_entropy_coef": 0.0}``.

A run is ``python examples/train_toy.py --config <run>.yaml`` with `base` + the arm's overrides + ``seed`` +
``output_dir`` (+ ``resume_from_checkpoint`` after an interruption): a normal training run of the example script.
"""

from __future__ import annotations

from typing import Any

from sft import SFTSettings


# The regime of the paper (issue 18, item 3): K = 8 optimizer updates per rollout, a cosine schedule with warm-up
# that steps once per rollout, T = 1.0 for training and 0.4 for evaluation, 40 rollouts, evaluation every 5 rollouts
# on fixed IID and OOD sets of 128 episodes each (the eval tasks and the training tasks are the same for every arm
# and seed: task_seed is fixed; only `seed`, the sampling/initialisation seed of the RL run, varies).
K = 8
ROLLOUTS = 40
EVAL_EVERY_ROLLOUTS = 5
INSTRUCTION = "Act in the world. Answer with one action inside {example}."

QUEST_BASE: dict[str, Any] = {
    "env_name": "quest",
    "num_tasks": 256,  # distinct training tasks (the dataset cycles)
    "task_seed": 0,
    "num_eval_tasks": 128,  # per split (IID and OOD), each played once at eval seed 0
    "eval_splits": ["iid", "ood"],
    "final_eval": False,  # the periodic evaluation runs at the last step already
    "trainer": "grpo",
    "use_cpu": True,
    "bf16": False,
    "report_to": "none",
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
    "max_steps": ROLLOUTS * K,
    "env_updates_per_rollout": K,
    "per_device_train_batch_size": 2,  # x K = 16 episodes per rollout
    "num_generations": 8,  # 2 tasks x 8 episodes (GRPO groups)
    "learning_rate": 1e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.1,  # a ratio: 4 of the 40 rollouts
    "env_lr_per_rollout": True,
    "temperature": 1.0,
    "env_eval_temperature": 0.4,
    "env_eval_seeds": [0],
    "eval_strategy": "steps",
    "eval_steps": EVAL_EVERY_ROLLOUTS * K,
    "eval_on_start": True,  # the SFT start (the same for every run: the evaluation owns its RNG)
    "save_strategy": "steps",
    "save_steps": EVAL_EVERY_ROLLOUTS * K,
    "save_total_limit": 1,
    "logging_steps": 1,
    "loss_type": "dapo",
    "beta": 0.0,
    "env_history_turns": 2,  # the paper's windowed prompts: one row per turn
    "env_max_turns": 28,
    "env_max_turn_tokens": 11,  # the longest action is 10 tokens with its end-of-turn token
    "env_instruction": INSTRUCTION,
    "env_pool_backend": "inline",
    "env_log_episodes": False,
    "max_completion_length": 16384,  # the episode token budget: 28 windowed turns of ~220 tokens (4096 cut them at ~21)
}

# 350 SFT steps: success at T=0.4 about 0.15 and at T=1.0 about 0.06 (measured at 300 steps with one step of history):
# an imperfect start with a non-zero training signal.
QUEST_SFT = SFTSettings(env="quest", tasks=150, steps=350, vocab_size=1024, history_turns=2, instruction=INSTRUCTION)

# GRPO-only baselines set epo_entropy_coef = 0 (EPOTrainer is then TRL's GRPO loss exactly).
ARMS: dict[str, dict[str, Any]] = {
    "grpo": {"epo_entropy_coef": 0.0},
    "epo_base": {"epo_entropy_coef": 1e-3, "epo_smoothing": "none"},
    "epo_paper": {  # the paper's settings (lambda 1e-3, hinge, alpha 0.1, kappa [0, 2], cumulative, exp phase)
        "epo_entropy_coef": 1e-3,
        "epo_smoothing": "hinge",
        "epo_smoothing_alpha": 0.1,
        "epo_kappa_low": 0.0,
        "epo_kappa_high": 2.0,
        "epo_reference": "cumulative",
        "epo_phase_schedule": "exp",
    },
    "epo_alpha2": {"epo_entropy_coef": 1e-3, "epo_smoothing": "hinge", "epo_smoothing_alpha": 2.0},  # alpha*beta > 1
    "epo_constbeta": {"epo_entropy_coef": 1e-3, "epo_smoothing": "hinge", "epo_phase_schedule": "constant"},
    "ppo": {"trainer": "ppo", "num_generations": 1, "epo_entropy_coef": 0.0},
    "ppo_epo": {"trainer": "ppo", "num_generations": 1, "epo_entropy_coef": 1e-3, "epo_smoothing": "hinge"},
    # added after the quest-tiny launch (GiGPO landed on main later): run it with `--arms gigpo gigpo_epo`
    "gigpo": {"env_advantage_estimator": "gigpo", "epo_entropy_coef": 0.0},
    "gigpo_epo": {"env_advantage_estimator": "gigpo", "epo_entropy_coef": 1e-3, "epo_smoothing": "hinge"},
}
LAUNCHED_ARMS = ("grpo", "epo_base", "epo_paper", "epo_alpha2", "epo_constbeta", "ppo", "ppo_epo")


def gpu_arms(alpha: float) -> dict[str, dict[str, Any]]:
    """The arms at GPU scale: the tiny grid's, with the paper's alpha of the env and, for PPO, the rebuttal's
    lr 3e-6 (policy and critic)."""
    arms = {name: dict(overrides) for name, overrides in ARMS.items()}
    arms["epo_paper"]["epo_smoothing_alpha"] = alpha
    for name in ("ppo", "ppo_epo"):
        arms[name].update(learning_rate=3e-6, critic_learning_rate=3e-6)
    return arms


GRIDS: dict[str, dict[str, Any]] = {
    # The tiny-model grid: 7 arms x 5 seeds.
    "quest-tiny": {"base": QUEST_BASE, "sft": QUEST_SFT, "arms": ARMS, "seeds": [0, 1, 2, 3, 4]},
    # The real-model arm (issue 18 item 6): SmolLM2-135M-Instruct SFT then GRPO vs GRPO + EPO on an easy setting
    # (the 2-4-room toy env, windowed prompts of ~212 tokens); not run (cost in benchmarks/study/README.md: its SFT
    # alone measured ~68 CPU-s per step of 8 rows, ~23 CPU-min; a whole run extrapolates to ~7 CPU-hours).
    "toy-smollm2": {
        "base": {
            **QUEST_BASE,
            "env_name": "toy",
            "num_eval_tasks": 64,  # per split: a 135M model decodes ~20 tokens/s per row on one CPU thread
            "max_steps": 20 * 2,  # 20 rollouts x K = 2
            "env_updates_per_rollout": 2,
            "per_device_train_batch_size": 4,
            "num_generations": 4,
            "learning_rate": 1e-5,
            "eval_steps": 5 * 2,
            "save_steps": 5 * 2,
            "env_history_turns": 2,
            "env_max_turns": 10,
            "env_max_turn_tokens": 16,
            "env_instruction": None,
            "env_forward_token_budget": 1024,
        },
        "sft": SFTSettings(env="toy", tasks=64, steps=20, batch_size=8, learning_rate=2e-5, base_model="smollm2-135m"),
        "arms": {"grpo": ARMS["grpo"], "epo_paper": ARMS["epo_paper"]},
        "seeds": [0, 1],
    },
    # ---- The same study at GPU scale (issue 18 item 7; prepared, not run here): Qwen2.5-1.5B-Instruct with the
    # paper's settings from the example configs, one run at a time on 8 GPUs (`--jobs 1`), every 5 rollouts
    # evaluated on 128 IID + 128 OOD tasks and checkpointed (so an interrupted run resumes there).
    "sciworld-qwen1.5b": {
        "script": "examples/train_sciworld.py",
        "launcher": ["accelerate", "launch", "--num_processes", "8"],
        "base_config": "examples/configs/sciworld_qwen2.5-1.5b.yaml",
        "base": {"save_steps": 80, "save_total_limit": 1},
        "sft": None,
        "arms": gpu_arms(alpha=0.05),
        "seeds": [0, 1, 2],
    },
    "alfworld-qwen1.5b": {
        "script": "examples/train_alfworld.py",
        "launcher": ["accelerate", "launch", "--num_processes", "8"],
        "base_config": "examples/configs/alfworld_qwen2.5-3b.yaml",
        "base": {
            "model_name_or_path": "Qwen/Qwen2.5-1.5B-Instruct",
            "per_device_train_batch_size": 1,  # x 8 GPUs x K = 16 -> 128 episodes per rollout
            "num_eval_games": 128,
            "eval_strategy": "steps",
            "eval_steps": 80,  # every 5 rollouts
            "env_eval_temperature": 0.4,
            "save_steps": 80,
            "save_total_limit": 1,
        },
        "sft": None,
        # examples/train_alfworld.py has no `--trainer ppo` (yet): the GRPO-family arms only
        "arms": {k: v for k, v in gpu_arms(alpha=0.1).items() if not k.startswith("ppo")},
        "seeds": [0, 1, 2],
    },
    # Seconds-long smoke setting of the runner (tests/scripts/test_study.py).
    "smoke": {
        "base": {
            **QUEST_BASE,
            "num_tasks": 4,
            "num_eval_tasks": 2,
            "max_steps": 2 * 2,
            "env_updates_per_rollout": 2,
            "per_device_train_batch_size": 2,
            "num_generations": 2,
            "eval_steps": 2,
            "save_steps": 2,
            "save_total_limit": None,  # keep checkpoint-2 for the resume test
            "env_max_turns": 3,
            "env_max_turn_tokens": 4,
        },
        "sft": SFTSettings(
            env="quest",
            tasks=4,
            steps=2,
            batch_size=4,
            vocab_size=400,
            hidden_size=32,
            num_layers=1,
            num_heads=2,
            instruction=INSTRUCTION,
        ),
        "arms": {"grpo": ARMS["grpo"]},
        "seeds": [0],
    },
}


def run_config(grid: dict[str, Any], arm: str, seed: int, model: str | None, output_dir: str) -> dict[str, Any]:
    """The full flag set of one run (the YAML the grid's script reads): the grid's `base_config` YAML (a path in the
    repository, if any), then its `base`, then the arm's overrides, then the seed, the warm start and the folder.
    A value of None removes the key (the script's default applies)."""
    import os

    import yaml

    if arm not in grid["arms"]:
        raise ValueError(f"Unknown arm {arm!r}; this grid has {sorted(grid['arms'])}.")
    config: dict[str, Any] = {}
    if grid.get("base_config"):
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(os.path.join(root, grid["base_config"])) as f:
            config.update(yaml.safe_load(f))
    config.update({**grid.get("base", {}), **grid["arms"][arm], "seed": seed, "output_dir": output_dir})
    if model is not None:
        config["model_name_or_path"] = model
    return {k: v for k, v in config.items() if v is not None}
