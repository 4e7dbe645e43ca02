"""Multi-turn rollouts: play episodes of a text environment with the policy, for TRL's `rollout_func`.

For a generation batch (TRL hands the rollout each task row repeated `num_generations` times, so the G members of a
GRPO group play the same task with the same seed), `MultiTurnRollout`:

1. resets one env per episode (in parallel, through an `EnvPool`),
2. loops over turns: for **all live episodes at once** it generates the next answer in one batched call (HF
   `generate` under TRL's `unwrap_model_for_generation`, or TRL's vLLM backend when `use_vllm=True`), parses the
   action (`<action>...</action>`), steps the envs in parallel and appends the observation,
3. stops an episode at `done`, at `max_turns`, or when its completion-token budget is spent.

Each episode becomes one training sequence: `prompt_ids` (system instruction + task + first observation, rendered
with the tokenizer's chat template) and `completion_ids` = the model's own generated ids, verbatim, interleaved with
the environment/template tokens (never re-tokenized). `env_mask` is 1 exactly on the generated ids (the loss mask)
and `turn_ids` gives every completion token its turn index (observation tokens belong to the turn they prompt), so
`EPOTrainer` computes the trajectory-level entropy of Eq. 2.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .envs.base import StepResult, TaskSpec
from .envs.prompting import INVALID_HISTORY_ACTION, PromptStyle
from .envs.pool import EnvPool, EnvFactory


REWARD_MODES = ("success", "score", "won10")
ROLLOUT_LOG_DIR = "_rollouts"  # "_" folders stay out of push_to_hub uploads (transcripts can be large)
ENV_ERROR_MODES = ("zero", "exclude")


@dataclass
class RolloutConfig:
    """Settings of a multi-turn rollout (EPOConfig's `env_*` fields map onto these; see `from_args`).

    Attributes:
        max_turns: turns per episode (paper: 30 ScienceWorld, 50 ALFWorld); an episode that reaches it is truncated.
        max_turn_tokens: new tokens the model may generate in one turn (paper: 512).
        max_episode_tokens: completion-token budget of an episode (generated + environment tokens); defaults to the
            trainer's `max_completion_length`.
        history_turns: None (default) keeps the whole episode in context: one growing conversation, and the training
            sequence is exactly that conversation. An integer k gives the paper's windowed prompts: every turn the
            model sees a fresh prompt with the task, its last k (observation, action) pairs and the current
            observation. The training sequence then packs these per-turn blocks ([prompt_t, answer_t] for every t)
            into one row, and EPOTrainer's forward restarts positions and attention at every block, so each answer is
            scored on exactly the context it was generated from.
        reward: "success" (1 if won else 0), "score" (env score / 100) or "won10" (10 * won, as the paper's code).
        invalid_action_penalty: subtracted from the reward for every invalid turn (the paper's code: 0.1).
        env_error_reward: "zero" (an episode whose env failed gets reward 0) or "exclude" (reward None: TRL gives it
            advantage 0 and leaves it out of its group's baseline).
        prompt_style: the prompt (instruction, action tag, observation layout): `PromptStyle`.
        pool_backend / pool_size / step_timeout: the `EnvPool` that steps the envs (pool_size = episodes played at the
            same time on this process; default: all episodes of a generation batch).
        log_dir: where to write every episode's transcript as JSON lines (None: do not write).
        progress_bar: show a tqdm bar over turns (main process only).
        reuse_kv_cache: with HF `generate` and full contexts, continue each turn from the last turn's KV cache
            instead of re-encoding the conversation (`ModelGenerator`); sampling is unchanged.
    """

    max_turns: int = 30
    max_turn_tokens: int = 512
    max_episode_tokens: int | None = None
    history_turns: int | None = None
    reward: str = "success"
    invalid_action_penalty: float = 0.0
    env_error_reward: str = "zero"
    prompt_style: PromptStyle = field(default_factory=PromptStyle)
    pool_backend: str = "process"
    pool_size: int | None = None
    step_timeout: float = 60.0
    log_dir: str | None = None
    progress_bar: bool = True
    reuse_kv_cache: bool = True

    def __post_init__(self):
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}.")
        if self.max_turn_tokens < 1:
            raise ValueError(f"max_turn_tokens must be >= 1, got {self.max_turn_tokens}.")
        if self.reward not in REWARD_MODES:
            raise ValueError(f"reward must be one of {REWARD_MODES}, got {self.reward!r}.")
        if self.env_error_reward not in ENV_ERROR_MODES:
            raise ValueError(f"env_error_reward must be one of {ENV_ERROR_MODES}, got {self.env_error_reward!r}.")
        if self.history_turns is not None and self.history_turns < 0:
            raise ValueError(f"history_turns must be None (full context) or >= 0, got {self.history_turns}.")
        if self.invalid_action_penalty < 0:
            raise ValueError("invalid_action_penalty is subtracted per invalid turn: give a value >= 0.")

    @classmethod
    def from_args(cls, args) -> RolloutConfig:
        """Build from an `EPOConfig` (its `env_*` fields)."""
        style_kwargs = {
            "show_admissible_actions": args.env_show_admissible_actions,
            "max_observation_chars": args.env_max_observation_chars,
            "action_tag": args.env_action_tag,
        }
        if args.env_instruction:
            style_kwargs["instruction"] = args.env_instruction
        style = PromptStyle(**style_kwargs)
        log_dir = os.path.join(args.output_dir, ROLLOUT_LOG_DIR) if args.env_log_episodes else None
        return cls(
            max_turns=args.env_max_turns,
            max_turn_tokens=args.env_max_turn_tokens,
            max_episode_tokens=args.max_completion_length,
            history_turns=args.env_history_turns,
            reward=args.env_reward,
            invalid_action_penalty=args.env_invalid_action_penalty,
            env_error_reward=args.env_error_reward,
            prompt_style=style,
            pool_backend=args.env_pool_backend,
            pool_size=args.env_pool_size,
            step_timeout=args.env_step_timeout,
            log_dir=log_dir,
            progress_bar=not args.disable_tqdm,
            reuse_kv_cache=args.env_reuse_kv_cache,
        )


@dataclass
class Episode:
    """One episode being played (and, at the end, its training sequence and statistics)."""

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
    truncated: str | None = None  # "max_turns", "token_budget" or "env_limit"
    env_error: str | None = None
    answer_closed: bool = True  # the last answer ended with the model's own end-of-turn token
    description: str = ""
    observation_text: str = ""  # the observation the next answer responds to, as shown
    history: list[tuple[str, str]] = field(default_factory=list)  # (observation shown, action taken) per turn
    block_start: int = -1  # windowed contexts: where the current block starts in completion_ids (-1: the prompt)
    actions: list[str | None] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

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

    def reward(self, config: RolloutConfig) -> float | None:
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


class ChatSegments:
    """Token ids of the chat-template pieces around the model's answers, derived from the tokenizer's own template.

    `prompt(messages)` renders the first prompt (with the generation prompt). `observation(text, closed)` gives the
    ids that follow an assistant answer: the end of the assistant message (its end-of-turn token only when the model
    did not generate it itself, `closed=False`), the user message with `text`, and the next generation prompt.
    """

    _PROBE = "\u2063PROBE\u2063"

    def __init__(self, tokenizer, system_message: dict[str, str] | None):
        self.tokenizer = tokenizer
        base = ([system_message] if system_message else []) + [{"role": "user", "content": "x"}]
        with_answer = base + [{"role": "assistant", "content": self._PROBE}]
        rendered = self._render(with_answer, generation_prompt=False)
        position = rendered.rindex(self._PROBE) + len(self._PROBE)
        self._assistant_tail = rendered[position:]  # e.g. "<|im_end|>\n"
        self._prefix_len = len(rendered)
        self._base = with_answer

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode(self._render(messages, generation_prompt=True))

    def block_marker(self, system_message: dict[str, str] | None) -> list[int]:
        """The ids every windowed prompt starts with (the rendered system message and the user header): the marker
        EPOTrainer uses to find where each packed block begins."""
        base = [system_message] if system_message else []
        a = self.prompt(base + [{"role": "user", "content": "alpha"}])
        b = self.prompt(base + [{"role": "user", "content": "omega"}])
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        if n < 4:
            raise ValueError(
                "Windowed contexts (history_turns) need prompts that start with a recognisable header of >= 4 tokens "
                "(e.g. a system message); this chat template renders too little before the user's text. Use a "
                "system message (PromptStyle(use_system_message=True)) or full-context rollouts (history_turns=None)."
            )
        return a[:n]

    def observation(self, text: str, closed: bool, end_of_turn_text: str) -> list[int]:
        rendered = self._render(self._base + [{"role": "user", "content": text}], generation_prompt=True)
        if not rendered.startswith(self._render(self._base, generation_prompt=False)):
            raise ValueError(
                "The tokenizer's chat template re-renders earlier messages when a new one is added, so the tokens "
                "between turns cannot be derived. Use a template whose rendering of a conversation is a prefix of the "
                "rendering of its continuation (ChatML/Qwen/Llama-3 templates are)."
            )
        between = rendered[self._prefix_len :]
        tail = self._assistant_tail
        if closed and tail.startswith(end_of_turn_text):
            tail = tail[len(end_of_turn_text) :]
        return self.encode(tail + between)


def find_sublist(ids: Sequence[int], pattern: Sequence[int]) -> int:
    """Index of the first occurrence of `pattern` in `ids`, or -1."""
    n = len(pattern)
    if n == 0:
        return -1
    first = pattern[0]
    for i in range(len(ids) - n + 1):
        if ids[i] == first and list(ids[i : i + n]) == list(pattern):
            return i
    return -1


def env_reward(completions, env_reward=None, **kwargs):
    """The TRL reward function of env rollouts: each episode's reward, computed by the rollout."""
    if env_reward is None:
        raise ValueError(
            "env_reward found no `env_reward` field: it scores rollouts made by MultiTurnRollout. Pass "
            "`env_factory=` to EPOTrainer, or give your own reward functions."
        )
    return list(env_reward)


class MultiTurnRollout:
    """A TRL `rollout_func` that plays multi-turn episodes (see the module docstring).

    Args:
        env_factory: zero-argument callable returning a fresh `TextEnv` (picklable for the process backend, e.g. a
            class or `functools.partial(ScienceWorldEnv, ...)`).
        config: a `RolloutConfig`; defaults to `RolloutConfig.from_args(trainer.args)` at the first call.

    Call it as `rollout(prompts, trainer)`. The task of each prompt comes from the dataset row TRL is generating for
    (`EPOTrainer` exposes the rows as `trainer.rollout_rows`); rows need the task columns of `TaskSpec`.
    """

    def __init__(self, env_factory: EnvFactory, config: RolloutConfig | None = None):
        self.env_factory = env_factory
        self.config = config
        self.pool: EnvPool | None = None
        self.last_episodes: list[Episode] = []
        self.last_stats: dict[str, float] = {}
        self.block_marker: list[int] | None = None
        self._batches = 0

    # ---- TRL entry point
    def __call__(self, prompts: list, trainer) -> dict[str, list]:
        rows = getattr(trainer, "rollout_rows", None)
        if rows is None or len(rows) != len(prompts):
            raise RuntimeError(
                "MultiTurnRollout needs the dataset rows being generated for; use it with EPOTrainer (pass "
                "`env_factory=` or `rollout_func=MultiTurnRollout(...)`), which exposes them as `trainer.rollout_rows`."
            )
        if self.config is None:
            self.config = RolloutConfig.from_args(trainer.args)
        tasks = [TaskSpec.from_row(row) for row in rows]
        generator = TrainerGenerator(trainer, self.config)
        episodes, stats = self.play(tasks, generator, tokenizer=trainer.processing_class)
        # Windowed contexts: the trainer's forward restarts positions/attention at each block marker.
        trainer.packed_block_marker = self.block_marker
        self._log(trainer, episodes, stats)
        return self.to_rollout_output(episodes)

    # ---- playing
    def _ensure_pool(self, size: int) -> EnvPool:
        want = size if self.config.pool_size is None else min(size, self.config.pool_size)
        if self.pool is None or self.pool.size < want:
            if self.pool is not None:
                self.pool.close()
            self.pool = EnvPool(
                self.env_factory, want, backend=self.config.pool_backend, step_timeout=self.config.step_timeout
            )
        return self.pool

    def play(self, tasks: Sequence[TaskSpec], generator, tokenizer) -> tuple[list[Episode], dict[str, float]]:
        """Play one episode per task (in waves of at most `pool_size`); returns the episodes and rollout stats."""
        config = self.config
        pool = self._ensure_pool(len(tasks))
        fmt = config.prompt_style.action_format
        system = config.prompt_style.system_messages()
        segments = ChatSegments(tokenizer, system[0] if system else None)
        self.block_marker = segments.block_marker(system[0] if system else None) if config.history_turns is not None else None
        timer = {"generate": 0.0, "env": 0.0, "total": 0.0}
        counters = {"generate_calls": 0, "tokens_fed": 0, "generated_tokens": 0}
        start = time.perf_counter()
        episodes: list[Episode] = []
        with generator:  # e.g. ZeRO-3 weights gathered once for the whole rollout, not once per turn
            for wave_start in range(0, len(tasks), pool.size):
                wave = tasks[wave_start : wave_start + pool.size]
                upcoming = tasks[wave_start + pool.size : wave_start + 2 * pool.size]
                episodes += self._play_wave(wave, upcoming, pool, generator, tokenizer, fmt, segments, timer, counters)
        timer["total"] = time.perf_counter() - start
        stats = self._stats(episodes, timer, counters)
        self.last_episodes, self.last_stats = episodes, stats
        return episodes, stats

    def _play_wave(self, tasks, upcoming, pool, generator, tokenizer, fmt, segments, timer, counters) -> list[Episode]:
        config, style = self.config, self.config.prompt_style
        budget = config.max_episode_tokens or generator.default_budget
        eos_text = tokenizer.decode([generator.eos_token_ids[0]])
        windowed = config.history_turns is not None

        t0 = time.perf_counter()
        first = pool.reset(list(enumerate(tasks)))
        if upcoming:  # slow resets (ALFWorld) of the next wave get prepared while this one plays
            pool.prefetch([(slot, [task]) for slot, task in enumerate(upcoming)])
        timer["env"] += time.perf_counter() - t0
        episodes = []
        for slot, (task, result) in enumerate(zip(tasks, first)):
            description = result.info.get("task_description", "")
            messages = style.first_messages(description, result)
            episode = Episode(task=task, slot=slot, prompt_ids=segments.prompt(messages), messages=messages)
            episode.description = description
            episode.observation_text = style.observation_text(result)
            episode.logprobs = [] if generator.returns_logprobs else None
            if result.env_error is not None:
                episode.done, episode.env_error = True, result.env_error
            elif result.done:  # solved or over at reset: nothing to learn from, but keep it well-formed
                episode.done, episode.won = True, result.won
            episode.score = float(result.info.get("score", 0.0) or 0.0)
            episodes.append(episode)

        progress = generator.progress(config.max_turns, enabled=config.progress_bar)
        for turn in range(config.max_turns):
            live = [e for e in episodes if e.live]
            if not generator.any_live_anywhere(bool(live)):
                break
            # Episodes without room for one more generated token stop here (truncated by the token budget).
            for e in live:
                if len(e.completion_ids) >= budget:
                    e.done, e.truncated = True, "token_budget"
            live = [e for e in live if e.live]
            contexts = [e.context(windowed) for e in live]
            limits = [min(config.max_turn_tokens, budget - len(e.completion_ids)) for e in live]
            t0 = time.perf_counter()
            outputs = generator.generate(contexts, limits)
            timer["generate"] += time.perf_counter() - t0
            counters["generate_calls"] += 1 if contexts else 0
            counters["tokens_fed"] += getattr(generator, "tokens_fed", sum(len(c) for c in contexts))

            to_step = []
            for e, (ids, logprobs) in zip(live, outputs):
                if windowed:  # an answer never contains a block header (it would be mistaken for a new block)
                    cut = find_sublist(ids, self.block_marker)
                    if cut >= 0:
                        ids, logprobs = ids[:cut], (logprobs[:cut] if logprobs is not None else None)
                counters["generated_tokens"] += len(ids)
                e.add(ids, model=True, turn=turn, logprobs=logprobs)
                e.turns += 1
                text = tokenizer.decode(ids, skip_special_tokens=True)
                e.messages.append({"role": "assistant", "content": text})
                action = fmt.parse(text)
                e.actions.append(action)
                e.history.append((e.observation_text, action if action is not None else INVALID_HISTORY_ACTION))
                e.answer_closed = bool(ids) and ids[-1] in generator.eos_token_ids
                if action is None:
                    e.invalid_turns += 1
                else:
                    to_step.append((e, action))
            t0 = time.perf_counter()
            results = pool.step([(e.slot, action) for e, action in to_step]) if to_step else []
            timer["env"] += time.perf_counter() - t0
            stepped = {id(e): r for (e, _), r in zip(to_step, results)}

            for e in live:
                result: StepResult | None = stepped.get(id(e))
                if result is None:  # an invalid answer: the env is not stepped, the agent is told
                    observation = StepResult(observation=style.invalid_text(), info={"invalid_answer": True})
                elif result.env_error is not None:
                    e.done, e.env_error = True, result.env_error
                    continue
                else:
                    observation = result
                    e.score = float(result.info.get("score", e.score) or 0.0)
                    if result.info.get("invalid_action"):
                        e.info["env_invalid_actions"] = e.info.get("env_invalid_actions", 0) + 1
                    if result.done:
                        e.done, e.won = True, bool(result.won)
                        if not result.won:
                            e.truncated = "env_limit"
                        e.info.update({k: v for k, v in result.info.items() if k in ("won_paper",)})
                        continue
                if e.turns >= config.max_turns:
                    e.done, e.truncated = True, "max_turns"
                    continue
                text = style.observation_text(observation)
                if windowed:  # a fresh prompt: task, the last k (observation, action) pairs, the observation
                    recent = e.history[-config.history_turns :] if config.history_turns else []
                    ids = segments.prompt(style.window_messages(e.description, recent, text))
                else:  # the conversation goes on: end of the answer, the observation, the next generation prompt
                    ids = segments.observation(text, closed=e.answer_closed, end_of_turn_text=eos_text)
                if len(e.completion_ids) + len(ids) >= budget:
                    e.done, e.truncated = True, "token_budget"
                    continue
                e.block_start = len(e.completion_ids)
                e.add(ids, model=False, turn=turn + 1)
                e.observation_text = text
                e.messages.append({"role": "user", "content": text})
            progress.update(1)
        progress.close()
        for e in episodes:
            if e.live:  # the turn loop ended (max_turns reached on every live episode)
                e.done, e.truncated = True, e.truncated or "max_turns"
            if not e.completion_ids:  # failed or over at reset: one masked token keeps the sequence well-formed
                e.add([generator.eos_token_ids[0]], model=False, turn=0)
        return episodes

    # ---- outputs
    def to_rollout_output(self, episodes: list[Episode]) -> dict[str, list]:
        config = self.config
        return {
            "prompt_ids": [e.prompt_ids for e in episodes],
            "completion_ids": [e.completion_ids for e in episodes],
            "logprobs": [e.logprobs for e in episodes] if episodes and episodes[0].logprobs is not None else None,
            "env_mask": [e.env_mask for e in episodes],
            "turn_ids": [e.turn_ids for e in episodes],
            "env_reward": [e.reward(config) for e in episodes],
            "episode_won": [e.won for e in episodes],
            "episode_turns": [e.turns for e in episodes],
        }

    def _stats(self, episodes, timer, counters) -> dict[str, float]:
        n = max(1, len(episodes))
        turns = sum(e.turns for e in episodes)
        final_tokens = sum(len(e.prompt_ids) + len(e.completion_ids) for e in episodes)
        other = max(0.0, timer["total"] - timer["generate"] - timer["env"])
        return {
            "episodes": len(episodes),
            "success_rate": sum(e.won for e in episodes) / n,
            "mean_turns": turns / n,
            "invalid_turn_rate": sum(e.invalid_turns for e in episodes) / max(1, turns),
            "truncation_rate": sum(e.truncated in ("max_turns", "token_budget") for e in episodes) / n,
            "env_error_episodes": sum(e.env_error is not None for e in episodes),
            "time_generate": timer["generate"],
            "time_env": timer["env"],
            "time_other": other,
            "time_total": timer["total"],
            "generate_calls": counters["generate_calls"],
            "generated_tokens": counters["generated_tokens"],
            "generated_tokens_per_s": counters["generated_tokens"] / max(1e-9, timer["generate"]),
            "tokens_fed": counters["tokens_fed"],
            "final_tokens": final_tokens,
            "refeed_ratio": counters["tokens_fed"] / max(1, final_tokens),
        }

    def _log(self, trainer, episodes, stats) -> None:
        mode = "train" if trainer.model.training else "eval"
        accelerator = trainer.accelerator
        device = accelerator.device
        sums = torch.tensor(
            [
                stats["episodes"],
                stats["success_rate"] * stats["episodes"],
                stats["mean_turns"] * stats["episodes"],
                sum(e.invalid_turns for e in episodes),
                stats["truncation_rate"] * stats["episodes"],
                stats["env_error_episodes"],
                stats["generated_tokens"],
                sum(e.info.get("won_paper", e.won) for e in episodes),
            ],
            dtype=torch.float64,
            device=device,
        )
        sums = accelerator.reduce(sums, reduction="sum")
        n, turns = sums[0].clamp(min=1), sums[2].clamp(min=1)
        metrics = trainer._metrics[mode]
        metrics["rollout/success_rate"].append((sums[1] / n).item())
        metrics["rollout/mean_turns"].append((sums[2] / n).item())
        metrics["rollout/invalid_turn_rate"].append((sums[3] / turns).item())
        metrics["rollout/truncation_rate"].append((sums[4] / n).item())
        metrics["rollout/env_error_episodes"].append(sums[5].item())
        if any("won_paper" in e.info for e in episodes):
            metrics["rollout/success_rate_paper_rule"].append((sums[7] / n).item())
        for key in ("time_generate", "time_env", "time_other", "generated_tokens_per_s", "refeed_ratio"):
            metrics[f"rollout/{key}"].append(float(stats[key]))
        if self.config.log_dir:
            self._write_episodes(trainer, episodes, mode)

    def _write_episodes(self, trainer, episodes, mode) -> None:
        os.makedirs(self.config.log_dir, exist_ok=True)
        rank = trainer.accelerator.process_index
        path = os.path.join(
            self.config.log_dir, f"{mode}_step{trainer.state.global_step:06d}_batch{self._batches:05d}_rank{rank}.jsonl"
        )
        self._batches += 1
        with open(path, "w") as f:
            for e in episodes:
                f.write(json.dumps(e.record(self.config), default=str) + "\n")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


# --------------------------------------------------------------------------------------------------------------------
# Generation backends
# --------------------------------------------------------------------------------------------------------------------


class _NoProgress:
    def update(self, n=1):
        pass

    def close(self):
        pass


class ModelGenerator:
    """Batched next-answer generation with a Hugging Face causal LM (`model.generate`), outside any trainer: for
    evaluation and tests. Use it as a context manager around a rollout.

    Args:
        model: a causal LM with `generate`.
        tokenizer: its tokenizer (pad and eos tokens set).
        generation_config: a `transformers.GenerationConfig`; by default sampling at `temperature`.
        max_completion_length: the default completion-token budget of an episode.
        reuse_kv_cache: keep the KV cache of the last call and, when every new context extends one of its rows (the
            full-context conversation: context + kept answer + observation), feed only the new tokens (see
            `_CacheState`). Off, or when the contexts do not extend the last ones (windowed prompts, a new wave),
            every call encodes its contexts from scratch.
    """

    returns_logprobs = False
    reuse_kv_cache = True
    tokens_fed = 0  # context tokens the last call fed to the model (the new tokens only, when the cache was reused)
    _cache_state = None

    def __init__(self, model, tokenizer, generation_config=None, temperature: float = 1.0,
                 max_completion_length: int = 4096, progress_bar: bool = True, reuse_kv_cache: bool = True):
        from transformers import GenerationConfig

        self.model = model
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if tokenizer.eos_token_id not in eos:
            eos = [tokenizer.eos_token_id, *eos]
        self.eos_token_ids = eos
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        self.generation_config = generation_config or GenerationConfig(
            do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
            eos_token_id=eos, pad_token_id=self.pad_token_id,
        )
        self.default_budget = max_completion_length
        self.show_progress = progress_bar
        self.reuse_kv_cache = reuse_kv_cache
        self._model = None
        self._stack = None

    @property
    def device(self):
        return next(self.model.parameters()).device

    def __enter__(self):
        import contextlib

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(torch.no_grad())
        self._model = self.model
        return self

    def __exit__(self, *exc):
        self._cache_state = None  # the weights change before the next rollout
        stack, self._stack, self._model = self._stack, None, None
        if stack is not None:
            stack.close()

    def is_main_process(self) -> bool:
        return True

    def progress(self, total: int, enabled: bool):
        if not (enabled and self.show_progress and self.is_main_process()):
            return _NoProgress()
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="rollout turns", leave=False)

    def any_live_anywhere(self, local_live: bool) -> bool:
        return local_live

    @property
    def synced(self) -> bool:
        return False

    def generate(self, contexts: list[list[int]], limits: list[int]) -> list[tuple[list[int], list[float] | None]]:
        """One batched call: the next answer (token ids, cut at the first end-of-turn token and at its limit) for
        every context."""
        from trl.trainer.utils import pad

        if self._model is None:
            raise RuntimeError("Use the generator as a context manager around the rollout (`with generator:`).")
        dummy = not contexts  # keep collectives aligned when this process has nothing left to generate
        if dummy:
            self._cache_state = None
            if not self.synced:
                return []
            contexts, limits = [[self.pad_token_id]], [1]
        generation_config = copy.deepcopy(self.generation_config)
        generation_config.max_new_tokens = max(limits)
        keep_cache = not dummy and self.reuse_kv_cache and _cache_reuse_is_exact(generation_config)
        state, self._cache_state = self._cache_state, None  # a stale cache is freed before this call allocates
        reuse = state.extend(contexts, self.pad_token_id, self.device) if keep_cache and state is not None else None
        if reuse is not None:
            input_ids, attention_mask, cache, self.tokens_fed = reuse
        else:
            tensors = [torch.tensor(ids) for ids in contexts]
            input_ids = pad(tensors, padding_value=self.pad_token_id, padding_side="left").to(self.device)
            attention_mask = pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side="left")
            attention_mask, cache, self.tokens_fed = attention_mask.to(self.device), None, sum(map(len, contexts))
        del state
        if keep_cache:
            generation_config.return_dict_in_generate = True
        output = self._model.generate(
            input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
            generation_config=generation_config,
        )
        sequences = output.sequences if hasattr(output, "sequences") else output
        if dummy:
            self.tokens_fed = 0
            return []
        results = []
        for ids, limit in zip(sequences[:, input_ids.size(1) :].tolist(), limits):
            cut = ids[:limit]
            for i, token in enumerate(cut):
                if token in self.eos_token_ids:
                    cut = cut[: i + 1]
                    break
            results.append((cut, None))
        if keep_cache:
            self._cache_state = _CacheState.build(
                output.past_key_values, sequences, attention_mask, contexts, [ids for ids, _ in results]
            )
        return results


def _cache_reuse_is_exact(generation_config) -> bool:
    """Whether continuing from a cache with masked holes samples exactly like encoding the contexts afresh: no logits
    processor may look at the raw `input_ids` (which then contain the holes' tokens), and the cache must be the
    default dynamic one."""
    get = lambda name: getattr(generation_config, name, None)  # noqa: E731  (fields come and go across versions)
    return (
        get("use_cache") is not False
        and get("cache_implementation") in (None, "dynamic")
        and get("repetition_penalty") in (None, 1.0)
        and get("encoder_repetition_penalty") in (None, 1.0)
        and not get("no_repeat_ngram_size")
        and get("bad_words_ids") is None
        and get("sequence_bias") is None
        and (get("num_beams") or 1) == 1
        and (get("num_return_sequences") or 1) == 1
        and get("prompt_lookup_num_tokens") is None
        and get("penalty_alpha") is None
        and get("dola_layers") is None
        and not get("min_length")  # an absolute length would count the holes (min_new_tokens is fine)
        and get("watermarking_config") is None
    )


class _CacheState:
    """The KV cache of the last batched `generate` call and the row layout it was computed on, so that the next
    turn of a full-context conversation feeds only its new tokens instead of re-encoding the whole conversation.

    Row r of the last call holds `[left padding][context_r][generated_r]`; the episode kept `answer_r`, a prefix of
    `generated_r` (cut at its end-of-turn token or its limit). Its next context is `context_r + answer_r + suffix`
    (observation and the next generation prompt). The next call's row is the old row followed by the left-padded
    suffix, with attention mask 0 on every position the fresh encoding would not contain (the padding, the generated
    tokens after `answer_r`, the suffix padding): position ids come from the mask (HF `generate` takes them from its
    cumulative sum), so each real token sees the same tokens at the same positions as when encoded afresh; the
    logits agree to float rounding (tested). Only plain `DynamicCache` layers qualify: a sliding window or a
    recurrent layer would count the holes.
    """

    def __init__(self, cache, rows: list[list[int]], masks: list[list[int]], prefixes: list[list[int]]):
        self.cache, self.rows, self.masks, self.prefixes = cache, rows, masks, prefixes

    @classmethod
    def build(cls, cache, sequences, attention_mask, contexts, answers) -> _CacheState | None:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        width = sequences.size(1)
        if not (isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)):
            return None
        if cache.get_seq_length() != width - 1:  # the last sampled token is never fed: the cache holds the rest
            return None
        rows = sequences.tolist()
        input_width = attention_mask.size(1)
        masks = []
        for mask, answer in zip(attention_mask.tolist(), answers):
            masks.append(mask + [1] * len(answer) + [0] * (width - input_width - len(answer)))
        return cls(cache, rows, masks, [list(c) + list(a) for c, a in zip(contexts, answers)])

    def extend(self, contexts, pad_token_id: int, device):
        """Inputs that continue this cache for `contexts` (input ids, attention mask, cache, new tokens fed), or None
        when some context does not extend a row of the last call (in order: rows of finished episodes drop out), or
        when the holes would outweigh the tokens (re-encoding then compacts the rows)."""
        matched, j = [], 0
        for context in contexts:
            while j < len(self.prefixes) and not (
                len(context) > len(self.prefixes[j]) and context[: len(self.prefixes[j])] == self.prefixes[j]
            ):
                j += 1
            if j == len(self.prefixes):
                return None
            matched.append(j)
            j += 1
        suffixes = [context[len(self.prefixes[r]) :] for context, r in zip(contexts, matched)]
        width = len(self.rows[0]) + max(map(len, suffixes))
        if width > 2 * max(map(len, contexts)):
            return None
        if matched != list(range(len(self.rows))):
            self.cache.batch_select_indices(torch.tensor(matched, device=device))
        input_ids, attention_mask = [], []
        for r, suffix in zip(matched, suffixes):
            fill = width - len(self.rows[r]) - len(suffix)
            input_ids.append(self.rows[r] + [pad_token_id] * fill + suffix)
            attention_mask.append(self.masks[r] + [0] * fill + [1] * len(suffix))
        fed = sum(len(suffix) + 1 for suffix in suffixes)  # + the last token of each old row, never fed before
        as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long, device=device)  # noqa: E731
        return as_tensor(input_ids), as_tensor(attention_mask), self.cache, fed


class TrainerGenerator(ModelGenerator):
    """Generation with a trainer's policy: HF `generate` under TRL's `unwrap_model_for_generation` (entered once
    per rollout: under DeepSpeed ZeRO-3 the weights are gathered once per rollout, not once per turn), or TRL's vLLM
    backend when `use_vllm=True` (weights synced once per rollout). Across processes, every process makes the same
    number of generate calls, so collective backends (vLLM server, ZeRO-3 without gathering) never deadlock."""

    def __init__(self, trainer, config: RolloutConfig):
        self.trainer = trainer
        self.config = config
        self.model = trainer.model
        self.eos_token_ids = list(trainer.eos_token_ids)
        self.pad_token_id = trainer.processing_class.pad_token_id
        self.generation_config = trainer.generation_config
        self.returns_logprobs = bool(trainer.use_vllm)
        self.default_budget = trainer.max_completion_length
        self.show_progress = True
        self.reuse_kv_cache = config.reuse_kv_cache
        self._model = None
        self._stack = None

    @property
    def device(self):
        return self.trainer.accelerator.device

    @property
    def synced(self) -> bool:
        return self.trainer.accelerator.num_processes > 1

    def is_main_process(self) -> bool:
        return self.trainer.accelerator.is_main_process

    def any_live_anywhere(self, local_live: bool) -> bool:
        if not self.synced:
            return local_live
        flag = torch.tensor([1.0 if local_live else 0.0], device=self.device)
        return bool(self.trainer.accelerator.reduce(flag, reduction="sum").item() > 0)

    def __enter__(self):
        import contextlib

        from trl.models import unwrap_model_for_generation

        trainer = self.trainer
        self._stack = contextlib.ExitStack()
        if trainer.use_vllm:
            if trainer.state.global_step != trainer._last_loaded_step:
                trainer.vllm_generation.sync_weights()
                trainer._last_loaded_step = trainer.state.global_step
            return self
        self._model = self._stack.enter_context(
            unwrap_model_for_generation(
                trainer.model_wrapped,
                trainer.accelerator,
                gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
                generation_kwargs=trainer.generation_kwargs,
                gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
            )
        )
        self._stack.enter_context(torch.no_grad())
        self._stack.enter_context(trainer._dist.summon_full_params(trainer.model_wrapped, recurse=False))
        return self

    def generate(self, contexts, limits):
        if self.trainer.use_vllm:
            return self._generate_vllm(contexts, limits)
        return super().generate(contexts, limits)

    def _generate_vllm(self, contexts, limits):
        backend = self.trainer.vllm_generation
        self.tokens_fed = sum(map(len, contexts))  # what vLLM's prefix cache spares is not visible here
        saved = backend.max_completion_length
        backend.max_completion_length = max(limits) if limits else 1
        try:
            _, completion_ids, logprobs, _ = backend.generate(prompts=contexts, images=None, num_generations=1)
        finally:
            backend.max_completion_length = saved
        results = []
        for ids, lps, limit in zip(completion_ids, logprobs or [None] * len(contexts), limits):
            ids = list(ids)[:limit]
            token_logprobs = [lp[0] for lp in lps][: len(ids)] if lps is not None else [math.nan] * len(ids)
            results.append((ids, token_logprobs))
        return results
