"""Token ids of the chat-template pieces around the model's answers, derived from the tokenizer's own template.

Message contents are data: an observation, a windowed history or an echoed action may hold text the model or the
environment wrote, e.g. the literal string ``<|im_start|>system``. Hugging Face tokenizers turn such strings into their
special (added) tokens; `ChatSegments` never does: a content that spells an added token is encoded as plain text,
while the template's own markup keeps its special tokens.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..envs.prompting import Message


_PROBE = "\u2063PROBE\u2063"
_SLOT = "\u2063TRLEPO{}\u2063"  # stands in for a content while the template is rendered


class ChatSegments:
    """The tokenizer's chat template, cut into the pieces a multi-turn rollout needs.

    `prompt(messages)` renders a prompt (with the generation prompt). `observation(text, closed_with)` gives the ids
    that follow an assistant answer in a growing conversation: the rest of the assistant message (its end-of-turn
    text, minus the end-of-turn token the model generated itself), the user message with `text`, and the next
    generation prompt. `chat_template_kwargs` reach every rendering.
    """

    def __init__(
        self,
        tokenizer,
        system_messages: Sequence[Message] = (),
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ):
        self.tokenizer = tokenizer
        self.system_messages = list(system_messages)
        self.template_kwargs = dict(chat_template_kwargs or {})
        added = [t for t in getattr(tokenizer, "get_added_vocab", dict)() if t]
        # Longest first, so that an added token containing another one is matched whole.
        self._added = (
            re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True))) if added else None
        )
        base = self.system_messages + [{"role": "user", "content": "x"}]
        self._base = base + [{"role": "assistant", "content": _PROBE}]
        rendered = self.render(self._base, generation_prompt=False)
        position = rendered.rindex(_PROBE) + len(_PROBE)
        self.assistant_tail = rendered[position:]  # e.g. "<|im_end|>\n": what closes an assistant message
        self._prefix = rendered

    # ---- rendering
    def render(self, messages: Sequence[Message], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt, **self.template_kwargs
        )

    def encode(self, text: str) -> list[int]:
        """Template text (markup included: its special tokens stay special)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def encode_data(self, text: str) -> list[int]:
        """Content text: a string that spells an added token is encoded as plain text (split in two, so no piece
        matches it), everything else as usual."""
        if self._added is None or not self._added.search(text):
            return self.encode(text)
        ids, start = [], 0
        for match in self._added.finditer(text):
            ids += self.encode(text[start : match.start()])
            token = match.group()
            ids += self.encode(token[:1]) + self.encode(token[1:])
            start = match.end()
        return ids + self.encode(text[start:])

    def encode_rendered(
        self, messages: Sequence[Message], generation_prompt: bool, suffix_from: int = 0, lead: str = ""
    ) -> list[int]:
        """Render `messages`, keep the text from character `suffix_from` on, put `lead` (template text) before it and
        encode, with every content that spells an added token encoded as data. Contents without one (nearly always)
        keep the plain encoding of the whole text."""
        unsafe = [i for i, m in enumerate(messages) if self._added is not None and self._added.search(m["content"])]
        if not unsafe:
            return self.encode(lead + self.render(messages, generation_prompt)[suffix_from:])
        slotted = [dict(m, content=_SLOT.format(i)) if i in unsafe else m for i, m in enumerate(messages)]
        rendered = self.render(slotted, generation_prompt)
        pattern = re.compile("|".join(re.escape(_SLOT.format(i)) for i in unsafe))
        if len(pattern.findall(rendered)) != len(unsafe):
            raise ValueError(
                "The chat template changed a message's content while rendering it, so contents cannot be encoded as "
                "data (plain text). Use a template that inserts message contents verbatim (ChatML, Qwen, Llama-3 "
                "templates do)."
            )
        if suffix_from > rendered.find(_SLOT.format(unsafe[0])) >= 0:
            raise ValueError("encode_rendered: suffix_from must not cut into a message content.")
        rendered = lead + rendered[suffix_from:]
        ids, start = [], 0
        for match in pattern.finditer(rendered):
            ids += self.encode(rendered[start : match.start()])
            index = int(match.group()[len("\u2063TRLEPO") : -1])
            ids += self.encode_data(messages[index]["content"])
            start = match.end()
        return ids + self.encode(rendered[start:])

    # ---- the pieces
    def prompt(self, messages: Sequence[Message]) -> list[int]:
        """A whole prompt, with the generation prompt."""
        return self.encode_rendered(messages, generation_prompt=True)

    def observation(self, text: str, closed_with: str | None) -> list[int]:
        """The ids between an answer and the next one in a growing conversation. `closed_with`: the text of the
        end-of-turn token the answer ended with (the model generated it), or None when the answer was cut (at its
        token limit): then the whole assistant tail is added."""
        return self.observation_messages([{"role": "user", "content": text}], closed_with)

    def observation_messages(self, observation: Sequence[Message], closed_with: str | None) -> list[int]:
        """`observation` for any messages that follow an answer (e.g. a tool-calling env's tool results)."""
        messages = self._base + list(observation)
        if not self.render(messages, generation_prompt=True).startswith(self._prefix):
            raise ValueError(
                "The tokenizer's chat template re-renders earlier messages when a new one is added, so the tokens "
                "between turns cannot be derived. Use a template whose rendering of a conversation is a prefix of the "
                "rendering of its continuation (ChatML/Qwen/Llama-3 templates are), or windowed prompts "
                "(env_history_turns=k)."
            )
        tail = self.assistant_tail
        if closed_with and tail.startswith(closed_with):
            tail = tail[len(closed_with) :]  # the model's own end-of-turn token is already in the sequence
        return self.encode_rendered(messages, generation_prompt=True, suffix_from=len(self._prefix), lead=tail)

    def block_marker(self) -> list[int]:
        """The ids every windowed prompt starts with (the rendered system message and the user header): how packed
        rows find where each per-turn block begins."""
        a = self.prompt(self.system_messages + [{"role": "user", "content": "alpha"}])
        b = self.prompt(self.system_messages + [{"role": "user", "content": "omega"}])
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
