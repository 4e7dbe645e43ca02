"""Steer a real tiny model through TRL's own tool loop: a tokenizer with TRL's shipped Qwen2.5 chat template (which
TRL's tool parsing recognises) and a scripted logits processor that makes HF `generate` emit the answers a Python
policy picks. The model still runs its real forward (the loss, its entropies and gradients are the model's own); the
processor only fixes which token is sampled at each step."""

from __future__ import annotations

import functools
import json

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from trl.chat_template_utils import qwen2_5_chat_template

from trl_epo.tiny import build_tiny_tokenizer


def tool_tokenizer():
    """trl_epo's tiny tokenizer with TRL's Qwen2.5 chat template (tools, tool calls and tool responses)."""
    tokenizer = build_tiny_tokenizer(["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"])
    tokenizer.chat_template = qwen2_5_chat_template
    return tokenizer


def tool_call(name: str, **arguments) -> str:
    """One tool call as the Qwen2.5 template writes it."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


class ScriptedAnswers(LogitsProcessor):
    """Forces, row by row, the tokens of ``policy(row_index, context_text)`` then EOS. ``row_index`` is the row's
    index in the first `generate` call of a rollout (the generation batch), or None in later calls (the tool loop
    continues only the rows that called a tool)."""

    def __init__(self, tokenizer, policy):
        self.tokenizer, self.policy = tokenizer, policy
        self.header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        self.prompt_width: int | None = None
        self.first_call = True

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        forced = torch.full_like(scores, float("-inf"))
        for b in range(input_ids.size(0)):
            ids = [i for i in input_ids[b].tolist() if i != self.tokenizer.pad_token_id]
            h = len(self.header)
            start = max(i for i in range(len(ids) - h + 1) if ids[i : i + h] == self.header) + h
            context, produced = ids[:start], ids[start:]
            answer = self.policy(b if self.first_call else None, self.tokenizer.decode(context))
            target = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            forced[b, target[len(produced)] if len(produced) < len(target) else self.tokenizer.eos_token_id] = 0.0
        return forced


def steer(model, tokenizer, policy):
    """Make `model.generate` sample ``policy``'s answers (see `ScriptedAnswers`); returns the processor."""
    processor = ScriptedAnswers(tokenizer, policy)
    generate = model.generate

    @functools.wraps(generate)
    def steered(*args, **kwargs):
        kwargs["logits_processor"] = LogitsProcessorList([processor])
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        processor.first_call = "<tool_response>" not in tokenizer.decode(input_ids[0])
        return generate(*args, **kwargs)

    model.generate = steered
    return processor


def model_runs(mask_row: list[int]) -> list[list[int]]:
    """Hand segmentation of one row's loss mask: the positions of each maximal run of model tokens."""
    runs, current = [], []
    for i, m in enumerate(mask_row):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def hand_eq2(rows: list[tuple[list[float], list[int]]]) -> float:
    """Eq. 2 by hand: rows = (entropies, loss mask) of one optimizer step's trajectories (one row each); each run of
    model tokens is a turn; trajectories without a model token do not count in B."""
    per_traj = []
    for entropies, mask in rows:
        runs = model_runs(mask)
        if runs:
            per_traj.append(sum(sum(entropies[i] for i in run) / len(run) for run in runs) / len(runs))
    return sum(per_traj) / max(1, len(per_traj))
