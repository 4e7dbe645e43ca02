"""The one owner of the agent's prompt text: what the model reads every turn, in training, evaluation and SFT data.

Every prompt the project renders comes from a `PromptStyle`: the rollout (first prompt, observations, windowed
prompts, the invalid-answer notice), evaluation (`trl_epo.evaluation`, which rebuilds the style a run was trained with
from its `epo_run.json`) and the expert SFT data of every environment (`expert_conversation`, `expert_turns`). A
change to the prompt is a change to this file (plus, for an environment's own defaults, its registry entry).

Text only: turning messages into token ids is the rollout's job (`trl_epo.rollout.chat`), which treats every message
content as data, never as special tokens. Standard library only: env worker processes import this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from .base import ActionFormat, StepResult


DEFAULT_INSTRUCTION = (
    "You are an agent acting in a text environment. Each turn, think briefly about what to do, then give exactly "
    "one action inside {example}. Prefer actions from the list of available actions when one is given."
)
INVALID_ACTION_OBSERVATION = "Invalid answer: no action found. Answer with exactly one action inside {example}."
DEFAULT_MAX_OBSERVATION_CHARS = 4000
INVALID_HISTORY_ACTION = "(invalid answer)"  # what a windowed prompt shows for a turn whose answer had no action

Message = dict[str, str]


@dataclass(frozen=True)
class PromptStyle:
    """How the agent is prompted (one value, recorded in `epo_run.json` so evaluation shows a model what it was
    trained on).

    Attributes:
        instruction: the system-level instruction (`{example}` is replaced with an example action).
        action_tag: the agent answers inside `<action_tag>...</action_tag>` (see `ActionFormat`).
        use_system_message: put the instruction in a system message (else at the top of the first user message).
        show_admissible_actions: list the env's admissible actions each turn, when the env gives them.
        max_admissible_actions: cap on the number of listed actions (long lists are cut, with a note).
        max_observation_chars: observations longer than this are cut (with a note), to bound the context.
        tool_calls: the agent acts by calling tools the way the tokenizer's chat template defines tool calls (the
            tool schemas reach every prompt through the chat template's `tools=`), not with `<action_tag>`: the
            whole answer is the action, the env gives the first prompt and answers with tool messages (a TRL
            environment class, `trl_epo.envs.trl_tools`).
    """

    instruction: str = DEFAULT_INSTRUCTION
    action_tag: str = "action"
    use_system_message: bool = True
    show_admissible_actions: bool = True
    max_admissible_actions: int = 50
    max_observation_chars: int = DEFAULT_MAX_OBSERVATION_CHARS
    tool_calls: bool = False

    def __post_init__(self):
        ActionFormat(self.action_tag)  # validates the tag
        if self.max_observation_chars < 1:
            raise ValueError(f"max_observation_chars must be >= 1, got {self.max_observation_chars}.")
        if self.max_admissible_actions < 0:
            raise ValueError(f"max_admissible_actions must be >= 0, got {self.max_admissible_actions}.")

    # ---- serialisation (epo_run.json)
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PromptStyle:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    # ---- pieces
    @property
    def action_format(self) -> ActionFormat:
        return ActionFormat(self.action_tag)

    def system_messages(self) -> list[Message]:
        """[the system message] or [] when the instruction goes into the first user message."""
        if not self.use_system_message:
            return []
        return [{"role": "system", "content": self.instruction.format(example=self.action_format.example())}]

    def observation_text(self, result: StepResult) -> str:
        """An env result as the agent reads it: the (possibly cut) observation and the admissible actions."""
        text = (result.observation or "").strip()
        if len(text) > self.max_observation_chars:
            text = text[: self.max_observation_chars] + " [...]"
        parts = [f"Observation: {text}" if text else "Observation: (nothing)"]
        actions = result.admissible_actions
        if self.show_admissible_actions and actions:
            shown = [a for a in actions if a.strip().lower() != "help"]
            more = len(shown) - self.max_admissible_actions
            shown = shown[: self.max_admissible_actions]
            listing = ", ".join(shown) + (f", ... ({more} more)" if more > 0 else "")
            parts.append(f"Available actions: {listing}")
        return "\n".join(parts)

    def invalid_text(self) -> str:
        """The observation an agent gets after an answer without a parsable action (the env is not stepped)."""
        return INVALID_ACTION_OBSERVATION.format(example=self.action_format.example())

    def answer_message(self, action: str) -> Message:
        """An expert's answer as the agent should write it (for SFT data)."""
        return {"role": "assistant", "content": self.action_format.example(action)}

    def user_content(self, task_description: str, history: Sequence[tuple[str, str]], current: str) -> str:
        """The user message of a prompt: the task, the last (observation, action) pairs (windowed prompts only) and
        the current observation text (already rendered by `observation_text`)."""
        parts = []
        if not self.use_system_message:
            parts.append(self.instruction.format(example=self.action_format.example()))
        if task_description:
            parts.append(f"Task: {task_description.strip()}")
        if history:
            lines = [f"Your last {len(history)} step(s):"]
            for observation, action in history:
                lines.append(observation)
                lines.append(f"Your action: {action}")
            parts.append("\n".join(lines))
        parts.append(current)
        return "\n\n".join(parts)

    # ---- whole prompts
    def first_messages(self, task_description: str, result: StepResult) -> list[Message]:
        """The first prompt of an episode: [system], user(task + first observation)."""
        return self.window_messages(task_description, [], self.observation_text(result))

    def window_messages(
        self, task_description: str, history: Sequence[tuple[str, str]], current: str
    ) -> list[Message]:
        """A fresh windowed prompt (`history_turns=k`): [system], user(task + last k pairs + current observation)."""
        return self.system_messages() + [
            {"role": "user", "content": self.user_content(task_description, history, current)}
        ]

    def observation_message(self, result_or_text: StepResult | str) -> Message:
        """The user message that follows an answer in a full-context conversation."""
        text = result_or_text if isinstance(result_or_text, str) else self.observation_text(result_or_text)
        return {"role": "user", "content": text}


# --------------------------------------------------------------------------------------------------------------------
# Expert demonstrations -> SFT conversations, laid out exactly as the rollout lays out its prompts
# --------------------------------------------------------------------------------------------------------------------


def expert_conversation(
    style: PromptStyle, task_description: str, steps: Sequence[tuple[StepResult, str]]
) -> list[Message]:
    """A whole expert episode as the full-context rollout shows it: [system], the first user message, then
    alternating expert answers and the observations that followed them; it ends with the last answer.

    ``steps`` is ``[(result shown before the action, action), ...]``: the first entry's result is the reset result.
    """
    if not steps:
        raise ValueError("An expert episode needs at least one (observation, action) step.")
    messages = style.first_messages(task_description, steps[0][0])
    for turn, (result, action) in enumerate(steps):
        if turn > 0:
            messages.append(style.observation_message(result))
        messages.append(style.answer_message(action))
    return messages


def expert_turns(
    style: PromptStyle, task_description: str, steps: Sequence[tuple[StepResult, str]], history: int | None
) -> list[tuple[list[Message], Message]]:
    """One ``(prompt, answer)`` pair per expert turn, each prompt exactly what the rollout shows before that turn:
    ``history=None`` the conversation so far (full context), ``history=k`` a windowed prompt with the last k
    (observation, action) pairs (the paper's layout, `env_history_turns=k`)."""
    if history is not None and history < 0:
        raise ValueError(f"history must be None (full context) or >= 0, got {history}.")
    conversation = expert_conversation(style, task_description, steps) if history is None else []
    answers = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
    shown: list[tuple[str, str]] = []
    turns = []
    for turn, (result, action) in enumerate(steps):
        if history is None:
            prompt = conversation[: answers[turn]]
        else:
            text = style.observation_text(result)
            prompt = style.window_messages(task_description, shown[-history:] if history else [], text)
            shown.append((text, action))
        turns.append((prompt, style.answer_message(action)))
    return turns
