"""The rest of a rollout in a checkpoint, without pickle: a list of micro-batches (`TrainingRow`s and their step's
`StepCounts`) as one safetensors file of flat tensors, with the layout in its JSON metadata.

Why not `torch.save`: loading a pickle runs whatever the file says, so a tampered checkpoint would execute code on
resume. safetensors files hold only tensors and a JSON header; `load` checks the layout and refuses anything else.

Each per-row field becomes ``<field>.values`` (all rows' values, concatenated), ``<field>.lengths`` (-1: None) and,
for the fields that may hold a number or a list (the advantage, `extra` values), ``<field>.kind``. Floats are stored
as float64 (Python floats round-trip exactly), token ids as int64.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch


FORMAT = "trl_epo.row_buffer/1"
INT_FIELDS = ("prompt_ids", "completion_ids", "env_mask", "turn_ids")
FLOAT_FIELDS = ("logprobs", "epo_weights", "old_logps", "ref_logps")
_NONE, _NUMBER, _LIST = -1, 0, 1


def save(path: str, step: int, micro_batches: Sequence) -> None:
    """Write `micro_batches` (objects with `.rows` and `.counts`) and the trainer's micro-step `step` to `path`
    (atomically: a temporary file, then a rename)."""
    from safetensors.torch import save_file

    rows = [row for micro in micro_batches for row in micro.rows]
    tensors: dict[str, torch.Tensor] = {
        "micro_batch": torch.tensor(
            [m for m, micro in enumerate(micro_batches) for _ in micro.rows], dtype=torch.int64
        ),
        "episode": torch.tensor([row.episode for row in rows], dtype=torch.int64),
        "counts": torch.tensor(
            [[micro.counts.rows, micro.counts.action_tokens, micro.counts.trajectories] for micro in micro_batches],
            dtype=torch.float64,
        ).reshape(len(micro_batches), 3),
    }
    for name in INT_FIELDS:
        _put_lists(tensors, name, [getattr(row, name) for row in rows], torch.int64)
    for name in FLOAT_FIELDS:
        _put_lists(tensors, name, [getattr(row, name) for row in rows], torch.float64)
    _put_mixed(tensors, "advantage", [row.advantage for row in rows])
    extra_keys = sorted({key for row in rows for key in row.extra})
    for i, key in enumerate(extra_keys):
        values = [row.extra.get(key) for row in rows]
        for value in values:
            if not (value is None or _is_number(value) or _is_number_list(value)):
                raise TypeError(
                    f"TrainingRow.extra[{key!r}] holds a {type(value).__name__}; a checkpoint's row buffer stores "
                    "numbers and lists of numbers only."
                )
        _put_mixed(tensors, f"extra.{i}", values)
    metadata = {"format": FORMAT, "step": str(int(step)), "extra_keys": json.dumps(extra_keys)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, path + ".tmp", metadata=metadata)
    os.replace(path + ".tmp", path)


def load(path: str) -> tuple[int, list[tuple[list, object]]]:
    """``(step, [(rows, counts), ...])``, one pair per micro-batch written by `save`. Raises ValueError on a file
    that is not such a row buffer (e.g. a pickle): nothing in it is executed."""
    from safetensors import SafetensorError, safe_open

    from .rows import StepCounts, TrainingRow

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"{path} is not a row buffer written by trl_epo ({error}); it is not loaded (checkpoints are never "
            "unpickled). Resume from a checkpoint at a rollout boundary, or from an intact checkpoint."
        ) from error
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} row buffer (metadata {metadata}); it is not loaded.")
    extra_keys = json.loads(metadata["extra_keys"])
    fields = {name: _get_lists(tensors, name) for name in (*INT_FIELDS, *FLOAT_FIELDS)}
    advantages = _get_mixed(tensors, "advantage")
    extras = [_get_mixed(tensors, f"extra.{i}") for i in range(len(extra_keys))]
    counts = tensors["counts"].tolist()
    micro_batches = [([], StepCounts(*c)) for c in counts]
    for i, (micro, episode) in enumerate(zip(tensors["micro_batch"].tolist(), tensors["episode"].tolist())):
        row = TrainingRow(
            **{name: fields[name][i] for name in INT_FIELDS},
            episode=int(episode),
            advantage=advantages[i],
            **{name: fields[name][i] for name in FLOAT_FIELDS},
        )
        row.extra = {key: values[i] for key, values in zip(extra_keys, extras) if values[i] is not None}
        micro_batches[micro][0].append(row)
    return int(metadata["step"]), micro_batches


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_number_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(_is_number(v) or isinstance(v, bool) for v in value)


def _put_lists(tensors, name, values, dtype) -> None:
    tensors[f"{name}.lengths"] = torch.tensor([-1 if v is None else len(v) for v in values], dtype=torch.int64)
    tensors[f"{name}.values"] = torch.tensor([x for v in values if v is not None for x in v], dtype=dtype)


def _get_lists(tensors, name) -> list:
    values = tensors[f"{name}.values"].tolist()
    out, start = [], 0
    for length in tensors[f"{name}.lengths"].tolist():
        if length < 0:
            out.append(None)
            continue
        out.append(values[start : start + length])
        start += length
    return out


def _put_mixed(tensors, name, values) -> None:
    """None, a number or a list of numbers per row (float64; ints that are all ints stay ints on load)."""
    kinds = [_NONE if v is None else _NUMBER if _is_number(v) else _LIST for v in values]
    as_lists = [None if v is None else [v] if _is_number(v) else list(v) for v in values]
    integer = all(isinstance(x, int) for v in as_lists if v is not None for x in v)
    tensors[f"{name}.kind"] = torch.tensor(kinds, dtype=torch.int64)
    _put_lists(tensors, name, as_lists, torch.int64 if integer and any(as_lists) else torch.float64)


def _get_mixed(tensors, name) -> list:
    lists = _get_lists(tensors, name)
    kinds = tensors[f"{name}.kind"].tolist()
    return [None if k == _NONE else v[0] if k == _NUMBER else v for k, v in zip(kinds, lists)]
