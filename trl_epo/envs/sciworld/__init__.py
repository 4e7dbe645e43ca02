"""ScienceWorld (Wang et al., 2022) as a `TextEnv`: one lean JVM per env, the paper's splits, gold-path expert data.

* `jvm` — finding Java (`JavaNotFoundError` says how to install it) and the simulator's JVM.
* `tasks` — task types, the paper's splits (`make_tasks`, `make_dataset`) from the simulator's variation table.
* `env` — `ScienceWorldEnv`, the adapter.
* `expert` — gold paths replayed into chat-format SFT data (`expert_sft_dataset`).

Its defaults (30 turns per episode, the ScienceWorld instruction) are its registry entry's:
``get_env("sciworld").prompt_style()``.
"""

try:  # one clear message, before any submodule needs the package
    import py4j  # noqa: F401
    import scienceworld  # noqa: F401
except ImportError as _error:  # pragma: no cover - depends on the installation
    raise ImportError(
        "ScienceWorldEnv needs the `scienceworld` package (and Java): pip install 'trl-epo[sciworld]' "
        f"(= scienceworld==1.2.3), and a JDK/JRE >= 11, e.g. apt-get install -y openjdk-17-jre-headless. ({_error})"
    ) from _error

from ..registry import SCIWORLD_INSTRUCTION
from .env import (
    REWARD_MODES,
    SIMPLIFICATIONS,
    SUCCESS_RULES,
    TEMPLATE_PLACEMENTS,
    ScienceWorldEnv,
    check_simplification,
    normalize_action,
)
from .expert import SFT_FORMATS, GoldEpisode, expert_sft_dataset, gold_episodes, to_prompt_completion
from .jvm import DEFAULT_JAVA_OPTIONS, JavaNotFoundError, JVMDiedError, ScienceWorldJVM, check_java, find_java
from .tasks import (
    ALL_TASKS,
    DEFAULT_SIMPLIFICATION,
    ENV_NAME,
    EXCLUDED_TASKS,
    HELD_OUT_TASK_TYPES,
    PAPER_TASKS,
    SEEN_TASK_TYPES,
    SPLIT_ALIASES,
    SPLITS,
    make_dataset,
    make_tasks,
    query_variation_table,
    split_pairs,
    variation_table,
)


__all__ = [
    "ALL_TASKS",
    "DEFAULT_JAVA_OPTIONS",
    "DEFAULT_SIMPLIFICATION",
    "ENV_NAME",
    "EXCLUDED_TASKS",
    "HELD_OUT_TASK_TYPES",
    "PAPER_TASKS",
    "REWARD_MODES",
    "SCIWORLD_INSTRUCTION",
    "SEEN_TASK_TYPES",
    "SFT_FORMATS",
    "SIMPLIFICATIONS",
    "SPLITS",
    "SPLIT_ALIASES",
    "SUCCESS_RULES",
    "TEMPLATE_PLACEMENTS",
    "GoldEpisode",
    "JVMDiedError",
    "JavaNotFoundError",
    "ScienceWorldEnv",
    "ScienceWorldJVM",
    "check_java",
    "check_simplification",
    "expert_sft_dataset",
    "find_java",
    "gold_episodes",
    "make_dataset",
    "make_tasks",
    "normalize_action",
    "query_variation_table",
    "split_pairs",
    "to_prompt_completion",
    "variation_table",
]
