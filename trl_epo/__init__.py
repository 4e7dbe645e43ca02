"""trl_epo: Entropy-regularized Policy Optimization (EPO) for multi-turn LLM agents, on TRL."""

from .config import EPOConfig
from .objective import EntropyReference, corridor_penalty, phase_weight, trajectory_mean, trajectory_weights
from .trainer import EPOTrainer


__version__ = "0.1.0"

__all__ = [
    "EPOConfig",
    "EPOTrainer",
    "EntropyReference",
    "corridor_penalty",
    "phase_weight",
    "trajectory_mean",
    "trajectory_weights",
]
