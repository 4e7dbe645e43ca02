"""Multi-turn rollouts: play episodes of a text environment with a policy, token-exact.

    from trl_epo.rollout import ModelGenerator, MultiTurnRollout, RolloutConfig
    rollout = MultiTurnRollout(ToyEnv, RolloutConfig(max_turns=10))
    batch = rollout.play(tasks, ModelGenerator(model, tokenizer), tokenizer)   # a RolloutBatch

Modules, one per step of the data flow: `config` (RolloutConfig and its mapping from EPOConfig), `chat` (chat-template
pieces as token ids), `loop` (the turn loop), `generation` (HF generate with exact KV reuse), `backends` (the
trainer's policy: HF generate or vLLM), `vllm` (TRL's vLLM backend made ragged-safe, one engine session per rollout),
`episode` (Episode, RolloutStats, RolloutBatch).
"""

from .backends import TrainerGenerator, TrainerPolicy
from .chat import ChatSegments, find_sublist
from .config import ENV_ERROR_MODES, REWARD_MODES, RolloutConfig
from .episode import Episode, RolloutBatch, RolloutStats, env_reward
from .generation import ModelGenerator
from .loop import MultiTurnRollout


__all__ = [
    "ENV_ERROR_MODES",
    "REWARD_MODES",
    "ChatSegments",
    "Episode",
    "ModelGenerator",
    "MultiTurnRollout",
    "RolloutBatch",
    "RolloutConfig",
    "RolloutStats",
    "TrainerGenerator",
    "TrainerPolicy",
    "env_reward",
    "find_sublist",
]
