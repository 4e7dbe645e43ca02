"""Evaluation results: success rates with Wilson confidence intervals, and the `eval_results.json` the model card
reads (`trl_epo.card`). Standard library only.

The file format::

    {"format": "trl_epo.eval_results/1",
     "results": [{"env": "sciworld", "split": "ood", "success_rate": 0.41, "episodes": 1684,
                  "ci_low": 0.39, "ci_high": 0.43, "seeds": [0, 1, 2], "temperature": 0.4,
                  "mean_turns": 17.2, "model": "out/checkpoint-125", "extra": {}}]}

`EvalResult.from_outcomes(env, split, won)` builds an entry from per-episode outcomes; saving again replaces the entry
of the same (env, split, model) and keeps the others.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .run_files import EVAL_RESULTS_NAME, read_json, write_json_atomic


EVAL_RESULTS_FORMAT = "trl_epo.eval_results/1"


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (``successes`` out of ``n``).

    Unlike the normal ("Wald") interval it stays inside [0, 1] and is not degenerate at 0 or n successes, which
    matters for the small success counts of agent benchmarks. ``n == 0`` gives the uninformative (0, 1).
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n, got successes={successes}, n={n}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    if n == 0:
        return 0.0, 1.0
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def success_summary(won: Sequence[bool], confidence: float = 0.95) -> dict[str, Any]:
    """Episodes, successes, success rate and its Wilson interval."""
    n, k = len(won), int(sum(bool(w) for w in won))
    low, high = wilson_interval(k, n, confidence)
    return {"episodes": n, "successes": k, "success_rate": k / n if n else float("nan"), "success_ci": [low, high]}


@dataclass
class EvalResult:
    """One evaluation of the policy on one environment split.

    Attributes:
        env: environment name ("sciworld", "alfworld", "toy", ...).
        split: split name ("iid", "ood", ...).
        success_rate: fraction of episodes won, in [0, 1].
        episodes: number of episodes played.
        ci_low / ci_high: a 95% confidence interval of the success rate (e.g. Wilson).
        seeds: the evaluation seeds.
        temperature: sampling temperature of the evaluation (paper: 0.4).
        mean_turns: mean episode length in turns.
        model: what was evaluated (a checkpoint path or Hub id).
        extra: any other JSON-serialisable numbers (e.g. {"score": 63.2}).
    """

    env: str
    split: str
    success_rate: float
    episodes: int
    ci_low: float | None = None
    ci_high: float | None = None
    seeds: list[int] | None = None
    temperature: float | None = None
    mean_turns: float | None = None
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not 0.0 <= float(self.success_rate) <= 1.0:
            raise ValueError(f"success_rate must be a fraction in [0, 1], got {self.success_rate}.")
        if int(self.episodes) < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}.")

    @classmethod
    def from_outcomes(cls, env: str, split: str, won: Sequence[bool], **kwargs) -> EvalResult:
        """Success rate and Wilson 95% interval from per-episode outcomes."""
        n, k = len(won), sum(bool(w) for w in won)
        if n == 0:
            raise ValueError("No episodes: pass the outcome (won or not) of every evaluation episode.")
        low, high = wilson_interval(k, n)
        return cls(env=env, split=split, success_rate=k / n, episodes=n, ci_low=low, ci_high=high, **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalResult:
        known = {name for name in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown evaluation result fields {unknown}; allowed: {sorted(known)}.")
        return cls(**data)

    @property
    def key(self) -> tuple:
        return (self.env, self.split, self.model)


def _eval_path(path: str) -> str:
    return path if path.endswith(".json") else os.path.join(path, EVAL_RESULTS_NAME)


def save_eval_results(results, path: str) -> str:
    """Write evaluation results for the model card into `path` (a folder, usually the training `output_dir`, or a
    `.json` file). `results`: one or several `EvalResult`s, their dict form, or `trl_epo.evaluation.evaluate` results
    (whose per-episode records go next to the file as ``eval_episodes_<env>_<split>.jsonl``). Entries already there
    with another (env, split, model) are kept; the same key is replaced. Returns the file path."""
    if isinstance(results, (EvalResult, Mapping)):
        results = [results]
    file = _eval_path(path)
    new = []
    for r in results:
        if isinstance(r, Mapping) and "num_episodes" in r:  # an `evaluate` result
            new.append(to_eval_result(r))
            _write_episode_records(r, os.path.dirname(file) or ".")
        else:
            new.append(r if isinstance(r, EvalResult) else EvalResult.from_dict(r))
    merged = {r.key: r for r in load_eval_results(file)}
    merged.update({r.key: r for r in new})
    write_json_atomic(file, {"format": EVAL_RESULTS_FORMAT, "results": [asdict(r) for r in merged.values()]})
    return file


def _write_episode_records(result: Mapping[str, Any], folder: str) -> None:
    if result.get("episodes") is None:
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"eval_episodes_{result['env']}_{result['split']}.jsonl"), "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in result["episodes"])


def load_eval_results(path: str) -> list[EvalResult]:
    """Read the results written by `save_eval_results` (a folder or a `.json` file); [] when there are none."""
    file = _eval_path(path)
    if not os.path.exists(file):
        return []
    payload = read_json(file)
    if not isinstance(payload, dict) or payload.get("format") != EVAL_RESULTS_FORMAT:
        raise ValueError(
            f"{file} is not an evaluation results file of trl_epo (expected a JSON object with "
            f"'format': {EVAL_RESULTS_FORMAT!r} and 'results'). Write it with trl_epo.results.save_eval_results."
        )
    return [EvalResult.from_dict(entry) for entry in payload["results"]]


def to_eval_result(result: dict[str, Any]):
    """The model-card entry (`EvalResult`) of a `trl_epo.evaluation.evaluate` result: the headline numbers as fields, the
    rest (invalid-turn rate, per-task and per-seed results, settings, timing) under ``extra``."""
    headline = {
        "env",
        "split",
        "model",
        "success_rate",
        "num_episodes",
        "success_ci",
        "seeds",
        "mean_turns",
        "episodes",
        "format",
        "schema_version",
    }
    low, high = result.get("success_ci") or (None, None)
    return EvalResult(
        env=result["env"],
        split=result["split"],
        success_rate=float(result["success_rate"]),
        episodes=int(result.get("num_episodes", 0)),
        ci_low=low,
        ci_high=high,
        seeds=list(result.get("seeds") or []) or None,
        temperature=(result.get("settings") or {}).get("temperature"),
        mean_turns=result.get("mean_turns"),
        model=result.get("model") or None,
        extra={k: v for k, v in result.items() if k not in headline},
    )
