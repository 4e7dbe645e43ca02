"""Plots of a run's entropy dynamics from its log history (matplotlib, PNG).

    from trl_epo.plotting import plot_run
    plot_run("out/epo")                # -> out/epo/plots/epo_dynamics.png, out/epo/plots/entropy_turn_heatmap.png

or ``trl-epo plot out/epo``. The log history is the `trainer_state.json` that `EPOTrainer` writes into `output_dir`
after training (or, for a run still going or interrupted, the newest `checkpoint-*/trainer_state.json`); the corridor
bounds kappa_l, kappa_r come from the run's `epo_run.json` (or from the arguments).

Figures:

* ``epo_dynamics.png``: (a) the trajectory-level entropy L_H (`epo/entropy`) with its reference H_ref
  (`epo/reference`) and the corridor band [kappa_l * H_ref, kappa_r * H_ref]; (b) the phase weight beta_k; (c) the
  smoothing penalty L_smooth; (d) the fraction of action tokens outside the corridor; (e) the success rate of the
  training rollouts (`rollout/success_rate`, else the mean reward) and, when the trainer evaluated periodically, each
  eval split's success rate with its Wilson 95% interval (`eval/<split>/success_rate`); (f) mean turns and
  invalid-turn rate.
* ``entropy_turn_heatmap.png``: the step entropy per true turn index (`epo/entropy_turn/<t>`), turn x step.

Values are what the trainer logged: with `logging_steps > 1` each point is the mean over its logging window. With
`epo_reference="per_turn"` the plotted reference is the scalar (cumulative) fallback, not each turn's own.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

from .run_files import read_run_settings


TRAINER_STATE_NAME = "trainer_state.json"
TURN_KEY = re.compile(r"^epo/entropy_turn/(\d+)$")
EVAL_KEY = re.compile(r"^eval/(.+)/success_rate$")


# --------------------------------------------------------------------------------------------------------------------
# Reading a run
# --------------------------------------------------------------------------------------------------------------------


def find_trainer_state(run_dir: str) -> str:
    """The `trainer_state.json` of a run: `run_dir`'s own, or the newest checkpoint's if that one is further along
    (a run still training, or interrupted before it wrote its final state)."""
    candidates = []
    own = os.path.join(run_dir, TRAINER_STATE_NAME)
    if os.path.exists(own):
        candidates.append((_global_step(own), 1, own))
    for path in glob.glob(os.path.join(run_dir, "checkpoint-*", TRAINER_STATE_NAME)):
        candidates.append((_global_step(path), 0, path))
    if not candidates:
        raise FileNotFoundError(
            f"No {TRAINER_STATE_NAME} in {run_dir} or its checkpoint-* folders. EPOTrainer writes it at the end of "
            "training (and TRL into every checkpoint); give the run's output_dir."
        )
    return max(candidates)[2]


def _global_step(path: str) -> int:
    try:
        with open(path) as f:
            return int(json.load(f).get("global_step", 0))
    except (OSError, ValueError):
        return -1


def load_log_history(run_dir: str) -> tuple[list[dict[str, Any]], str]:
    """The per-step log entries of a run (the final summary entry dropped) and the file they came from."""
    path = find_trainer_state(run_dir)
    with open(path) as f:
        history = json.load(f).get("log_history", [])
    steps = [h for h in history if "step" in h and "train_runtime" not in h]
    return steps, path


def series(history: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged metric, in step order, skipping entries without it."""
    points = [(int(h["step"]), float(h[key])) for h in history if key in h and h[key] is not None]
    points.sort()
    return [p[0] for p in points], [p[1] for p in points]


def turn_entropy_matrix(history: Sequence[dict[str, Any]]) -> tuple[list[int], list[int], list[list[float]]]:
    """(turns, steps, matrix[turn][step]) of `epo/entropy_turn/<t>`; NaN where a turn was not played."""
    turns = sorted({int(m.group(1)) for h in history for k in h if (m := TURN_KEY.match(k))})
    steps = sorted({int(h["step"]) for h in history if any(TURN_KEY.match(k) for k in h)})
    index = {s: i for i, s in enumerate(steps)}
    matrix = [[math.nan] * len(steps) for _ in turns]
    for h in history:
        if int(h.get("step", -1)) not in index:
            continue
        for row, turn in enumerate(turns):
            value = h.get(f"epo/entropy_turn/{turn}")
            if value is not None:
                matrix[row][index[int(h["step"])]] = float(value)
    return turns, steps, matrix


def rolling_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (shorter windows at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float, rows: int = 1, cols: int = 1):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, axes


def _missing(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"{what}\nnot logged", ha="center", va="center", transform=ax.transAxes, color="0.4")


def plot_entropy_corridor(ax, history, kappa_low: float, kappa_high: float) -> None:
    steps, entropy = series(history, "epo/entropy")
    if not steps:
        _missing(ax, "epo/entropy")
        return
    ref_steps, reference = series(history, "epo/reference")
    if ref_steps:
        low = [kappa_low * r for r in reference]
        high = [kappa_high * r for r in reference]
        ax.fill_between(
            ref_steps,
            low,
            high,
            color="tab:green",
            alpha=0.15,
            step=None,
            label=f"corridor [{kappa_low:g}, {kappa_high:g}] x H_ref",
        )
        ax.plot(ref_steps, reference, color="tab:green", lw=1.5, ls="--", label="reference H_ref")
    ax.plot(
        steps,
        entropy,
        color="tab:blue",
        lw=1.5,
        marker="." if len(steps) < 40 else None,
        label="entropy L_H (trajectory-level)",
    )
    span = [*entropy, *reference] if ref_steps else list(entropy)
    lo, hi = min(span), max(span)
    pad = 0.25 * (hi - lo) + 0.05 * max(abs(hi), 1e-3)
    if ref_steps and kappa_high * max(reference) > hi + 4 * pad:
        ax.set_ylim(max(0.0, lo - pad), hi + pad)  # a wide corridor would flatten the entropy curve: zoom in
        ax.text(
            0.99,
            0.02,
            "corridor clipped to the entropy range",
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=7,
            color="0.4",
        )
    ax.set_title("(a) entropy and its corridor")
    ax.set_ylabel("nats")
    ax.legend(fontsize=7, loc="best")


def _line(ax, history, key: str, title: str, ylabel: str, color: str, smooth: bool = False) -> None:
    steps, values = series(history, key)
    if not steps:
        _missing(ax, key)
        ax.set_title(title)
        return
    ax.plot(
        steps,
        values,
        color=color,
        lw=1.0 if smooth else 1.5,
        alpha=0.45 if smooth else 1.0,
        marker="." if len(steps) < 40 else None,
        label=key,
    )
    if smooth and len(values) >= 5:
        window = max(2, len(values) // 15)
        ax.plot(steps, rolling_mean(values, window), color=color, lw=2.0, label=f"moving mean ({window} steps)")
        ax.legend(fontsize=7, loc="best")
    ax.set_title(title)
    ax.set_ylabel(ylabel)


def eval_splits(history: Sequence[dict[str, Any]]) -> list[str]:
    """The splits the trainer evaluated periodically (`eval/<split>/success_rate` keys), in first-seen order."""
    splits: list[str] = []
    for entry in history:
        for key in entry:
            match = EVAL_KEY.match(key)
            if match and match.group(1) not in splits:
                splits.append(match.group(1))
    return splits


def plot_eval_success(ax, history) -> None:
    """Each eval split's success rate over training, with its Wilson 95% interval as error bars."""
    for split, color in zip(eval_splits(history), ("tab:blue", "tab:olive", "tab:cyan", "tab:pink")):
        steps, rates = series(history, f"eval/{split}/success_rate")
        _, lows = series(history, f"eval/{split}/success_ci_low")
        _, highs = series(history, f"eval/{split}/success_ci_high")
        if len(lows) == len(rates) == len(highs):
            errors = [[r - lo for r, lo in zip(rates, lows)], [hi - r for r, hi in zip(rates, highs)]]
        else:
            errors = None
        ax.errorbar(
            steps, rates, yerr=errors, color=color, marker="o", ms=3, lw=1.2, capsize=2, label=f"eval/{split} (95% CI)"
        )
    if eval_splits(history):
        ax.legend(fontsize=7, loc="best")


def plot_dynamics(history, kappa_low: float, kappa_high: float, title: str = ""):
    """The six-panel figure of a run (see the module docstring); returns the matplotlib Figure."""
    figure, axes = _figure(12, 10, 3, 2)
    plot_entropy_corridor(axes[0, 0], history, kappa_low, kappa_high)
    _line(axes[0, 1], history, "epo/beta", "(b) phase weight beta_k", "beta", "tab:purple")
    _line(axes[1, 0], history, "epo/smooth_penalty", "(c) smoothing penalty L_smooth", "alpha x penalty", "tab:red")
    _line(
        axes[1, 1],
        history,
        "epo/out_of_corridor_frac",
        "(d) action tokens outside the corridor",
        "fraction",
        "tab:orange",
    )
    success_key = "rollout/success_rate" if series(history, "rollout/success_rate")[0] else "reward"
    _line(axes[2, 0], history, success_key, f"(e) training success ({success_key})", "rate", "tab:green", smooth=True)
    plot_eval_success(axes[2, 0], history)
    ax = axes[2, 1]
    steps, turns = series(history, "rollout/mean_turns")
    if steps:
        ax.plot(steps, turns, color="tab:brown", lw=1.5, label="mean turns")
        ax.set_ylabel("turns")
        twin = ax.twinx()
        inv_steps, invalid = series(history, "rollout/invalid_turn_rate")
        twin.plot(inv_steps, invalid, color="tab:gray", lw=1.2, ls="--", label="invalid-turn rate")
        twin.set_ylabel("invalid-turn rate")
        twin.set_ylim(-0.02, 1.02)
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="best")
    else:
        _missing(ax, "rollout/mean_turns")
    ax.set_title("(f) episode length and invalid turns")
    for ax in axes.flat:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    if title:
        figure.suptitle(title, fontsize=11)
    return figure


def plot_turn_heatmap(history, title: str = ""):
    """Per-turn entropy, turn (rows) x optimizer step (columns); returns the Figure (None without per-turn data)."""
    import numpy as np

    turns, steps, matrix = turn_entropy_matrix(history)
    if not turns:
        return None
    figure, axes = _figure(10, max(3.0, min(8.0, 1.5 + 0.25 * len(turns))))
    ax = axes[0, 0]
    data = np.ma.masked_invalid(np.array(matrix, dtype=float))
    image = ax.imshow(
        data,
        aspect="auto",
        origin="lower",
        interpolation="nearest",
        cmap="viridis",
        extent=(steps[0] - 0.5, steps[-1] + 0.5, turns[0] - 0.5, turns[-1] + 0.5),
    )
    figure.colorbar(image, ax=ax, label="mean action-token entropy (nats)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("turn index")
    ax.set_title(title or "entropy per turn (epo/entropy_turn/<t>); blank: turn not reached")
    return figure


def plot_run(
    run_dir: str,
    out_dir: str | None = None,
    kappa_low: float | None = None,
    kappa_high: float | None = None,
    title: str | None = None,
) -> dict[str, str]:
    """Write the PNG figures of a run; returns {figure name: path}. See the module docstring."""
    history, source = load_log_history(run_dir)
    if not history:
        raise ValueError(f"{source} has no per-step log entries (was logging_steps larger than the run?).")
    settings = read_run_settings(run_dir).get("epo", {})
    kappa_low = settings.get("epo_kappa_low", 0.0) if kappa_low is None else kappa_low
    kappa_high = settings.get("epo_kappa_high", 2.0) if kappa_high is None else kappa_high
    if title is None:
        coef = settings.get("epo_entropy_coef")
        parts = [os.path.basename(os.path.abspath(run_dir))]
        if coef is not None:
            parts.append(f"lambda={coef:g}")
            if coef > 0:
                parts.append(
                    f"smoothing={settings.get('epo_smoothing')} alpha={settings.get('epo_smoothing_alpha')}"
                    f" reference={settings.get('epo_reference')}"
                )
        else:
            parts.append("(no epo_run.json: kappas assumed)")
        title = "  ".join(parts)
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    figure = plot_dynamics(history, kappa_low, kappa_high, title)
    written["epo_dynamics"] = os.path.join(out_dir, "epo_dynamics.png")
    figure.savefig(written["epo_dynamics"])
    heatmap = plot_turn_heatmap(history, title=f"{title}\nentropy per turn (blank: turn not reached)")
    if heatmap is not None:
        written["entropy_turn_heatmap"] = os.path.join(out_dir, "entropy_turn_heatmap.png")
        heatmap.savefig(written["entropy_turn_heatmap"])
    return written
