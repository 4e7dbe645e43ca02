"""Answers of tool-calling environments: the model's tool calls, parsed the way the tokenizer's chat template
defines them (TRL's `parse_response` over transformers' response parsing), and the windowed prompts of such envs.

The action a tool-calling env receives is the parsed assistant message as JSON (``{"content": ..., "tool_calls":
[{"type": "function", "function": {"name": ..., "arguments": {...}}}]}``): arguments are typed by the tools' JSON
schemas (``"7"`` becomes ``7`` for an integer parameter). An answer without a (well-formed) tool call is a final
answer, as in TRL's tool loop. Model text stays data: it is parsed as JSON by the chat template's parser, never run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..envs.prompting import Message


class ToolCallReader:
    """Reads answers as tool calls with `tokenizer`'s response parser (set by TRL's `add_response_schema` for the
    chat templates TRL knows, when the tokenizer has none)."""

    def __init__(self, tokenizer, tools: Sequence[dict[str, Any]] | None):
        from trl.chat_template_utils import add_response_schema, parse_response, supports_tool_calling

        if not supports_tool_calling(tokenizer):
            raise ValueError(
                "A tool-calling environment needs a chat template that renders tool calls and tool results "
                "(user -> assistant with tool_calls -> tool); this tokenizer's does not. Use a model whose template "
                "supports tools (e.g. Qwen2.5/Qwen3, Llama 3.1) or set `tokenizer.chat_template` to one."
            )
        if (
            getattr(tokenizer, "response_template", None) is None
            and getattr(tokenizer, "response_schema", None) is None
        ):
            add_response_schema(tokenizer)  # as TRL's GRPOTrainer does for `tools=` / `environment_factory=`
        self.tokenizer = tokenizer
        self.tools = list(tools or [])
        self._parse = parse_response

    def read(self, ids: Sequence[int], context: Sequence[int]) -> tuple[Message, str]:
        """The answer `ids` (generated after `context`) as an assistant message and the env's action (JSON)."""
        message = self._parse(self.tokenizer, list(ids), prefix=list(context), tools=self.tools or None)
        message = {"role": "assistant", "content": message.get("content") or "", **_calls_of(message)}
        return message, json.dumps({"content": message["content"], "tool_calls": message.get("tool_calls", [])})


def _calls_of(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    return {"tool_calls": calls} if calls else {}


def tool_window(messages: Sequence[Message], history_turns: int | None) -> list[Message]:
    """A windowed prompt of a tool-calling episode: the env's first prompt (every message before the first answer)
    and the last `history_turns` exchanges (an answer and the tool results that followed it; at least the last)."""
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not answers:
        return list(messages)
    keep = max(int(history_turns or 0), 1)
    start = answers[-keep] if len(answers) >= keep else answers[0]
    return list(messages[: answers[0]]) + list(messages[start:])
