"""Expert demonstrations -> SFT data: ALFWorld games played with their walkthrough (or the expert planner's plan),
laid out exactly as the rollout lays out its prompts (`trl_epo.envs.prompting.expert_turns`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..base import StepResult, TaskSpec
from ..prompting import PromptStyle, expert_turns
from .env import DEFAULT_MAX_TURNS, AlfWorldEnv
from .planner import ExpertError


def expert_episode(env: AlfWorldEnv, task: TaskSpec | Mapping[str, Any]) -> list[tuple[StepResult, str]]:
    """Play a game with its walkthrough (or the expert's plan): ``[(observation result, action taken), ...]`` and the
    final result last as ``(result, "")``. Raises `ExpertError` when the plan does not win through the engine."""
    result = env.reset(task)
    actions = env.expert_actions()
    steps = []
    for action in actions:
        steps.append((result, action))
        result = env.step(action)
        if result.info.get("invalid_action"):
            raise ExpertError(f"{env.game_path(TaskSpec.from_row(task))}: expert action {action!r} was not accepted.")
        if result.done:
            break
    steps.append((result, ""))
    if not result.won:
        raise ExpertError(
            f"{env.game_path(TaskSpec.from_row(task))}: the expert's {len(actions)} actions did not win."
        )
    return steps


def expert_sft_dataset(
    tasks: Sequence[TaskSpec | Mapping[str, Any]] | Any,
    data_root=None,
    history: int | None = None,
    prompt_style: PromptStyle | None = None,
    max_turns: int = DEFAULT_MAX_TURNS,
    skip_failures: bool = False,
):
    """A chat-format SFT dataset of expert demonstrations, one row per expert turn, in TRL's conversational
    prompt-completion format (only the completion is trained on)::

        {"prompt": [system, user, assistant, user, ...],
         "completion": [{"role": "assistant", "content": "<action>go to drawer 1</action>"}], ...}

    Prompts are laid out exactly as `MultiTurnRollout` lays them out (`PromptStyle`), so that a model fine-tuned on
    them starts RL from familiar contexts:

    * ``history=None`` (the rollout's default, full context): the whole conversation so far: the system instruction,
      the first user message (task, observation, admissible actions), then every expert answer and the observation
      that followed it;
    * ``history=k`` (the rollout's ``history_turns=k``, the paper's windowed prompts): the system instruction and one
      user message with the task, the last k (observation, action) pairs and the current observation.

    Args:
        tasks: task specs / rows, or a `datasets.Dataset` from `make_dataset`.
        data_root: the data root the tasks' paths are relative to.
        skip_failures: leave out games the expert cannot win (else raise `ExpertError`).
    """
    from datasets import Dataset

    style = prompt_style or PromptStyle()
    env = AlfWorldEnv(data_root=data_root, max_turns=max_turns)
    columns: dict[str, list] = {"prompt": [], "completion": [], "task": [], "task_type": [], "turn": []}
    try:
        for task in tasks:
            spec = TaskSpec.from_row(task)
            try:
                steps = expert_episode(env, spec)
            except ExpertError:
                if skip_failures:
                    continue
                raise
            first, _ = steps[0]
            description = first.info.get("task_description", "")
            for turn, (prompt, answer) in enumerate(expert_turns(style, description, steps[:-1], history)):
                columns["prompt"].append(prompt)
                columns["completion"].append([answer])
                columns["task"].append(spec.task)
                columns["task_type"].append(first.info.get("task_type") or "")
                columns["turn"].append(turn)
    finally:
        env.close()
    return Dataset.from_dict(columns)
