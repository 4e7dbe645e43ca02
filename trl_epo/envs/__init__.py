"""Text environments for multi-turn agent RL (the `TextEnv` protocol, a parallel pool, and adapters).

Adapters are imported lazily: `from trl_epo.envs import ScienceWorldEnv` needs the `scienceworld` package (and Java)
only when that name is used.
"""

from importlib import import_module

from .base import ActionFormat, StepResult, TaskSpec, TextEnv, parse_action, task_rows
from .checker import CheckReport, TextEnvContractError, check_text_env
from .pool import EnvPool
from .prompting import PromptStyle
from .registry import EnvSpec, get_env, register_env


_LAZY = {
    "ToyEnv": "trl_epo.envs.toy",
    "ScienceWorldEnv": "trl_epo.envs.sciworld",
    "AlfWorldEnv": "trl_epo.envs.alfworld",
    "TRLEnvironment": "trl_epo.envs.trl_tools",
    "OpenEnvTextEnv": "trl_epo.envs.openenv",
}

__all__ = [
    "ActionFormat",
    "CheckReport",
    "EnvPool",
    "EnvSpec",
    "PromptStyle",
    "StepResult",
    "TaskSpec",
    "TextEnv",
    "TextEnvContractError",
    "check_text_env",
    "get_env",
    "parse_action",
    "register_env",
    "task_rows",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trl_epo.envs' has no attribute {name!r}")
