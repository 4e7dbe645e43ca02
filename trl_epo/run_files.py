"""The files an EPO run writes next to its model, and how to write them so that a crash never leaves half a file.

* `epo_state.json` (every checkpoint): the EPO state a resumed run needs (the entropy reference).
* `epo_run.json` (the output folder, after training): the run's `epo_*`/`env_*` settings, the resolved rollout
  settings (`"rollout"`: prompt style, turn limits, chat-template arguments, the env and its constructor arguments)
  and the entropy reference. `trl-epo evaluate` reads it back so a model is evaluated on the prompts it was trained
  on; `trl-epo plot` reads the corridor settings from it.
* `eval_results.json`: evaluation results for the model card (`trl_epo.results`).

Standard library only.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


EPO_STATE_NAME = "epo_state.json"
EPO_RUN_NAME = "epo_run.json"
EVAL_RESULTS_NAME = "eval_results.json"
ROLLOUT_LOG_DIR = "_rollouts"  # "_" folders stay out of push_to_hub uploads (transcripts can be large)


def write_json_atomic(path: str, payload: Any) -> None:
    """Write JSON so that a crash never leaves a half-written file (temp file + fsync + atomic rename)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def find_run_file(path: str, name: str = EPO_RUN_NAME) -> str | None:
    """`name` in `path` or in its parent (a checkpoint folder inside an output folder), or None."""
    for folder in (path, os.path.dirname(os.path.abspath(path))):
        candidate = os.path.join(folder, name)
        if os.path.exists(candidate):
            return candidate
    return None


def read_run_settings(path: str) -> dict[str, Any]:
    """The `epo_run.json` of the run that produced `path` (a model, checkpoint or output folder), or {}."""
    found = find_run_file(path)
    return dict(read_json(found)) if found else {}
