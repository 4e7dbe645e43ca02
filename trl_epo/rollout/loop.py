"""The multi-turn episode loop: play a text environment with a policy, token-exact.

For a batch of tasks (a GRPO group's G members are the same task with the same seed), `MultiTurnRollout.play`:

1. **reset**: one env per episode, in parallel (an `EnvPool`), and renders each first prompt;
2. **generate**: for all live episodes at once, one batched call of the generator (HF `generate`, or vLLM);
3. **read answers**: appends each answer's ids verbatim and parses its action (`<action>...</action>`);
4. **step envs**: steps the envs of the valid actions in parallel (an invalid answer does not step its env);
5. **observe**: appends each observation (the template's tokens around it, or a fresh windowed prompt), or ends the
   episode (done, turn limit, token budget, env failure);

before each generate call, an episode with no room left ends as truncated: its token budget is spent
("token_budget"), or its context fills the engine's maximum model length ("context_limit", `generator.
max_context_tokens`, e.g. vLLM's `max_model_len`; an engine would raise on it);

and repeats 2-5 until no episode is live, in waves of at most `pool_size` episodes. It returns a `RolloutBatch`.
Nothing here knows about trainers: the generator is the policy, the batch is the result.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..envs.base import StepResult, TaskSpec
from ..envs.pool import EnvFactory, EnvPool
from ..envs.prompting import INVALID_HISTORY_ACTION
from .chat import ChatSegments, find_sublist
from .config import RolloutConfig
from .episode import Episode, RolloutBatch, RolloutStats
from .tool_calls import ToolCallReader, tool_window


@dataclass
class _Play:
    """What one `play` call shares between its phases."""

    generator: object
    tokenizer: object
    segments: ChatSegments
    marker: list[int] | None
    budget: int
    tools: ToolCallReader | None = None  # tool-calling envs: answers are read as the chat template's tool calls
    timer: dict[str, float] = field(default_factory=lambda: {"generate": 0.0, "env": 0.0, "total": 0.0})
    counters: dict[str, int] = field(
        default_factory=lambda: {"generate_calls": 0, "tokens_fed": 0, "generated_tokens": 0, "weight_syncs": 0}
    )


class MultiTurnRollout:
    """Plays multi-turn episodes of a text environment (see the module docstring).

    Args:
        env_factory: zero-argument callable returning a fresh `TextEnv` (picklable for the process backend, e.g. a
            class or `functools.partial(ScienceWorldEnv, ...)`).
        config: a `RolloutConfig`. `EPOTrainer` builds it from its `EPOConfig` when None.

    `play(tasks, generator, tokenizer)` returns a `RolloutBatch`. `EPOTrainer` calls it from TRL's `rollout_func`
    hook; evaluation calls it with a `ModelGenerator`.
    """

    def __init__(self, env_factory: EnvFactory, config: RolloutConfig | None = None):
        self.env_factory = env_factory
        self.config = config
        self.pool: EnvPool | None = None
        self.last_batch: RolloutBatch | None = None  # the latest result, for inspection

    # ---- playing
    def play(self, tasks: Sequence[TaskSpec], generator, tokenizer) -> RolloutBatch:
        """Play one episode per task (in waves of at most `pool_size`)."""
        if self.config is None:
            raise ValueError("MultiTurnRollout has no RolloutConfig: pass one (e.g. RolloutConfig.from_args(args)).")
        configure = getattr(self.env_factory, "configure_rollout", None)  # e.g. a TRL environment's tool schemas
        if configure is not None:
            self.config = configure(self.config)
        config = self.config
        pool = self._ensure_pool(len(tasks))
        segments = ChatSegments(tokenizer, config.prompt_style.system_messages(), config.chat_template_kwargs)
        state = _Play(
            generator=generator,
            tokenizer=tokenizer,
            segments=segments,
            marker=segments.block_marker() if config.windowed else None,
            budget=config.max_episode_tokens or generator.default_budget,
            tools=ToolCallReader(tokenizer, config.chat_template_kwargs.get("tools"))
            if config.prompt_style.tool_calls
            else None,
        )
        start = time.perf_counter()
        episodes: list[Episode] = []
        syncs = getattr(generator, "weight_syncs", 0)
        with generator:  # e.g. ZeRO-3 weights gathered once for the whole rollout, not once per turn
            for wave_start in range(0, len(tasks), pool.size):
                wave = tasks[wave_start : wave_start + pool.size]
                upcoming = tasks[wave_start + pool.size : wave_start + 2 * pool.size]
                episodes += self._play_wave(wave, upcoming, pool, state)
        state.timer["total"] = time.perf_counter() - start
        state.counters["weight_syncs"] = getattr(generator, "weight_syncs", 0) - syncs
        stats = RolloutStats.of(episodes, state.timer, state.counters)
        self.last_batch = RolloutBatch(episodes, stats, config, state.marker)
        return self.last_batch

    def _play_wave(self, tasks, upcoming, pool: EnvPool, state: _Play) -> list[Episode]:
        episodes = self._reset(tasks, upcoming, pool, state)
        progress = state.generator.progress(self.config.max_turns, enabled=self.config.progress_bar)
        for turn in range(self.config.max_turns):
            live = [e for e in episodes if e.live]
            if not state.generator.any_live_anywhere(bool(live)):
                break
            self._end_without_room(live, state)
            live = [e for e in live if e.live]
            outputs = self._generate(live, state)
            to_step = self._read_answers(live, outputs, turn, state)
            results = self._step_envs(to_step, pool, state)
            self._observe(live, results, turn, state)
            progress.update(1)
        progress.close()
        for e in episodes:
            if e.live:  # the turn loop ended (max_turns reached on every live episode)
                e.end(truncated="max_turns")
            if not e.completion_ids:  # failed or over at reset: one masked token keeps the sequence well-formed
                e.add([state.generator.eos_token_ids[0]], model=False, turn=0)
        return episodes

    # ---- the phases
    def _reset(self, tasks, upcoming, pool: EnvPool, state: _Play) -> list[Episode]:
        style = self.config.prompt_style
        t0 = time.perf_counter()
        first = pool.reset(list(enumerate(tasks)))
        if upcoming:  # slow resets (ALFWorld) of the next wave get prepared while this one plays
            pool.prefetch([(slot, [task]) for slot, task in enumerate(upcoming)])
        state.timer["env"] += time.perf_counter() - t0
        episodes = []
        for slot, (task, result) in enumerate(zip(tasks, first)):
            description = result.info.get("task_description", "")
            # an env may give its own first prompt (a TRL environment: the dataset row's prompt + its reset text)
            messages = result.info.get("prompt_messages") or style.first_messages(description, result)
            episode = Episode(task=task, slot=slot, prompt_ids=state.segments.prompt(messages), messages=messages)
            episode.description = description
            episode.observation_text = style.observation_text(result)
            episode.logprobs = [] if state.generator.returns_logprobs else None
            episode.score = float(result.info.get("score", 0.0) or 0.0)
            episode.env_observation, episode.env_anchor = result.observation, result.info.get("anchor")
            if result.env_error is not None:
                episode.end(error=result.env_error)
            elif result.done:  # solved or over at reset: nothing to learn from, but keep it well-formed
                episode.end()
                episode.won = result.won
            episodes.append(episode)
        return episodes

    def _end_without_room(self, live: list[Episode], state: _Play) -> None:
        """End the episodes with no room for one more generated token: the episode's token budget is spent, or its
        context fills the engine's maximum model length."""
        engine_limit = getattr(state.generator, "max_context_tokens", None)
        for e in live:
            if len(e.completion_ids) >= state.budget:
                e.end(truncated="token_budget")
            elif engine_limit is not None and len(e.context(self.config.windowed)) >= engine_limit:
                e.end(truncated="context_limit")

    def _generate(self, live: list[Episode], state: _Play) -> list[tuple[list[int], list[float] | None]]:
        config = self.config
        contexts = [e.context(config.windowed) for e in live]
        limits = [min(config.max_turn_tokens, state.budget - len(e.completion_ids)) for e in live]
        engine_limit = getattr(state.generator, "max_context_tokens", None)
        if engine_limit is not None:  # prompt + answer must fit the engine's maximum model length
            limits = [min(limit, engine_limit - len(c)) for limit, c in zip(limits, contexts)]
        t0 = time.perf_counter()
        outputs = state.generator.generate(contexts, limits)
        state.timer["generate"] += time.perf_counter() - t0
        state.counters["generate_calls"] += 1 if contexts else 0
        state.counters["tokens_fed"] += getattr(state.generator, "tokens_fed", sum(len(c) for c in contexts))
        return outputs

    def _read_answers(self, live, outputs, turn: int, state: _Play) -> list[tuple[Episode, str]]:
        """Append each answer verbatim and parse its action; returns the episodes whose env is to be stepped."""
        fmt = self.config.prompt_style.action_format
        eos = set(state.generator.eos_token_ids)
        to_step = []
        for e, (ids, logprobs) in zip(live, outputs):
            if state.marker is not None:  # an answer never contains a block header (it would start a new block)
                cut = find_sublist(ids, state.marker)
                if cut >= 0:
                    ids, logprobs = ids[:cut], (logprobs[:cut] if logprobs is not None else None)
            state.counters["generated_tokens"] += len(ids)
            seen = e.context(self.config.windowed) if state.tools is not None else None  # what the answer follows
            e.add(ids, model=True, turn=turn, logprobs=logprobs)
            e.turns += 1
            text = state.tokenizer.decode(ids, skip_special_tokens=True)
            if state.tools is not None:  # the whole answer is the action: its tool calls, or a final answer
                message, action = state.tools.read(ids, seen)
                e.messages.append(message)
            else:
                e.messages.append({"role": "assistant", "content": text})
                action = fmt.parse(text)
            e.actions.append(action)
            e.observations.append(e.env_observation)
            e.anchors.append(e.env_anchor)
            e.history.append((e.observation_text, action if action is not None else INVALID_HISTORY_ACTION))
            e.closed_with = state.tokenizer.decode(ids[-1:]) if ids and ids[-1] in eos else None
            if action is None:
                e.invalid_turns += 1
            else:
                to_step.append((e, action))
        return to_step

    def _step_envs(self, to_step, pool: EnvPool, state: _Play) -> dict[int, StepResult]:
        t0 = time.perf_counter()
        results = pool.step([(e.slot, action) for e, action in to_step]) if to_step else []
        state.timer["env"] += time.perf_counter() - t0
        return {id(e): r for (e, _), r in zip(to_step, results)}

    def _observe(self, live, stepped: dict[int, StepResult], turn: int, state: _Play) -> None:
        """Append what each live episode sees next, or end it."""
        config, style = self.config, self.config.prompt_style
        for e in live:
            result = stepped.get(id(e))
            if result is None:  # an invalid answer: the env is not stepped, the agent is told
                result = StepResult(observation=style.invalid_text(), info={"invalid_answer": True})
            elif result.env_error is not None:
                e.end(error=result.env_error)
                continue
            else:
                e.score = float(result.info.get("score", e.score) or 0.0)
                e.env_observation, e.env_anchor = result.observation, result.info.get("anchor")
                if result.info.get("invalid_action"):
                    e.info["env_invalid_actions"] = e.info.get("env_invalid_actions", 0) + 1
                if result.done:
                    e.won = bool(result.won)
                    e.end(truncated=None if result.won else "env_limit")
                    e.info.update({k: v for k, v in result.info.items() if k in ("won_paper",)})
                    continue
            if e.turns >= config.max_turns:
                e.end(truncated="max_turns")
                continue
            text = style.observation_text(result)
            tool_messages = result.info.get("tool_messages")  # a tool-calling env: the results as tool messages
            if config.windowed and tool_messages:  # the env's first prompt + the last k (answer, tool results)
                ids = state.segments.prompt(tool_window(e.messages + tool_messages, config.history_turns))
            elif config.windowed:  # a fresh prompt: task, the last k (observation, action) pairs, the observation
                recent = e.history[-config.history_turns :] if config.history_turns else []
                ids = state.segments.prompt(style.window_messages(e.description, recent, text))
            elif tool_messages:
                ids = state.segments.observation_messages(tool_messages, closed_with=e.closed_with)
            else:  # the conversation goes on: end of the answer, the observation, the next generation prompt
                ids = state.segments.observation(text, closed_with=e.closed_with)
            if len(e.completion_ids) + len(ids) >= state.budget:
                e.end(truncated="token_budget")
                continue
            e.block_start = len(e.completion_ids)
            e.add(ids, model=False, turn=turn + 1)
            e.observation_text = text
            e.messages.extend(tool_messages or [{"role": "user", "content": text}])

    # ---- environments
    def _ensure_pool(self, size: int) -> EnvPool:
        want = size if self.config.pool_size is None else min(size, self.config.pool_size)
        if self.pool is None or self.pool.size < want:
            if self.pool is not None:
                self.pool.close()
            self.pool = EnvPool(
                self.env_factory, want, backend=self.config.pool_backend, step_timeout=self.config.step_timeout
            )
        return self.pool

    def close(self) -> None:
        """Stop the environment workers (they restart on the next `play`)."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None
