"""The trainers a script can run, by name: ``--trainer grpo`` (EPOConfig / EPOTrainer, the default) or ``--trainer
ppo`` (EPOPPOConfig / EPOPPOTrainer). A script reads the name before it builds its `TrlParser`, since the name picks
the config class the parser reads the other flags into."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import import_module


TRAINERS = {
    "grpo": ("trl_epo.config", "EPOConfig", "trl_epo.trainer", "EPOTrainer"),
    "ppo": ("trl_epo.ppo.config", "EPOPPOConfig", "trl_epo.ppo.trainer", "EPOPPOTrainer"),
}
TRAINER_HELP = "The trainer: 'grpo' (EPOTrainer: GRPO + EPO) or 'ppo' (EPOPPOTrainer: PPO with a critic + EPO)."


def trainer_classes(name: str) -> tuple[type, type]:
    """``(config class, trainer class)`` of a trainer name."""
    if name not in TRAINERS:
        raise ValueError(f"Unknown trainer {name!r}; supported: {sorted(TRAINERS)}.")
    config_module, config_class, trainer_module, trainer_class = TRAINERS[name]
    return getattr(import_module(config_module), config_class), getattr(import_module(trainer_module), trainer_class)


def trainer_name(argv: Sequence[str] | None = None, default: str = "grpo") -> str:
    """The trainer a command line asks for: ``--trainer NAME`` (or ``--trainer=NAME``), else ``trainer: NAME`` in
    its ``--config`` YAML file, else `default`. The script's arguments must also declare a `trainer` field, so that
    the parser accepts the flag and the YAML key."""
    args = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(args):
        if arg == "--trainer" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--trainer="):
            return arg.split("=", 1)[1]
    if "--config" in args and args.index("--config") + 1 < len(args):
        import yaml

        with open(args[args.index("--config") + 1]) as f:
            config = yaml.safe_load(f)
        if isinstance(config, dict) and config.get("trainer"):
            return str(config["trainer"])
    return default
