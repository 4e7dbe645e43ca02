"""Expert data from ScienceWorld's gold paths: the simulator's gold action sequences replayed through
`ScienceWorldEnv`, turned into chat-format SFT data laid out exactly as the rollout lays out its prompts (the layout
itself is `trl_epo.envs.prompting`'s `expert_conversation` / `expert_turns`)."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..base import StepResult, TaskSpec
from ..pool import EnvPool
from ..prompting import PromptStyle, expert_conversation, expert_turns
from ..registry import get_env
from .env import ScienceWorldEnv
from .tasks import DEFAULT_SIMPLIFICATION, ENV_NAME, make_tasks


SFT_FORMATS = ("prompt_completion", "messages")


@dataclass
class GoldEpisode:
    """A gold action sequence replayed through `ScienceWorldEnv`: what the agent saw and did at every turn."""

    task: TaskSpec
    task_description: str
    first: StepResult
    actions: list[str]
    results: list[StepResult]

    @property
    def won(self) -> bool:
        return bool(self.results) and self.results[-1].won

    def steps(self) -> list[tuple[StepResult, str]]:
        """``[(result shown before the action, action), ...]``: what the agent saw before each gold action."""
        return list(zip([self.first, *self.results], self.actions))

    def messages(self, prompt_style: PromptStyle | None = None) -> list[dict[str, str]]:
        """The episode as the full-context rollout shows it to the policy: [system], the first user message (task and
        first observation), then alternating assistant answers (``<action>...</action>``) and user observations. It
        ends with the assistant's last answer."""
        return expert_conversation(prompt_style or _default_style(), self.task_description, self.steps())

    def windowed_turns(
        self, history: int, prompt_style: PromptStyle | None = None
    ) -> list[tuple[list[dict[str, str]], dict[str, str]]]:
        """The episode as the windowed rollout (``history_turns=history``, the paper's layout) shows it: for every
        turn, ``(prompt, answer)`` with prompt = [system, one user message with the task, the last `history`
        (observation, action) pairs and the current observation]."""
        if history < 0:
            raise ValueError(f"history must be >= 0 (or use messages() for the full context), got {history}.")
        return expert_turns(prompt_style or _default_style(), self.task_description, self.steps(), history)


def _default_style() -> PromptStyle:
    """ScienceWorld's prompt style as its registry entry sets it (its own instruction)."""
    return get_env(ENV_NAME).prompt_style()


def _play_gold(reset: StepResult, step_fn) -> tuple[list[str], list[StepResult]]:
    actions, results = [], []
    for action in reset.info.get("gold_actions", []):
        result = step_fn(action)
        if result.env_error is not None:
            break
        actions.append(action)
        results.append(result)
        if result.done:
            break
    return actions, results


def gold_episodes(
    tasks: Sequence[TaskSpec | Mapping[str, Any]],
    env_kwargs: Mapping[str, Any] | None = None,
    num_workers: int = 1,
    keep_unsolved: bool = False,
) -> list[GoldEpisode]:
    """Replay the simulator's gold action sequence of each task through `ScienceWorldEnv(**env_kwargs)`.

    The env's own move limit applies (`env_kwargs["max_turns"]`, default 30): a gold path longer than that ends
    unsolved, and unsolved episodes are dropped unless `keep_unsolved`. With `num_workers > 1` the tasks are played
    in parallel, one JVM per worker (`EnvPool`, process backend). Gold-path generation takes 0.1-10 s per task.
    """
    specs = [TaskSpec.from_row(t) for t in tasks]
    kwargs = dict(env_kwargs or {})
    kwargs["with_gold_path"] = True
    episodes: list[GoldEpisode] = []

    def collect(spec, first, actions, results):
        if first.env_error is not None:
            raise RuntimeError(f"ScienceWorld failed on {spec.task} variation {spec.variation}: {first.env_error}")
        episode = GoldEpisode(spec, first.info.get("task_description", ""), first, actions, results)
        if episode.won or (keep_unsolved and actions):
            episodes.append(episode)

    if num_workers <= 1:
        env = ScienceWorldEnv(**kwargs)
        try:
            for spec in specs:
                first = env.reset(spec)
                collect(spec, first, *_play_gold(first, env.step))
        finally:
            env.close()
        return episodes

    with EnvPool(
        functools.partial(ScienceWorldEnv, **kwargs), size=num_workers, backend="process", reset_timeout=300.0
    ) as pool:
        for start in range(0, len(specs), num_workers):
            wave = specs[start : start + num_workers]
            firsts = pool.reset(list(enumerate(wave)))
            plans = [list(f.info.get("gold_actions", [])) if f.env_error is None else [] for f in firsts]
            played: list[tuple[list[str], list[StepResult]]] = [([], []) for _ in wave]
            live = [slot for slot, plan in enumerate(plans) if plan]
            turn = 0
            while live:
                results = pool.step([(slot, plans[slot][turn]) for slot in live])
                still = []
                for slot, result in zip(live, results):
                    if result.env_error is not None:
                        continue
                    played[slot][0].append(plans[slot][turn])
                    played[slot][1].append(result)
                    if not result.done and turn + 1 < len(plans[slot]):
                        still.append(slot)
                live, turn = still, turn + 1
            for slot, spec in enumerate(wave):
                collect(spec, firsts[slot], *played[slot])
    return episodes


def expert_sft_dataset(
    split: str = "train",
    num_tasks: int | None = 64,
    seed: int = 0,
    simplification: str = DEFAULT_SIMPLIFICATION,
    task_types: Sequence[str] | None = None,
    balanced: bool = True,
    format: str = "prompt_completion",
    prompt_style: PromptStyle | None = None,
    env_kwargs: Mapping[str, Any] | None = None,
    num_workers: int = 1,
    keep_unsolved: bool = False,
    tasks: Sequence[TaskSpec | Mapping[str, Any]] | None = None,
    history: int | None = None,
):
    """A chat-format SFT `datasets.Dataset` from ScienceWorld gold paths, in the rollout's message format.

    Each gold episode (see `gold_episodes`) becomes, with ``format="prompt_completion"`` (default), one row per turn:
    ``prompt`` = the conversation so far (system instruction, task and observations, earlier answers) and
    ``completion`` = the expert's answer ``[{"role": "assistant", "content": "<action>...</action>"}]`` (TRL's
    SFTTrainer trains on the completion only). With ``format="messages"``, one row per episode with the whole
    conversation in ``messages`` (train on assistant turns only with ``assistant_only_loss=True`` and a chat template
    that marks them). Every row also carries the task columns (`task`, `variation`, `turn`, `won`).

    `history=None` lays prompts out like the rollout's default full-context conversation; `history=k` like its
    windowed prompts (``env_history_turns=k``, the paper's layout: the task, the last k (observation, action) pairs
    and the current observation in one user message; prompt/completion rows only).

    The tasks are drawn with `make_tasks(split, num_tasks, seed, simplification, task_types, balanced)`, or given
    explicitly as `tasks` (TaskSpecs or dataset rows). Use the same `prompt_style` and `env_kwargs` (observation
    settings, `max_turns`) as the RL run that follows.
    """
    from datasets import Dataset

    if format not in SFT_FORMATS:
        raise ValueError(f"format must be one of {SFT_FORMATS}, got {format!r}.")
    if history is not None and format == "messages":
        raise ValueError("Windowed prompts (history=k) give one prompt per turn: use format='prompt_completion'.")
    if tasks is None:
        tasks = make_tasks(
            split,
            num_tasks=num_tasks,
            seed=seed,
            simplification=simplification,
            task_types=task_types,
            balanced=balanced,
        )
    episodes = gold_episodes(tasks, env_kwargs=env_kwargs, num_workers=num_workers, keep_unsolved=keep_unsolved)
    if not episodes:
        raise ValueError(
            f"No gold episode of the {len(tasks)} drawn tasks finished within the move limit "
            f"({(env_kwargs or {}).get('max_turns', 30)} turns); draw more tasks, pick task types with short gold paths "
            "or raise env_kwargs['max_turns']."
        )
    columns: dict[str, list] = {"task": [], "variation": [], "turn": [], "won": []}
    if format == "messages":
        columns["messages"] = []
    else:
        columns["prompt"], columns["completion"] = [], []
    for episode in episodes:
        messages = episode.messages(prompt_style)
        if format == "messages":
            rows = [(len(episode.actions), {"messages": messages})]
        elif history is not None:
            rows = [
                (turn, {"prompt": prompt, "completion": [answer]})
                for turn, (prompt, answer) in enumerate(episode.windowed_turns(history, prompt_style))
            ]
        else:
            answer_positions = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            rows = [
                (turn, {"prompt": messages[:i], "completion": [messages[i]]})
                for turn, i in enumerate(answer_positions)
            ]
        for turn, row in rows:
            columns["task"].append(episode.task.task)
            columns["variation"].append(episode.task.variation)
            columns["turn"].append(turn)
            columns["won"].append(episode.won)
            for key, value in row.items():
                columns[key].append(value)
    return Dataset.from_dict(columns)


def to_prompt_completion(dataset):
    """Turn a ``format="messages"`` expert dataset (one row per episode) into one row per turn: ``prompt`` = the
    conversation before an answer, ``completion`` = that answer (other columns are kept; `turn` is the answer's
    index)."""
    from datasets import Dataset

    if "messages" not in dataset.column_names:
        raise ValueError("to_prompt_completion needs a dataset with a `messages` column (format='messages').")
    extra = [c for c in dataset.column_names if c not in ("messages", "turn")]
    columns: dict[str, list] = {name: [] for name in (*extra, "turn", "prompt", "completion")}
    for row in dataset:
        messages = row["messages"]
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for turn, i in enumerate(answers):
            for name in extra:
                columns[name].append(row[name])
            columns["turn"].append(turn)
            columns["prompt"].append(messages[:i])
            columns["completion"].append([messages[i]])
    return Dataset.from_dict(columns)


# A ChatML chat template that renders exactly like plain ChatML but marks the assistant turns with
# {% generation %}, so TRL's SFTTrainer can train on every assistant turn of a whole episode in one sequence
