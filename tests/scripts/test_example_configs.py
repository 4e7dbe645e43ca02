"""Every shipped YAML config parses into its script's arguments (EPOConfig validates its settings at parse time), so
a config never drifts from the code: the paper configs train one row per turn with K = 16 updates per rollout."""

import importlib.util
import sys
from pathlib import Path

import pytest
from trl import ModelConfig, TrlParser

from trl_epo.trainers import trainer_classes


REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "examples" / "configs").glob("*.yaml"))


def script_arguments(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.SciWorldTrainArguments if name == "train_sciworld" else module.ScriptArguments


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_parses(config, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    script = "train_alfworld" if config.stem.startswith("alfworld") else "train_sciworld"
    trainer = "ppo" if "ppo" in config.stem else "grpo"  # the config's `trainer:` key picks EPOPPOConfig
    config_class, _ = trainer_classes(trainer)
    parser = TrlParser((script_arguments(script), config_class, ModelConfig))
    _, args, _ = parser.parse_args_and_config(["--config", str(config), "--use_cpu", "true", "--bf16", "false"])
    if "qwen2.5" in config.stem:  # the paper configs: the reference's optimisation shape
        assert args.env_history_turns == 2 and args.env_sample_layout in (None, "step")
        assert args.env_updates == (32 if trainer == "ppo" else 16) and args.env_lr_per_rollout
        assert args.max_steps % args.env_updates == 0
