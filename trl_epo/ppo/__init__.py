"""PPO + EPO: a learned critic with GAE over action tokens instead of GRPO's group baseline (`EPOPPOTrainer`)."""

from .config import EPOPPOConfig
from .trainer import EPOPPOTrainer


__all__ = ["EPOPPOConfig", "EPOPPOTrainer"]
