"""GRPO vs EPO on a controlled multi-turn task, with identical budgets and several seeds.

    python benchmarks/compare_grpo_epo.py                                  # the default setting (<= 60 min, 2 CPU cores)
    python benchmarks/compare_grpo_epo.py --tiny --output_dir /tmp/cmp     # seconds: a smoke test (run by the tests)

Protocol:

1. A tiny Qwen2-architecture model (`trl_epo.tiny`, byte-level BPE trained on the task's own text) is SFT-trained
   with TRL's `SFTTrainer` on expert trajectories of the toy env (`trl_epo.envs.toy.expert_actions`), rendered in
   exactly the chat format the rollout uses (same system instruction, task line, observation text; one
   prompt-completion row per expert turn, loss on the answer only). SFT stops early (`sft_steps`), so the policy
   starts at a low but non-zero success rate.
2. From that same checkpoint, for every seed: GRPO (`EPOTrainer` with `epo_entropy_coef=0`, i.e. TRL's GRPO loss
   exactly) and EPO (the same trainer and budget with the EPO terms on) train for `rl_steps` optimizer steps on
   multi-turn toy episodes (sparse 0/1 reward at the end).
3. Every final policy is evaluated with `trl_epo.evaluation.evaluate` on the toy IID and OOD splits (OOD: 5-6 rooms,
   longer than anything trained on) at temperature 0.4, with Wilson 95% intervals.

Outputs in `output_dir`: `results.json` (settings, machine load, per-run curves and evaluations, per-method summary),
`compare.png` (success curves, entropy curves, step-to-step entropy changes, final IID/OOD success with CIs),
`runs/<method>_seed<k>/` (each run's trainer_state.json, epo_run.json, eval_results.json, plots/), and `sft/`.

The variance of step-to-step entropy changes is Var_k(H_{k+1} - H_k) over the optimizer steps of one run, where H_k is
the logged trajectory-level entropy `epo/entropy` of step k (the paper's "entropy smoothness"); it is reported per
seed and as mean +- std over seeds.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

from transformers import TrainerCallback  # noqa: E402


@dataclass
class CompareArguments:
    output_dir: str = field(default="benchmarks/results/compare_grpo_epo", metadata={"help": "Where results go."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "RL seeds (>= 3 for the report)."})
    methods: list[str] = field(default_factory=lambda: ["grpo", "epo"], metadata={"help": "grpo and/or epo."})
    parallel: int = field(default=2, metadata={"help": "RL runs trained at the same time (one process each)."})
    threads: int = field(default=1, metadata={"help": "torch intra-op threads per process."})
    # model and task
    hidden_size: int = field(default=128, metadata={"help": "Tiny model width."})
    num_layers: int = field(default=2, metadata={"help": "Tiny model depth."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads."})
    vocab_size: int = field(default=1024, metadata={"help": "BPE vocabulary trained on the task's text."})
    max_turns: int = field(default=10, metadata={"help": "Turns per training episode (train layouts need <= 8)."})
    eval_max_turns: int = field(default=12, metadata={"help": "Turns per evaluation episode (OOD needs <= 12)."})
    max_turn_tokens: int = field(default=16, metadata={"help": "New tokens per answer."})
    show_admissible_actions: bool = field(
        default=True, metadata={"help": "List the admissible actions in observations (longer contexts)."}
    )
    # SFT
    sft_tasks: int = field(default=400, metadata={"help": "Expert trajectories (train split) for SFT."})
    sft_steps: int = field(default=68, metadata={"help": "SFT optimizer steps (early stop: low start success)."})
    sft_batch_size: int = field(default=16, metadata={"help": "SFT batch size (prompt-completion rows)."})
    sft_learning_rate: float = field(default=1e-3, metadata={"help": "SFT learning rate (constant)."})
    # RL
    rl_steps: int = field(default=60, metadata={"help": "RL optimizer steps per run (identical for all methods)."})
    rl_tasks_per_step: int = field(default=4, metadata={"help": "Tasks (GRPO groups) per optimizer step."})
    num_generations: int = field(default=8, metadata={"help": "Episodes per task (GRPO group size)."})
    rl_learning_rate: float = field(default=3e-4, metadata={"help": "RL learning rate (constant)."})
    rl_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature in training (paper: 1.0)."})
    rl_train_tasks: int = field(default=1024, metadata={"help": "Distinct train-split tasks in the RL dataset."})
    loss_type: str = field(default="dapo", metadata={"help": "TRL GRPO loss type (the same for both methods)."})
    # EPO (the 'grpo' arm uses epo_entropy_coef=0 and nothing else changes)
    epo_entropy_coef: float = field(default=1e-3, metadata={"help": "lambda of the EPO arm (paper: 1e-3)."})
    epo_smoothing_alpha: float = field(default=0.1, metadata={"help": "alpha of the EPO arm (paper: 0.1 ALFWorld)."})
    epo_kappa_low: float = field(default=0.0, metadata={"help": "kappa_l of the EPO arm (paper: 0)."})
    epo_kappa_high: float = field(default=2.0, metadata={"help": "kappa_r of the EPO arm (paper: 2)."})
    epo_reference: str = field(default="cumulative", metadata={"help": "Entropy reference of the EPO arm."})
    # evaluation
    eval_episodes: int = field(default=128, metadata={"help": "Episodes per split (IID and OOD) per final policy."})
    eval_temperature: float = field(default=0.4, metadata={"help": "Evaluation temperature (paper: 0.4)."})
    time_budget_minutes: float = field(default=60.0, metadata={"help": "Warn when the whole run takes longer."})
    resummarize: bool = field(
        default=False, metadata={"help": "Only rebuild results.json tables and compare.png of a finished output_dir."}
    )
    tiny: bool = field(default=False, metadata={"help": "Seconds-long smoke setting (overrides most sizes)."})

    def apply_tiny(self) -> None:
        self.seeds = self.seeds[:1]
        self.parallel = 1
        self.hidden_size, self.num_layers, self.num_heads, self.vocab_size = 32, 1, 2, 400
        self.max_turns, self.eval_max_turns, self.max_turn_tokens = 2, 2, 6
        self.sft_tasks, self.sft_steps, self.sft_batch_size = 6, 2, 4
        self.rl_steps, self.rl_tasks_per_step, self.num_generations, self.rl_train_tasks = 2, 1, 2, 4
        self.eval_episodes = 3


# --------------------------------------------------------------------------------------------------------------------
# Expert data in the rollout's chat format
# --------------------------------------------------------------------------------------------------------------------


def prompt_style(args: CompareArguments):
    from trl_epo.envs.prompting import PromptStyle

    return PromptStyle(show_admissible_actions=args.show_admissible_actions)


def expert_conversation(task, style=None) -> list[dict[str, str]]:
    """The conversation the rollout would record if the model answered every turn with the expert action, as
    `<action>...</action>` (same system message, first user message and observation texts as `MultiTurnRollout`)."""
    from trl_epo.envs.prompting import PromptStyle
    from trl_epo.envs.prompting import expert_conversation as conversation
    from trl_epo.envs.toy import ToyEnv, expert_actions

    env = ToyEnv()
    result = env.reset(task)
    description = result.info.get("task_description", "")
    steps = []
    for action in expert_actions(task):
        steps.append((result, action))
        result = env.step(action)
        if result.done:
            break
    if not result.won:  # pragma: no cover - expert_actions is a solution by construction
        raise RuntimeError(f"The expert did not solve {task}.")
    return conversation(style or PromptStyle(), description, steps)


def sft_rows(conversations) -> dict[str, list]:
    """One conversational prompt-completion row per expert turn (TRL computes the loss on the completion only)."""
    rows = {"prompt": [], "completion": []}
    for messages in conversations:
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                rows["prompt"].append(messages[:i])
                rows["completion"].append([message])
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------------------------


def _quiet():
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()


class _Progress(TrainerCallback):
    """Prints a one-line status every `every` optimizer steps."""

    def __init__(self, name: str, every: int):
        self.name, self.every, self.start = name, every, time.perf_counter()
        self.recent: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "rollout/success_rate" in logs:
            self.recent.append(logs)
        if state.global_step % self.every == 0 and self.recent:
            success = statistics.fmean(h["rollout/success_rate"] for h in self.recent)
            entropy = statistics.fmean(h.get("epo/entropy", math.nan) for h in self.recent)
            print(
                f"[compare]   {self.name}: step {state.global_step}/{state.max_steps}, train success {success:.3f}, "
                f"entropy {entropy:.3f}, {time.perf_counter() - self.start:.0f}s",
                flush=True,
            )
            self.recent = []


def _silence_log_printing(trainer) -> None:
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # logs still go to trainer.state.log_history


def run_sft(args: CompareArguments, out: str) -> dict:
    """Build the tokenizer and the tiny model, SFT it on expert trajectories, save it to `out`."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from trl_epo.envs.toy import make_tasks
    from trl_epo.tiny import build_tiny_model, build_tiny_tokenizer

    torch.set_num_threads(args.threads)
    style = prompt_style(args)
    conversations = [expert_conversation(t, style) for t in make_tasks("train", args.sft_tasks, seed=1)]
    base = build_tiny_tokenizer()
    texts = [base.apply_chat_template(c, tokenize=False) for c in conversations[:200]]
    tokenizer = build_tiny_tokenizer(texts, vocab_size=args.vocab_size)
    model = build_tiny_model(
        tokenizer, hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads, seed=0
    )
    dataset = Dataset.from_dict(sft_rows(conversations)).shuffle(seed=0)
    config = SFTConfig(
        output_dir=os.path.join(out, "trainer"),
        max_steps=args.sft_steps,
        per_device_train_batch_size=args.sft_batch_size,
        learning_rate=args.sft_learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        max_length=2048,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer = SFTTrainer(model, args=config, train_dataset=dataset, processing_class=tokenizer)
    _silence_log_printing(trainer)
    trainer.train()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(os.path.join(out, "trainer"), ignore_errors=True)
    log = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "time_s": elapsed,
        "cpu_s": cpu,
        "rows": len(dataset),
        "trajectories": len(conversations),
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": log[-1]["loss"] if log else None,
        "tokens_per_trajectory": sum(len(tokenizer(t)["input_ids"]) for t in texts) / max(1, len(texts)),
    }


def evaluate_splits(model, tokenizer, args: CompareArguments, save_to: str | None = None) -> dict:
    from trl_epo.evaluation import evaluate
    from trl_epo.results import save_eval_results

    results = {}
    for split in ("iid", "ood"):
        result = evaluate(
            model,
            tokenizer,
            env="toy",
            split=split,
            num_episodes=args.eval_episodes,
            temperature=args.eval_temperature,
            seed=0,
            max_turns=args.eval_max_turns,
            max_turn_tokens=args.max_turn_tokens,
            max_episode_tokens=4096,
            batch_size=args.eval_episodes,
            pool_backend="inline",
            prompt_style=prompt_style(args),
            progress_bar=False,
        )
        if save_to:
            save_eval_results(result, save_to)
        results[split] = {
            k: result[k]
            for k in (
                "num_episodes",
                "successes",
                "success_rate",
                "success_ci",
                "mean_turns",
                "invalid_turn_rate",
                "seeds",
                "per_task",
            )
        }
    return results


def run_rl(spec: dict) -> dict:
    """One RL run (a method and a seed) from the SFT checkpoint; evaluated at the end. Runs in a worker process."""
    _quiet()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_epo import EPOConfig, EPOTrainer
    from trl_epo.envs.toy import ToyEnv, make_dataset
    from trl_epo.plotting import plot_run

    args = CompareArguments(**spec["args"])
    method, seed, out = spec["method"], spec["seed"], spec["output_dir"]
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(spec["sft_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["sft_dir"])
    epo = method == "epo"
    config = EPOConfig(
        output_dir=out,
        max_steps=args.rl_steps,
        per_device_train_batch_size=args.rl_tasks_per_step * args.num_generations,
        num_generations=args.num_generations,
        max_completion_length=4096,
        learning_rate=args.rl_learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        temperature=args.rl_temperature,
        loss_type=args.loss_type,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        seed=seed,
        gradient_checkpointing=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        env_max_turns=args.max_turns,
        env_max_turn_tokens=args.max_turn_tokens,
        env_pool_backend="inline",
        env_show_admissible_actions=args.show_admissible_actions,
        env_log_episodes=False,
        epo_entropy_coef=args.epo_entropy_coef if epo else 0.0,
        epo_smoothing_alpha=args.epo_smoothing_alpha,
        epo_kappa_low=args.epo_kappa_low,
        epo_kappa_high=args.epo_kappa_high,
        epo_reference=args.epo_reference,
    )
    dataset = make_dataset("train", args.rl_train_tasks, seed=1000 + seed)
    trainer = EPOTrainer(model, args=config, train_dataset=dataset, processing_class=tokenizer, env_factory=ToyEnv)
    _silence_log_printing(trainer)
    trainer.add_callback(_Progress(f"{method} seed {seed}", every=max(1, args.rl_steps // 6)))
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    train_time, train_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    trainer.save_model(out)
    history = [h for h in trainer.state.log_history if "loss" in h]
    plot_run(out)
    start, cpu_start = time.perf_counter(), time.process_time()
    evaluation = evaluate_splits(trainer.model, tokenizer, args, save_to=out)
    return {
        "train_cpu_s": train_cpu,
        "eval_cpu_s": time.process_time() - cpu_start,
        "method": method,
        "seed": seed,
        "output_dir": out,
        "train_time_s": train_time,
        "eval_time_s": time.perf_counter() - start,
        "steps": [int(h["step"]) for h in history],
        "success": [float(h.get("rollout/success_rate", math.nan)) for h in history],
        "entropy": [float(h.get("epo/entropy", math.nan)) for h in history],
        "step_entropy": [float(h.get("epo/step_entropy", math.nan)) for h in history],
        "mean_turns": [float(h.get("rollout/mean_turns", math.nan)) for h in history],
        "out_of_corridor_frac": [float(h.get("epo/out_of_corridor_frac", math.nan)) for h in history],
        "eval": evaluation,
    }


# --------------------------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------------------------


def entropy_change_variance(entropy) -> float:
    """Var_k(H_{k+1} - H_k) (population variance of the step-to-step changes); NaN with fewer than 3 points."""
    values = [v for v in entropy if not math.isnan(v)]
    deltas = [b - a for a, b in zip(values, values[1:])]
    return statistics.pvariance(deltas) if len(deltas) >= 2 else math.nan


def _mean_std(values) -> dict:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _methods(runs: list[dict]) -> list[str]:
    order = {"grpo": 0, "epo": 1}
    return sorted({r["method"] for r in runs}, key=lambda m: (order.get(m, 2), m))


def summarize(runs: list[dict]) -> dict:
    from trl_epo.results import wilson_interval

    summary = {}
    for method in _methods(runs):
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
        entry = {"seeds": [r["seed"] for r in mine]}
        for split in ("iid", "ood"):
            k = sum(r["eval"][split]["successes"] for r in mine)
            n = sum(r["eval"][split]["num_episodes"] for r in mine)
            entry[f"final_{split}"] = {
                "pooled_success_rate": k / n if n else math.nan,
                "pooled_ci": list(wilson_interval(k, n)),
                "successes": k,
                "episodes": n,
                "per_seed": [r["eval"][split]["success_rate"] for r in mine],
                "across_seeds": _mean_std([r["eval"][split]["success_rate"] for r in mine]),
            }
        variances = [entropy_change_variance(r["entropy"]) for r in mine]
        entry["entropy_change_variance"] = {"per_seed": variances, **_mean_std(variances)}
        quarter = max(1, len(mine[0]["success"]) // 4) if mine else 1
        entry["train_success_last_quarter"] = _mean_std([statistics.fmean(r["success"][-quarter:]) for r in mine])
        entry["train_success_mean"] = _mean_std([statistics.fmean(r["success"]) for r in mine])
        entry["final_entropy"] = _mean_std([statistics.fmean(r["entropy"][-quarter:]) for r in mine])
        entry["train_time_s"] = _mean_std([r["train_time_s"] for r in mine])
        summary[method] = entry
    return summary


def markdown_table(result: dict) -> str:
    def fmt_ci(entry):
        low, high = entry["pooled_ci"]
        seeds = ", ".join(f"{v:.2f}" for v in entry["per_seed"])
        return f"{entry['pooled_success_rate']:.3f} [{low:.3f}, {high:.3f}] (seeds: {seeds})"

    lines = [
        "| method | IID success, pooled [95% Wilson CI] | OOD success, pooled [95% Wilson CI] | "
        "Var(ΔH) per step, mean ± std | train success, last 25% of steps | final entropy |",
        "|---|---|---|---|---|---|",
    ]
    sft = result.get("sft", {}).get("eval")
    if sft:
        lines.append(
            f"| SFT start | {sft['iid']['success_rate']:.3f} [{sft['iid']['success_ci'][0]:.3f}, "
            f"{sft['iid']['success_ci'][1]:.3f}] | {sft['ood']['success_rate']:.3f} [{sft['ood']['success_ci'][0]:.3f}, "
            f"{sft['ood']['success_ci'][1]:.3f}] | | | |"
        )
    for method, s in result["summary"].items():
        var = s["entropy_change_variance"]
        lines.append(
            f"| {method} | {fmt_ci(s['final_iid'])} | {fmt_ci(s['final_ood'])} | {var['mean']:.2e} ± {var['std']:.2e} "
            f"| {s['train_success_last_quarter']['mean']:.3f} ± {s['train_success_last_quarter']['std']:.3f} "
            f"| {s['final_entropy']['mean']:.3f} ± {s['final_entropy']['std']:.3f} |"
        )
    return "\n".join(lines)


def per_task_table(result: dict) -> str:
    """Successes per task type (IID / OOD) of the SFT start and of every run."""
    rows = [("SFT start", result.get("sft", {}).get("eval"))] + [
        (f"{r['method']} seed {r['seed']}", r["eval"]) for r in result["runs"]
    ]
    tasks = sorted({t for _, e in rows if e for split in ("iid", "ood") for t in e[split].get("per_task", {})})
    if not tasks:
        return ""
    header = "| run | " + " | ".join(f"{t} IID | {t} OOD" for t in tasks) + " |"
    lines = [header, "|---" * (1 + 2 * len(tasks)) + "|"]
    for name, e in rows:
        if not e:
            continue
        cells = []
        for t in tasks:
            for split in ("iid", "ood"):
                c = e[split].get("per_task", {}).get(t)
                cells.append(f"{c['successes']}/{c['episodes']}" if c else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_comparison(result: dict, path: str) -> None:
    from matplotlib.figure import Figure

    from trl_epo.plotting import rolling_mean

    colors = {"grpo": "tab:blue", "epo": "tab:red"}
    figure = Figure(figsize=(13, 9), dpi=110, layout="constrained")
    axes = figure.subplots(2, 2)
    runs = result["runs"]
    for method in _methods(runs):
        mine = [r for r in runs if r["method"] == method]
        color = colors.get(method, None)
        for key, ax, window in (("success", axes[0, 0], 5), ("entropy", axes[0, 1], 1)):
            curves = []
            for r in mine:
                values = rolling_mean(r[key], window) if window > 1 else r[key]
                ax.plot(r["steps"], values, color=color, alpha=0.3, lw=0.8)
                curves.append(values)
            length = min(len(c) for c in curves)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(length)]
            ax.plot(
                mine[0]["steps"][:length], mean, color=color, lw=2.2, label=f"{method} (mean of {len(mine)} seeds)"
            )
        for r in mine:
            deltas = [b - a for a, b in zip(r["entropy"], r["entropy"][1:])]
            axes[1, 0].plot(
                r["steps"][1:], deltas, color=color, alpha=0.5, lw=0.9, label=f"{method}" if r is mine[0] else None
            )
    axes[0, 0].set_title("training success rate (rollouts at T=1.0)\nmoving mean of 5 steps; thin lines: seeds")
    axes[0, 0].set_ylabel("success rate")
    axes[0, 1].set_title("trajectory-level entropy L_H of the action tokens\nthin lines: seeds")
    axes[0, 1].set_ylabel("nats")
    axes[1, 0].set_title("step-to-step entropy change H_{k+1} - H_k")
    axes[1, 0].set_ylabel("nats")
    axes[1, 0].axhline(0, color="0.5", lw=0.8)
    for ax in (axes[0, 0], axes[0, 1], axes[1, 0]):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    ax = axes[1, 1]
    labels, positions = [], []
    summary = result["summary"]
    sft = result.get("sft", {}).get("eval")
    groups = ([("SFT start", None)] if sft else []) + [(m, m) for m in summary]
    width = 0.38
    for g, (label, method) in enumerate(groups):
        for s, split in enumerate(("iid", "ood")):
            x = g + (s - 0.5) * width
            if method is None:
                rate, (low, high), seeds = sft[split]["success_rate"], sft[split]["success_ci"], []
            else:
                e = summary[method][f"final_{split}"]
                rate, (low, high), seeds = e["pooled_success_rate"], e["pooled_ci"], e["per_seed"]
            color = "0.6" if method is None else colors.get(method)
            ax.bar(
                x,
                rate,
                width * 0.9,
                color=color,
                alpha=0.55 if split == "iid" else 0.3,
                hatch=None if split == "iid" else "//",
                edgecolor=color,
            )
            ax.errorbar(x, rate, yerr=[[rate - low], [high - rate]], color="k", capsize=4, lw=1)
            ax.scatter([x] * len(seeds), seeds, color="k", s=12, zorder=3)
            ax.text(x, high + 0.02, f"{rate:.2f}", ha="center", fontsize=8)
        labels.append(label)
        positions.append(g)
    ax.set_xticks(positions, labels)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("success rate (T=0.4)")
    ax.set_title(
        "final success at T=0.4: IID (solid) / OOD (hatched)\npooled over seeds with 95% Wilson CI; dots: seeds"
    )
    ax.grid(alpha=0.3, axis="y")
    figure.suptitle(result.get("title", "GRPO vs EPO"), fontsize=11)
    figure.savefig(path)


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def run_comparison(args: CompareArguments) -> dict:
    if args.resummarize:
        return resummarize(args.output_dir)
    if args.tiny:
        args.apply_tiny()
    for method in args.methods:
        if method not in ("grpo", "epo"):
            raise ValueError(f"Unknown method {method!r}; use 'grpo' and/or 'epo'.")
    _quiet()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    begin = time.perf_counter()
    machine = {
        "cpu_count": os.cpu_count(),
        "load_average_start": load_average(),
        "threads": args.threads,
        "parallel": args.parallel,
        "torch": torch.__version__,
    }

    sft_dir = os.path.join(args.output_dir, "sft")
    print(f"[compare] SFT: {args.sft_tasks} expert trajectories, {args.sft_steps} steps", flush=True)
    sft = run_sft(args, sft_dir)
    model = AutoModelForCausalLM.from_pretrained(sft_dir)
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    sft["eval"] = evaluate_splits(model, tokenizer, args, save_to=sft_dir)
    print(
        f"[compare] SFT done in {sft['time_s']:.0f}s: IID {sft['eval']['iid']['success_rate']:.3f}, "
        f"OOD {sft['eval']['ood']['success_rate']:.3f}",
        flush=True,
    )

    specs = [
        {
            "args": asdict(args),
            "method": method,
            "seed": seed,
            "sft_dir": sft_dir,
            "output_dir": os.path.join(args.output_dir, "runs", f"{method}_seed{seed}"),
        }
        for seed in args.seeds
        for method in args.methods
    ]
    runs = []
    if args.parallel <= 1:
        for spec in specs:
            runs.append(run_rl(spec))
            _report_run(runs[-1], begin)
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=args.parallel, mp_context=context) as pool:
            futures = [pool.submit(run_rl, spec) for spec in specs]
            for future in concurrent.futures.as_completed(futures):
                runs.append(future.result())
                _report_run(runs[-1], begin)
    runs.sort(key=lambda r: (r["seed"], r["method"]))

    elapsed = time.perf_counter() - begin
    machine["load_average_end"] = load_average()
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    machine["cpu_seconds"] = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    machine["quiet_machine_estimate_min"] = (
        machine["cpu_seconds"] / max(1, min(args.parallel, os.cpu_count() or 1)) / 60
    )
    result = {
        "title": (
            f"GRPO vs EPO (lambda={args.epo_entropy_coef:g}, alpha={args.epo_smoothing_alpha:g}, "
            f"kappa=[{args.epo_kappa_low:g}, {args.epo_kappa_high:g}]), toy env, {args.rl_steps} steps x "
            f"{args.rl_tasks_per_step}x{args.num_generations} episodes, seeds {args.seeds}"
        ),
        "settings": asdict(args),
        "machine": machine,
        "total_time_s": elapsed,
        "sft": sft,
        "runs": runs,
        "summary": summarize(runs),
    }
    write_outputs(result, args.output_dir)
    print(
        f"[compare] total {elapsed / 60:.1f} min wall, {machine['cpu_seconds'] / 60:.1f} CPU-min (about "
        f"{machine['quiet_machine_estimate_min']:.0f} min on {args.parallel} idle cores); load average start "
        f"{machine['load_average_start']}, end {machine['load_average_end']} -> {args.output_dir}/results.json, "
        "compare.png"
    )
    if elapsed > args.time_budget_minutes * 60:
        print(f"[compare] WARNING: took longer than the {args.time_budget_minutes:g}-minute budget.", flush=True)
    return result


def write_outputs(result: dict, output_dir: str) -> None:
    """results.json (with the markdown tables) and compare.png; prints the tables."""
    result["summary"] = summarize(result["runs"])
    result["table"] = markdown_table(result)
    result["per_task_table"] = per_task_table(result)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot_comparison(result, os.path.join(output_dir, "compare.png"))
    print(result["table"])
    print(result["per_task_table"])


def resummarize(output_dir: str) -> dict:
    """Rebuild the summary, tables and figure of a finished comparison from its files (no training): the runs'
    `eval_results.json` files fill in anything the results.json lacks (e.g. per-task counts)."""
    from trl_epo.results import load_eval_results as read_eval_results

    with open(os.path.join(output_dir, "results.json")) as f:
        result = json.load(f)
    folders = [("sft", os.path.join(output_dir, "sft"))] + [(r, r["output_dir"]) for r in result["runs"]]
    for owner, folder in folders:
        evaluation = result["sft"]["eval"] if owner == "sft" else owner["eval"]
        for saved in read_eval_results(os.path.join(folder, "eval_results.json")):
            evaluation.setdefault(saved.split, {}).setdefault("per_task", saved.extra.get("per_task"))
    write_outputs(result, output_dir)
    return result


def _report_run(run: dict, begin: float) -> None:
    iid, ood = run["eval"]["iid"], run["eval"]["ood"]
    print(
        f"[compare] {run['method']} seed {run['seed']}: train {run['train_time_s']:.0f}s, IID {iid['success_rate']:.3f}"
        f", OOD {ood['success_rate']:.3f}, Var(dH) {entropy_change_variance(run['entropy']):.2e} "
        f"(elapsed {(time.perf_counter() - begin) / 60:.1f} min)",
        flush=True,
    )


def main(argv=None) -> dict:
    from trl import TrlParser

    parser = TrlParser(CompareArguments)
    (args,) = parser.parse_args_and_config(args=list(argv) if argv is not None else None)
    return run_comparison(args)


if __name__ == "__main__":
    main(sys.argv[1:])
