"""The study's summary: markdown tables and matplotlib figures from a grid's per-run result JSONs.

Statistics (all reported per arm, over the seeds that have finished):

* final / best success, IID and OOD: the last periodic evaluation of each seed (and its best one, which is
  selection-biased upwards), pooled over seeds with a Wilson 95% interval over the episodes, and the mean over seeds
  with a percentile bootstrap 95% interval over seeds (10,000 resamples of the seeds).
* Var(dH): per seed, the variance of the step-to-step changes H_{k+1} - H_k of the logged trajectory entropy
  `epo/entropy` over the optimizer steps (the paper's smoothness claim); mean over seeds with a bootstrap interval.
* collapse (defined per seed, both parts counted separately and together):
  - entropy collapse: the mean entropy of the last 5 rollouts is below ENTROPY_COLLAPSE (0.5) x that of the first
    rollout;
  - success collapse: the final IID success is at least SUCCESS_DROP (0.15) below the seed's best IID success.
* paired differences to GRPO: per seed (same seed, same tasks, same warm start), arm minus `grpo`, of the final
  IID and OOD success; mean with a bootstrap interval over the paired seeds.
* wall time per arm: mean and standard deviation of the runs' wall-clock seconds (and the load averages).
"""

from __future__ import annotations

import glob
import json
import math
import os
import random
import statistics
from typing import Any


ENTROPY_COLLAPSE = 0.5
SUCCESS_DROP = 0.15
BOOTSTRAP = 10_000
SPLITS = ("iid", "ood")
BASELINE = "grpo"


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_mean(values: list[float], seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): a percentile bootstrap 95% interval of the mean over `values` (e.g. seeds)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return (math.nan, math.nan, math.nan)
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(BOOTSTRAP))
    return (statistics.fmean(values), means[int(0.025 * BOOTSTRAP)], means[int(0.975 * BOOTSTRAP) - 1])


def load_results(results_dir: str) -> list[dict[str, Any]]:
    runs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*_seed*.json"))):
        with open(path) as f:
            runs.append(json.load(f))
    return runs


def _clean(values) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def entropy_change_variance(entropy: list[float]) -> float:
    values = _clean(entropy)
    deltas = [b - a for a, b in zip(values, values[1:])]
    return statistics.pvariance(deltas) if len(deltas) >= 2 else math.nan


def run_stats(run: dict[str, Any]) -> dict[str, Any]:
    """The per-seed numbers of one run."""
    c, k = run["curves"], run["updates_per_rollout"]
    evals = [e for e in c["eval"] if all(s in e for s in SPLITS)]
    final = evals[-1] if evals else None
    entropy = _clean(c["entropy"])
    first, last = (
        statistics.fmean(entropy[:k]) if entropy else math.nan,
        statistics.fmean(entropy[-5 * k :]) if entropy else math.nan,
    )
    per_rollout = [statistics.fmean(entropy[i : i + k]) for i in range(0, len(entropy) - k + 1, k)]
    stats = {
        "arm": run["arm"],
        "seed": run["seed"],
        "wall_s": run["wall_s"],
        "var_dh": entropy_change_variance(entropy),
    }
    stats["var_dh_rollout"] = entropy_change_variance(per_rollout)  # the K steps of a rollout see different episodes
    stats["cpu_s"] = run.get("cpu_s", math.nan)
    coverage = _clean(c.get("anchor_coverage", []))  # GiGPO: fraction of turns in a step group of size > 1
    stats["anchor_coverage"] = statistics.fmean(coverage) if coverage else math.nan
    stats["entropy_first"], stats["entropy_last"] = first, last
    stats["entropy_collapse"] = bool(entropy) and last < ENTROPY_COLLAPSE * first
    for split in SPLITS:
        rates = [e[split]["success_rate"] for e in evals]
        stats[f"final_{split}"] = final[split] if final else None
        stats[f"best_{split}"] = max((e[split] for e in evals), key=lambda e: e["success_rate"]) if evals else None
        stats[f"start_{split}"] = evals[0][split] if evals else None
        stats[f"curve_{split}"] = ([e["rollout"] for e in evals], rates)
    stats["success_collapse"] = bool(evals) and (
        stats["best_iid"]["success_rate"] - stats["final_iid"]["success_rate"] >= SUCCESS_DROP
    )
    stats["collapse"] = stats["entropy_collapse"] or stats["success_collapse"]
    return stats


def arm_order(arms) -> list[str]:
    from grids import ARMS

    known = list(ARMS)
    return sorted(set(arms), key=lambda a: (known.index(a) if a in known else len(known), a))


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    per_run = [run_stats(r) for r in runs]
    arms = arm_order(s["arm"] for s in per_run)
    baseline = {s["seed"]: s for s in per_run if s["arm"] == BASELINE}
    out: dict[str, Any] = {
        "arms": {},
        "definitions": {"entropy_collapse": ENTROPY_COLLAPSE, "success_drop": SUCCESS_DROP},
    }
    for arm in arms:
        mine = sorted((s for s in per_run if s["arm"] == arm), key=lambda s: s["seed"])
        entry: dict[str, Any] = {"seeds": [s["seed"] for s in mine]}
        for which in ("start", "final", "best"):
            for split in SPLITS:
                points = [s[f"{which}_{split}"] for s in mine if s[f"{which}_{split}"]]
                k, n = sum(p["successes"] for p in points), sum(p["episodes"] for p in points)
                entry[f"{which}_{split}"] = {
                    "pooled": k / n if n else math.nan,
                    "wilson": wilson(k, n),
                    "seed_mean_ci": bootstrap_mean([p["success_rate"] for p in points]),
                    "per_seed": [p["success_rate"] for p in points],
                }
        entry["var_dh"] = bootstrap_mean([s["var_dh"] for s in mine])
        entry["var_dh_rollout"] = bootstrap_mean([s["var_dh_rollout"] for s in mine])
        entry["cpu_s"] = statistics.fmean(_clean([s["cpu_s"] for s in mine]) or [math.nan])
        entry["anchor_coverage"] = statistics.fmean(_clean([s["anchor_coverage"] for s in mine]) or [math.nan])
        entry["entropy_first_last"] = (
            statistics.fmean(_clean([s["entropy_first"] for s in mine]) or [math.nan]),
            statistics.fmean(_clean([s["entropy_last"] for s in mine]) or [math.nan]),
        )
        for key in ("entropy_collapse", "success_collapse", "collapse"):
            entry[key] = sum(s[key] for s in mine)
        walls = [s["wall_s"] for s in mine]
        entry["wall_s"] = (statistics.fmean(walls), statistics.stdev(walls) if len(walls) > 1 else 0.0)
        entry["load_average_start"] = [r["load_average_start"] for r in runs if r["arm"] == arm]
        for split in SPLITS:
            paired = [
                s[f"final_{split}"]["success_rate"] - baseline[s["seed"]][f"final_{split}"]["success_rate"]
                for s in mine
                if s["seed"] in baseline and s[f"final_{split}"] and baseline[s["seed"]][f"final_{split}"]
            ]
            entry[f"diff_{split}"] = {"n": len(paired), "mean_ci": bootstrap_mean(paired)}
        out["arms"][arm] = entry
    out["per_run"] = per_run
    return out


def _ci(triple) -> str:
    mean, low, high = triple
    return "n/a" if math.isnan(mean) else f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def _pooled(e) -> str:
    return "n/a" if math.isnan(e["pooled"]) else f"{e['pooled']:.3f} [{e['wilson'][0]:.3f}, {e['wilson'][1]:.3f}]"


def tables(summary: dict[str, Any]) -> str:
    arms = summary["arms"]
    lines = [
        "### Success (T=0.4): pooled over seeds [Wilson 95% over episodes]; seed mean [bootstrap 95% over seeds]",
        "",
    ]
    lines.append(
        "| arm | seeds | start IID | final IID pooled | final IID seed mean | final OOD pooled | final OOD seed mean | best IID (seed mean) | best OOD (seed mean) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for arm, e in arms.items():
        lines.append(
            f"| {arm} | {len(e['seeds'])} | {_pooled(e['start_iid'])} | {_pooled(e['final_iid'])} | {_ci(e['final_iid']['seed_mean_ci'])} "
            f"| {_pooled(e['final_ood'])} | {_ci(e['final_ood']['seed_mean_ci'])} | {_ci(e['best_iid']['seed_mean_ci'])} "
            f"| {_ci(e['best_ood']['seed_mean_ci'])} |"
        )
    lines += [
        "",
        f"### Paired difference to {BASELINE} (same seed), final success: mean [bootstrap 95% over seeds]",
        "",
    ]
    lines += ["| arm | pairs | IID diff | OOD diff |", "|---|---|---|---|"]
    for arm, e in arms.items():
        if arm != BASELINE:
            lines.append(
                f"| {arm} | {e['diff_iid']['n']} | {_ci(e['diff_iid']['mean_ci'])} | {_ci(e['diff_ood']['mean_ci'])} |"
            )
    d = summary["definitions"]
    lines += [
        "",
        "### Entropy, collapse, cost",
        "",
        f"Entropy collapse: mean entropy of the last 5 rollouts < {d['entropy_collapse']} x that of the first rollout. "
        f"Success collapse: final IID success >= {d['success_drop']} below the seed's best IID success.",
        "",
        "| arm | Var(dH) per step, seed mean [bootstrap 95%] | Var(dH) per rollout (mean of its K steps) "
        "| entropy first -> last rollouts | entropy collapses | success collapses | either | wall s per run (mean ± sd) "
        "| CPU s per run | GiGPO anchor coverage |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, e in arms.items():
        n = len(e["seeds"])
        first, last = e["entropy_first_last"]
        var = e["var_dh"]
        var_text = "n/a" if math.isnan(var[0]) else f"{var[0]:.2e} [{var[1]:.2e}, {var[2]:.2e}]"
        rvar = e["var_dh_rollout"]
        rvar_text = "n/a" if math.isnan(rvar[0]) else f"{rvar[0]:.2e} [{rvar[1]:.2e}, {rvar[2]:.2e}]"
        lines.append(
            f"| {arm} | {var_text} | {rvar_text} | {first:.3f} -> {last:.3f} | {e['entropy_collapse']}/{n} | {e['success_collapse']}/{n} "
            f"| {e['collapse']}/{n} | {e['wall_s'][0]:.0f} ± {e['wall_s'][1]:.0f} | {e['cpu_s']:.0f} "
            f"| {'-' if math.isnan(e['anchor_coverage']) else format(e['anchor_coverage'], '.3f')} |"
        )
    lines += ["", "### Per run: final IID / OOD success (best IID), Var(dH), wall s", ""]
    lines += [
        "| arm | seed | final IID | final OOD | best IID | Var(dH) | collapse | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary["per_run"]:
        flags = ",".join(k.split("_")[0] for k in ("entropy_collapse", "success_collapse") if s[k]) or "-"
        lines.append(
            f"| {s['arm']} | {s['seed']} | {s['final_iid']['success_rate']:.3f} | {s['final_ood']['success_rate']:.3f} "
            f"| {s['best_iid']['success_rate']:.3f} | {s['var_dh']:.2e} | {flags} | {s['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _band(ax, xs, curves, color, label):
    length = min(len(c) for c in curves)
    rows = [[c[i] for c in curves] for i in range(length)]
    mean = [statistics.fmean(r) for r in rows]
    sd = [statistics.stdev(r) if len(r) > 1 else 0.0 for r in rows]
    ax.plot(xs[:length], mean, color=color, lw=2, label=label)
    ax.fill_between(
        xs[:length], [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], color=color, alpha=0.15
    )


def figures(summary: dict[str, Any], runs: list[dict[str, Any]], out: str) -> list[str]:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    arms = list(summary["arms"])
    colors = {a: colormaps["tab10"](i % 10) for i, a in enumerate(arms)}
    paths = []
    figure = Figure(figsize=(14, 9), dpi=100, layout="constrained")
    axes = figure.subplots(2, 2)
    for arm in arms:
        mine = [s for s in summary["per_run"] if s["arm"] == arm]
        label = f"{arm} ({len(mine)} seeds)"
        for split, ax in zip(SPLITS, axes[0]):
            xs = mine[0][f"curve_{split}"][0]
            _band(ax, xs, [s[f"curve_{split}"][1] for s in mine], colors[arm], label)
        entropies = [r["curves"]["entropy"] for r in runs if r["arm"] == arm]
        steps = [r["curves"]["step"] for r in runs if r["arm"] == arm][0]
        _band(axes[1, 0], steps, [[math.nan if v is None else v for v in e] for e in entropies], colors[arm], label)
    for split, ax in zip(SPLITS, axes[0]):
        ax.set(
            title=f"{split.upper()} success (T=0.4), mean ± sd over seeds",
            xlabel="rollout",
            ylabel="success",
            ylim=(0, 1),
        )
    axes[1, 0].set(
        title="trajectory entropy epo/entropy per optimizer step, mean ± sd over seeds",
        xlabel="optimizer step",
        ylabel="nats",
    )
    ax = axes[1, 1]
    for i, arm in enumerate(arms):
        for j, split in enumerate(SPLITS):
            mean, low, high = summary["arms"][arm][f"final_{split}"]["seed_mean_ci"]
            x = i + (j - 0.5) * 0.38
            ax.bar(
                x,
                mean,
                0.34,
                color=colors[arm],
                alpha=0.7 if split == "iid" else 0.35,
                hatch=None if split == "iid" else "//",
            )
            ax.errorbar(x, mean, yerr=[[mean - low], [high - mean]], color="k", capsize=3, lw=1)
            seeds = summary["arms"][arm][f"final_{split}"]["per_seed"]
            ax.scatter([x] * len(seeds), seeds, color="k", s=8, zorder=3)
    ax.set_xticks(range(len(arms)), arms, rotation=30)
    ax.set(title="final success, IID (solid) / OOD (hatched)\nseed mean, bootstrap 95% CI; dots: seeds", ylim=(0, 1))
    for a in axes.flat:
        a.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    path = os.path.join(out, "study.png")
    figure.savefig(path)
    paths.append(path)
    return paths


def summarize_grid(results_dir: str, out: str) -> dict[str, Any]:
    """Write summary.md, summary.json and study.png of the finished runs under `results_dir` into `out`."""
    runs = load_results(results_dir)
    if not runs:
        raise FileNotFoundError(f"No run results (*_seed*.json) under {results_dir}: run the grid first.")
    os.makedirs(out, exist_ok=True)
    summary = summarize(runs)
    text = tables(summary)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    figures(summary, runs, out)
    print(text)
    return summary
