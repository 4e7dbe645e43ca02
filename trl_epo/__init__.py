"""trl_epo: Entropy-regularized Policy Optimization (EPO) for multi-turn LLM agents, on TRL.

The public names are imported lazily, so that light modules (``trl_epo.envs.*``) load fast in environment worker
processes without importing torch or TRL.
"""

from importlib import import_module
from typing import TYPE_CHECKING


__version__ = "0.1.0"

_EXPORTS = {
    "EPOConfig": "trl_epo.config",
    "EPOTrainer": "trl_epo.trainer",
    "EPOPPOConfig": "trl_epo.ppo.config",
    "EPOPPOTrainer": "trl_epo.ppo.trainer",
    "EntropyReference": "trl_epo.objective",
    "corridor_penalty": "trl_epo.objective",
    "phase_weight": "trl_epo.objective",
    "trajectory_mean": "trl_epo.objective",
    "trajectory_weights": "trl_epo.objective",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .config import EPOConfig  # noqa: F401
    from .objective import EntropyReference, corridor_penalty, phase_weight, trajectory_mean, trajectory_weights  # noqa: F401
    from .ppo import EPOPPOConfig, EPOPPOTrainer  # noqa: F401
    from .trainer import EPOTrainer  # noqa: F401


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trl_epo' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
