"""The values a rollout produces: `Episode` (one played episode, token-exact), `RolloutStats` (additive counters,
reduced across processes by the trainer) and `RolloutBatch` (what `MultiTurnRollout.play` returns)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..envs.base import TaskSpec
from .config import RolloutConfig


TRUNCATIONS = ("max_turns", "token_budget", "context_limit")
"""Why an episode was cut (counted in `rollout/truncation_rate`); "env_limit" (the env's own move limit) is a loss."""


@dataclass
class Episode:
    """One episode being played and, at the end, its training sequence and outcome.

    The sequence is `prompt_ids` (the first prompt) + `completion_ids`: the model's generated ids verbatim,
    interleaved with environment/template ids. `env_mask` is 1 exactly on generated ids and `turn_ids` gives each
    completion id its turn (observation ids belong to the turn they prompt). With windowed prompts, each turn's block
    in `completion_ids` is [its fresh prompt (mask 0), its answer (mask 1)].
    """

    task: TaskSpec
    slot: int
    prompt_ids: list[int]
    messages: list[dict[str, str]]
    completion_ids: list[int] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)
    turn_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    turns: int = 0
    invalid_turns: int = 0
    won: bool = False
    score: float = 0.0
    done: bool = False
    truncated: str | None = None  # one of TRUNCATIONS, or "env_limit"
    env_error: str | None = None
    closed_with: str | None = None  # the end-of-turn text the last answer ended with (None: cut at its limit)
    description: str = ""
    observation_text: str = ""  # the observation the next answer responds to, as shown
    history: list[tuple[str, str]] = field(default_factory=list)  # (observation shown, action taken) per turn
    block_start: int = -1  # windowed contexts: where the current block starts in completion_ids (-1: the prompt)
    actions: list[str | None] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    # per turn: the env's own observation the answer responds to (raw `StepResult.observation`, not the prompt) and
    # the env's canonical anchor key of that state (`StepResult.info["anchor"]`, None when it gives none): GiGPO's
    # anchor states. An invalid answer does not step the env, so the next turn keeps the same state.
    observations: list[str] = field(default_factory=list)
    anchors: list[str | None] = field(default_factory=list)
    env_observation: str = ""
    env_anchor: str | None = None

    def anchor_keys(self, source: str = "env") -> list[str]:
        """Each turn's anchor key: the env's canonical key where it gives one ("env"), else the observation text."""
        if source == "observation":
            return list(self.observations)
        return [a if a is not None else o for a, o in zip(self.anchors, self.observations)]

    @property
    def invalid_answers(self) -> list[bool]:
        """Per turn: the answer had no parsable action (penalised by `env_invalid_action_penalty`)."""
        return [a is None for a in self.actions]

    @property
    def live(self) -> bool:
        return not self.done

    def context(self, windowed: bool) -> list[int]:
        """The ids the next answer is generated from: the whole conversation, or the current windowed block."""
        if not windowed:
            return self.prompt_ids + self.completion_ids
        return self.prompt_ids if self.block_start < 0 else self.completion_ids[self.block_start :]

    def add(self, ids: Sequence[int], model: bool, turn: int, logprobs: Sequence[float] | None = None) -> None:
        self.completion_ids.extend(ids)
        self.env_mask.extend([1 if model else 0] * len(ids))
        self.turn_ids.extend([turn] * len(ids))
        if self.logprobs is not None:
            self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))

    def end(self, truncated: str | None = None, error: str | None = None) -> None:
        self.done = True
        self.truncated = self.truncated or truncated
        self.env_error = self.env_error or error

    def reward(self, config: RolloutConfig) -> float | None:
        """The episode's reward (`config.reward`), minus the invalid-turn penalty; None for an excluded env failure."""
        if self.env_error is not None:
            return None if config.env_error_reward == "exclude" else 0.0
        if config.reward == "success":
            value = float(self.won)
        elif config.reward == "won10":
            value = 10.0 * float(self.won)
        else:
            value = self.score / 100.0
        return value - config.invalid_action_penalty * self.invalid_turns

    def record(self, config: RolloutConfig) -> dict[str, Any]:
        """A JSON-serialisable transcript."""
        return {
            "task": asdict(self.task),
            "messages": self.messages,
            "actions": self.actions,
            "turns": self.turns,
            "invalid_turns": self.invalid_turns,
            "won": self.won,
            "score": self.score,
            "reward": self.reward(config),
            "truncated": self.truncated,
            "env_error": self.env_error,
            "completion_tokens": len(self.completion_ids),
            "generated_tokens": sum(self.env_mask),
            "info": self.info,
        }


@dataclass
class RolloutStats:
    """Additive counters of one rollout on one process (sum them over processes, then read the rates)."""

    episodes: float = 0
    successes: float = 0
    successes_paper_rule: float = 0
    has_paper_rule: float = 0
    turns: float = 0
    invalid_turns: float = 0
    truncated: float = 0
    env_error_episodes: float = 0
    generate_calls: float = 0
    generated_tokens: float = 0
    tokens_fed: float = 0
    final_tokens: float = 0
    time_generate: float = 0.0
    time_env: float = 0.0
    time_total: float = 0.0
    weight_syncs: float = 0  # weight pushes to the generation engine (vLLM) during the rollout
    context_limited: float = 0  # episodes ended because their context filled the engine's maximum model length

    @classmethod
    def of(cls, episodes: Sequence[Episode], timer: dict[str, float], counters: dict[str, int]) -> RolloutStats:
        return cls(
            episodes=len(episodes),
            successes=sum(e.won for e in episodes),
            successes_paper_rule=sum(bool(e.info.get("won_paper", e.won)) for e in episodes),
            has_paper_rule=float(any("won_paper" in e.info for e in episodes)),
            turns=sum(e.turns for e in episodes),
            invalid_turns=sum(e.invalid_turns for e in episodes),
            truncated=sum(e.truncated in TRUNCATIONS for e in episodes),
            env_error_episodes=sum(e.env_error is not None for e in episodes),
            generate_calls=counters["generate_calls"],
            generated_tokens=counters["generated_tokens"],
            tokens_fed=counters["tokens_fed"],
            final_tokens=sum(len(e.prompt_ids) + len(e.completion_ids) for e in episodes),
            time_generate=timer["generate"],
            time_env=timer["env"],
            time_total=timer["total"],
            weight_syncs=counters.get("weight_syncs", 0),
            context_limited=sum(e.truncated == "context_limit" for e in episodes),
        )

    def to_list(self) -> list[float]:
        return [float(getattr(self, f.name)) for f in fields(self)]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> RolloutStats:
        return cls(*values)

    # ---- rates
    @property
    def success_rate(self) -> float:
        return self.successes / max(1, self.episodes)

    @property
    def mean_turns(self) -> float:
        return self.turns / max(1, self.episodes)

    @property
    def invalid_turn_rate(self) -> float:
        return self.invalid_turns / max(1, self.turns)

    @property
    def truncation_rate(self) -> float:
        return self.truncated / max(1, self.episodes)

    @property
    def time_other(self) -> float:
        return max(0.0, self.time_total - self.time_generate - self.time_env)

    @property
    def generated_tokens_per_s(self) -> float:
        return self.generated_tokens / max(1e-9, self.time_generate)

    @property
    def refeed_ratio(self) -> float:
        """Tokens fed to the model / tokens in the final sequences (KV reuse makes it < 1)."""
        return self.tokens_fed / max(1, self.final_tokens)

    def metrics(self, num_processes: int = 1) -> dict[str, float]:
        """`rollout/*` metrics of counters summed over `num_processes` processes (times and weight syncs are
        per-process means: every process takes part in the one collective sync)."""
        out = {
            "rollout/success_rate": self.success_rate,
            "rollout/mean_turns": self.mean_turns,
            "rollout/invalid_turn_rate": self.invalid_turn_rate,
            "rollout/truncation_rate": self.truncation_rate,
            "rollout/env_error_episodes": self.env_error_episodes,
            "rollout/time_generate": self.time_generate / num_processes,
            "rollout/time_env": self.time_env / num_processes,
            "rollout/time_other": self.time_other / num_processes,
            "rollout/generated_tokens_per_s": self.generated_tokens_per_s,
            "rollout/refeed_ratio": self.refeed_ratio,
            "rollout/weight_syncs": self.weight_syncs / num_processes,
            "rollout/context_limit_episodes": self.context_limited,
        }
        if self.has_paper_rule:
            out["rollout/success_rate_paper_rule"] = self.successes_paper_rule / max(1, self.episodes)
        return out


@dataclass
class RolloutBatch:
    """What a rollout returns: the played episodes (in task order), their rewards, the rollout's counters and, for
    windowed prompts, the block marker (the ids every per-turn block starts with)."""

    episodes: list[Episode]
    stats: RolloutStats
    config: RolloutConfig
    block_marker: list[int] | None = None

    @property
    def rewards(self) -> list[float | None]:
        return [e.reward(self.config) for e in self.episodes]

    def trl_output(self) -> dict[str, list]:
        """The dict TRL's `rollout_func` contract asks for (plus `env_mask`, `turn_ids` and the env reward)."""
        episodes = self.episodes
        has_logprobs = bool(episodes) and episodes[0].logprobs is not None
        return {
            "prompt_ids": [e.prompt_ids for e in episodes],
            "completion_ids": [e.completion_ids for e in episodes],
            "logprobs": [e.logprobs for e in episodes] if has_logprobs else None,
            "env_mask": [e.env_mask for e in episodes],
            "turn_ids": [e.turn_ids for e in episodes],
            "env_reward": self.rewards,
            "episode_won": [e.won for e in episodes],
            "episode_turns": [e.turns for e in episodes],
        }

    def write_transcripts(self, path: str) -> None:
        """Every episode's transcript as JSON lines (a side effect: the caller chooses when and where)."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.writelines(json.dumps(e.record(self.config), default=str) + "\n" for e in self.episodes)


def env_reward(completions, env_reward=None, **kwargs):
    """The TRL reward function of env rollouts: each episode's reward, computed by the rollout."""
    if env_reward is None:
        raise ValueError(
            "env_reward found no `env_reward` field: it scores rollouts made by MultiTurnRollout. Pass "
            "`env_factory=` to EPOTrainer, or give your own reward functions."
        )
    return list(env_reward)
