"""Evaluate a policy on an environment split: success rate with a confidence interval, turns, invalid turns.

    from trl_epo.evaluation import evaluate, save_eval_results
    result = evaluate(model, tokenizer, env="sciworld", split="ood")            # the whole split, temperature 0.4
    save_eval_results(result, "out/checkpoint-100/eval_results.json")

or from the command line (`examples/evaluate.py` and `trl-epo evaluate` are the same program):

    python examples/evaluate.py --model out/checkpoint-100 --env sciworld --split ood

Episodes are played with the same `MultiTurnRollout` that training uses (same prompts, action parsing, turn limits),
with a `ModelGenerator` that samples at a fixed temperature (the paper validates at 0.4) without top-k/top-p
truncation, so the numbers mean the same thing as the training metrics. Unlike the paper's validation (16 episodes
per split), the default is the whole split, and every result carries its episode count, its seeds and a Wilson
95% confidence interval.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .envs.base import TaskSpec
from .envs.prompting import PromptStyle


EVAL_RESULTS_NAME = "eval_results.json"
DEFAULT_MAX_TURNS = {"toy": 15, "sciworld": 30, "alfworld": 50}  # paper: 30 ScienceWorld, 50 ALFWorld


# --------------------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# Tasks of a split
# --------------------------------------------------------------------------------------------------------------------


def split_tasks(
    env: str, split: str, num_episodes: int | None = None, task_kwargs: dict[str, Any] | None = None
) -> tuple[list[TaskSpec], dict[str, Any]]:
    """The tasks to play for ``num_episodes`` episodes of a split (per seed), and how they were chosen.

    * ``num_episodes=None``: every task of the split, once (the env module's ``make_tasks(split)``).
    * Env modules whose ``make_tasks`` takes ``num_tasks`` (generated splits such as the toy env's) are asked for
      exactly ``num_episodes`` tasks.
    * Fewer than the split: a seeded random subset (splits are often ordered by task type, so the first N would
      cover only a few types), in split order.
    * More than the split: the split is cycled (each task played several times).
    """
    from .envs.registry import get_env

    entry = get_env(env)
    kwargs = dict(task_kwargs or {})
    make = entry.load().make_tasks
    if num_episodes is not None and "num_tasks" in inspect.signature(make).parameters and "num_tasks" not in kwargs:
        kwargs["num_tasks"] = num_episodes
    tasks = list(entry.make_tasks(split, **kwargs))
    if not tasks:
        raise ValueError(f"The {env!r} split {split!r} has no tasks (task arguments: {kwargs}).")
    info = {"split_size": len(tasks), "selection": "all", "task_kwargs": kwargs}
    if num_episodes is None or num_episodes == len(tasks):
        return tasks, info
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be >= 1 (or None for the whole split), got {num_episodes}.")
    if num_episodes < len(tasks):
        keep = sorted(random.Random(f"trl_epo.eval/{env}/{split}").sample(range(len(tasks)), num_episodes))
        return [tasks[i] for i in keep], {**info, "selection": "random_subset"}
    return [tasks[i % len(tasks)] for i in range(num_episodes)], {**info, "selection": "cycled"}


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------


def evaluate(
    model,
    tokenizer,
    env: str = "toy",
    split: str = "iid",
    num_episodes: int | None = None,
    temperature: float = 0.4,
    seed: int | Sequence[int] = 0,
    max_turns: int | None = None,
    max_turn_tokens: int = 512,
    max_episode_tokens: int = 8192,
    batch_size: int = 64,
    top_p: float = 1.0,
    top_k: int = 0,
    pool_backend: str = "process",
    step_timeout: float = 60.0,
    env_kwargs: dict[str, Any] | None = None,
    task_kwargs: dict[str, Any] | None = None,
    tasks: Sequence[TaskSpec] | None = None,
    action_tag: str = "action",
    prompt_style: PromptStyle | None = None,
    confidence: float = 0.95,
    progress_bar: bool = True,
    model_name: str | None = None,
    return_episodes: bool = True,
) -> dict[str, Any]:
    """Play a model on an environment split and report its success rate with a confidence interval.

    Args:
        model: a Hugging Face causal LM (a `PeftModel` works too), on the device it should run on.
        tokenizer: its tokenizer; it needs a chat template (the rollout renders prompts with it).
        env: a registered environment name (`trl_epo.envs.registry`): "toy", "sciworld" or "alfworld".
        split: "iid" or "ood" (or "train", or any split the env module offers).
        num_episodes: episodes per seed; None (default) plays every task of the split once (see `split_tasks`).
        temperature: sampling temperature (paper validation: 0.4); 0 means greedy decoding.
        seed: a sampling seed, or several: the split is played once per seed and the results are pooled (each
            seed's own result is in ``per_seed``).
        max_turns: turns per episode; default by env (toy 15, ScienceWorld 30, ALFWorld 50).
        max_turn_tokens / max_episode_tokens: new tokens per answer / completion tokens per episode.
        batch_size: episodes played at the same time (one batched `generate` call per turn for all of them).
        top_p / top_k: nucleus / top-k truncation; the defaults (1.0 / 0) disable both, overriding the model's own
            `generation_config`, so that the temperature alone sets the sampling distribution, as in training.
        pool_backend / step_timeout: the `EnvPool` backend ("process", "thread", "inline") and its per-step timeout.
        env_kwargs: constructor arguments of the env class (e.g. ScienceWorld's simplification).
        task_kwargs: extra arguments of the env module's `make_tasks(split, ...)`.
        tasks: play these `TaskSpec`s instead of a registry split (``split`` is then only a label).
        action_tag / prompt_style: the answer format and prompt layout; use the ones the model was trained with.
        confidence: level of the Wilson interval.
        model_name: recorded in the result (default: the model's `name_or_path`).
        return_episodes: include one compact record per episode under ``"episodes"``.

    Returns:
        A JSON-serialisable dict (`save_eval_results` stores it for the model card, see `to_eval_result`):

        ``env``, ``split``, ``model``: what was evaluated.
        ``num_episodes`` (int, all seeds together), ``num_tasks`` (distinct tasks per seed), ``seeds`` (list of int),
        ``num_seeds``, ``selection`` ("all", "random_subset", "cycled"), ``split_size``.
        ``success_rate`` (float in [0, 1]), ``successes`` (int), ``success_ci`` ([low, high]), ``ci_method``
        ("wilson"), ``confidence`` (0.95). Episodes whose env failed count as failures (see ``env_error_episodes``).
        ``mean_turns``, ``mean_turns_success`` (None if no success), ``invalid_turn_rate`` (invalid turns / turns),
        ``truncation_rate``, ``env_error_episodes``, ``mean_score`` (env score / 100; ScienceWorld's partial credit),
        ``generated_tokens``.
        ``settings``: temperature, top_p, top_k, max_turns, max_turn_tokens, max_episode_tokens, batch_size,
        action_tag, env_kwargs, task_kwargs.
        ``per_task``: {task name: {episodes, successes, success_rate, success_ci}}.
        ``per_seed``: [{seed, episodes, successes, success_rate, success_ci}].
        ``time_s``, ``episodes_per_s``, ``timestamp`` (UTC ISO 8601), ``trl_epo_version``.
        ``episodes`` (only with ``return_episodes``): [{task, variation, task_seed, eval_seed, won, turns,
        invalid_turns, truncated, env_error, score, generated_tokens}] — `save_eval_results` writes these to a
        separate JSON-lines file, not to ``eval_results.json``.
    """
    import torch
    from transformers import GenerationConfig

    from . import __version__
    from .envs.registry import get_env
    from .rollout import ModelGenerator, MultiTurnRollout, RolloutConfig

    seeds = [int(seed)] if isinstance(seed, int) else [int(s) for s in seed]
    if not seeds:
        raise ValueError("Give at least one seed.")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    entry = get_env(env)
    if tasks is None:
        tasks, selection = split_tasks(entry.name, split, num_episodes, task_kwargs)
    else:
        tasks = [TaskSpec.from_row(t) for t in tasks]
        selection = {"split_size": len(tasks), "selection": "given", "task_kwargs": dict(task_kwargs or {})}
    max_turns = max_turns or DEFAULT_MAX_TURNS.get(entry.name, 30)

    config = RolloutConfig(
        max_turns=max_turns,
        max_turn_tokens=max_turn_tokens,
        max_episode_tokens=max_episode_tokens,
        prompt_style=prompt_style or PromptStyle(action_tag=action_tag),
        pool_backend=pool_backend,
        pool_size=batch_size,
        step_timeout=step_timeout,
        progress_bar=False,
    )
    generator = ModelGenerator(model, tokenizer, max_completion_length=max_episode_tokens, progress_bar=False)
    generator.generation_config = GenerationConfig(
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None,
        top_k=top_k if temperature > 0 else None,
        repetition_penalty=1.0,
        eos_token_id=generator.eos_token_ids,
        pad_token_id=generator.pad_token_id,
    )
    rollout = MultiTurnRollout(entry.factory(**(env_kwargs or {})), config)
    was_training = getattr(model, "training", False)
    model.eval()
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    bar = _progress(len(tasks) * len(seeds), f"eval {entry.name}/{split}", progress_bar)
    try:
        for eval_seed in seeds:
            torch.manual_seed(eval_seed)
            random.seed(eval_seed)
            for first in range(0, len(tasks), batch_size):
                episodes, _ = rollout.play(tasks[first : first + batch_size], generator, tokenizer)
                for e in episodes:
                    records.append(_episode_record(e, eval_seed))
                bar.update(len(episodes))
                won = sum(r["won"] for r in records)
                bar.set_postfix(success=f"{won}/{len(records)}")
    finally:
        bar.close()
        rollout.close()
        if was_training:
            model.train()
    elapsed = time.perf_counter() - start

    result = summarize_episodes(records, confidence)
    result = {
        "env": entry.name,
        "split": split,
        "model": model_name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
        **result,
        "num_tasks": len({(t.task, t.variation, t.seed) for t in tasks}),
        "seeds": seeds,
        "num_seeds": len(seeds),
        "split_size": selection["split_size"],
        "selection": selection["selection"],
        "settings": {
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "max_turns": max_turns,
            "max_turn_tokens": max_turn_tokens,
            "max_episode_tokens": max_episode_tokens,
            "batch_size": batch_size,
            "action_tag": action_tag,
            "env_kwargs": dict(env_kwargs or {}),
            "task_kwargs": selection["task_kwargs"],
        },
        "per_seed": [
            {"seed": s, **success_summary([r["won"] for r in records if r["eval_seed"] == s], confidence)}
            for s in seeds
        ],
        "time_s": elapsed,
        "episodes_per_s": len(records) / elapsed if elapsed > 0 else None,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "trl_epo_version": __version__,
    }
    if return_episodes:
        result["episodes"] = records
    return result


def summarize_episodes(records: Sequence[dict[str, Any]], confidence: float = 0.95) -> dict[str, Any]:
    """Pooled statistics of episode records (as made by `evaluate`): success with CI, turns, invalid turns."""
    won = [bool(r["won"]) for r in records]
    overall = success_summary(won, confidence)
    turns = sum(r["turns"] for r in records)
    success_turns = [r["turns"] for r in records if r["won"]]
    n = max(1, len(records))
    per_task: dict[str, dict[str, Any]] = {}
    for name in sorted({r["task"] for r in records}):
        per_task[name] = success_summary([r["won"] for r in records if r["task"] == name], confidence)
    return {
        "num_episodes": overall["episodes"],
        "successes": overall["successes"],
        "success_rate": overall["success_rate"],
        "success_ci": overall["success_ci"],
        "ci_method": "wilson",
        "confidence": confidence,
        "mean_turns": turns / n,
        "mean_turns_success": sum(success_turns) / len(success_turns) if success_turns else None,
        "invalid_turn_rate": sum(r["invalid_turns"] for r in records) / max(1, turns),
        "truncation_rate": sum(r["truncated"] in ("max_turns", "token_budget") for r in records) / n,
        "env_error_episodes": sum(r["env_error"] is not None for r in records),
        "mean_score": sum(r["score"] for r in records) / n / 100.0,
        "generated_tokens": sum(r["generated_tokens"] for r in records),
        "per_task": per_task,
    }


def _episode_record(episode, eval_seed: int) -> dict[str, Any]:
    return {
        "task": episode.task.task,
        "variation": episode.task.variation,
        "task_seed": episode.task.seed,
        "eval_seed": eval_seed,
        "won": bool(episode.won),
        "turns": episode.turns,
        "invalid_turns": episode.invalid_turns,
        "truncated": episode.truncated,
        "env_error": (episode.env_error or "").splitlines()[0][:200] if episode.env_error else None,
        "score": float(episode.score),
        "generated_tokens": int(sum(episode.env_mask)),
    }


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="episode")


# --------------------------------------------------------------------------------------------------------------------
# eval_results.json
# --------------------------------------------------------------------------------------------------------------------


def to_eval_result(result: dict[str, Any]):
    """The model-card entry (`trl_epo.hub.EvalResult`) of an `evaluate` result: the headline numbers as fields, the
    rest (invalid-turn rate, per-task and per-seed results, settings, timing) under ``extra``."""
    from .hub import EvalResult

    headline = {"env", "split", "model", "success_rate", "num_episodes", "success_ci", "seeds", "mean_turns",
                "episodes", "format", "schema_version"}
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


def save_eval_results(result: dict[str, Any], path: str) -> str:
    """Add (or replace) one `evaluate` result in the `eval_results.json` at ``path`` (a file or a directory), the
    file the model card reads (`trl_epo.hub`'s format: an entry per (env, split, model), the newest wins).

    Per-episode records, when present, are written next to it as ``eval_episodes_<env>_<split>.jsonl``. Returns the
    path of the JSON file.
    """
    from .hub import save_eval_results as save_for_card

    if os.path.isdir(path) or path.endswith(os.sep):
        path = os.path.join(path, EVAL_RESULTS_NAME)
    file = save_for_card(to_eval_result(result), path)
    if result.get("episodes") is not None:
        episodes_path = os.path.join(os.path.dirname(file) or ".", f"eval_episodes_{result['env']}_{result['split']}.jsonl")
        with open(episodes_path, "w") as f:
            for record in result["episodes"]:
                f.write(json.dumps(record) + "\n")
    return file


def read_eval_results(path: str):
    """The `trl_epo.hub.EvalResult` entries of an `eval_results.json` (a file or its folder; [] when absent)."""
    from .hub import load_eval_results

    return load_eval_results(path)


# --------------------------------------------------------------------------------------------------------------------
# Loading a trained model
# --------------------------------------------------------------------------------------------------------------------


def _has_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer_config.json"))


def load_model_for_eval(path: str, device: str | None = None, dtype: str = "auto"):
    """Load a saved model directory, a trainer checkpoint directory or a PEFT (LoRA) adapter directory.

    The tokenizer comes from ``path``, else from its parent (an output directory holding `checkpoint-*` folders),
    else (adapters) from the base model. Returns ``(model, tokenizer)`` with the model in eval mode on ``device``
    (default: CUDA if available, else CPU).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory; give a saved model, checkpoint or adapter directory.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    candidates = [path, os.path.dirname(os.path.abspath(path))]
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        base = model.peft_config[next(iter(model.peft_config))].base_model_name_or_path
        if base:
            candidates.append(base)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    source = next((c for c in candidates if os.path.isdir(c) and _has_tokenizer(c)), None)
    if source is None:
        source = candidates[-1]  # a hub id of the base model (offline: must be cached)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"The tokenizer found at {source} has no chat template; the rollout needs one.")
    model.to(device).eval()
    return model, tokenizer


def training_settings(path: str) -> dict[str, Any]:
    """The env_* settings of the run that produced ``path`` (from `epo_run.json` in it or its parent), or {}."""
    for folder in (path, os.path.dirname(os.path.abspath(path))):
        candidate = os.path.join(folder, "epo_run.json")
        if os.path.exists(candidate):
            with open(candidate) as f:
                return dict(json.load(f).get("epo", {}))
    return {}


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class EvaluateArguments:
    """Arguments of `examples/evaluate.py` / `trl-epo evaluate`."""

    model: str = field(metadata={"help": "A saved model directory, a checkpoint directory or a LoRA adapter directory."})
    env: str = field(default="toy", metadata={"help": "Environment: 'toy', 'sciworld' or 'alfworld'."})
    split: list[str] = field(
        default_factory=lambda: ["iid"], metadata={"help": "Split(s) to evaluate, e.g. `--split iid ood`."}
    )
    num_episodes: int | None = field(
        default=None, metadata={"help": "Episodes per split and seed (default: the whole split)."}
    )
    temperature: float = field(default=0.4, metadata={"help": "Sampling temperature (paper validation: 0.4)."})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Sampling seed(s), e.g. `--seeds 0 1 2`."})
    max_turns: int | None = field(
        default=None, metadata={"help": "Turns per episode (default: the training run's, else toy 15 / sciworld 30 / "
                                        "alfworld 50)."}
    )
    max_turn_tokens: int | None = field(
        default=None, metadata={"help": "New tokens per answer (default: the training run's, else 512)."}
    )
    max_episode_tokens: int = field(default=8192, metadata={"help": "Completion tokens per episode."})
    batch_size: int = field(default=64, metadata={"help": "Episodes played at the same time."})
    pool_backend: str = field(
        default="process", metadata={"help": "Env pool backend.", "choices": ["process", "thread", "inline"]}
    )
    env_kwargs: str | None = field(
        default=None, metadata={"help": 'Env constructor arguments as JSON, e.g. \'{"simplification": "easy"}\'.'}
    )
    task_kwargs: str | None = field(default=None, metadata={"help": "Extra `make_tasks` arguments as JSON."})
    output: str | None = field(
        default=None,
        metadata={"help": f"Where to add the results (default: <model>/{EVAL_RESULTS_NAME}); a file or directory."},
    )
    device: str | None = field(default=None, metadata={"help": "Device (default: cuda if available, else cpu)."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: 'auto', 'float32', 'bfloat16', 'float16'."})


def run_evaluation(args: EvaluateArguments) -> list[dict[str, Any]]:
    """Evaluate `args.model` on each requested split and save the results; returns the result dicts."""
    model, tokenizer = load_model_for_eval(args.model, device=args.device, dtype=args.dtype)
    trained = training_settings(args.model)
    style = PromptStyle(show_admissible_actions=trained.get("env_show_admissible_actions", True))
    if trained.get("env_instruction"):
        style = PromptStyle(instruction=trained["env_instruction"], show_admissible_actions=style.show_admissible_actions)
    output = args.output or os.path.join(args.model, EVAL_RESULTS_NAME)
    results = []
    for split in args.split:
        result = evaluate(
            model,
            tokenizer,
            env=args.env,
            split=split,
            num_episodes=args.num_episodes,
            temperature=args.temperature,
            seed=args.seeds,
            max_turns=args.max_turns or trained.get("env_max_turns"),
            max_turn_tokens=args.max_turn_tokens or trained.get("env_max_turn_tokens", 512),
            max_episode_tokens=args.max_episode_tokens,
            batch_size=args.batch_size,
            pool_backend=args.pool_backend,
            env_kwargs=json.loads(args.env_kwargs) if args.env_kwargs else None,
            task_kwargs=json.loads(args.task_kwargs) if args.task_kwargs else None,
            action_tag=trained.get("env_action_tag", "action"),
            prompt_style=style,
            model_name=args.model,
        )
        path = save_eval_results(result, output)
        low, high = result["success_ci"]
        print(
            f"{result['env']}/{split}: success {result['success_rate']:.3f} "
            f"(95% CI {low:.3f}-{high:.3f}, {result['successes']}/{result['num_episodes']} episodes, "
            f"seeds {result['seeds']}), mean turns {result['mean_turns']:.2f}, "
            f"invalid-turn rate {result['invalid_turn_rate']:.3f} -> {path}"
        )
        results.append(result)
    return results


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    from trl import TrlParser

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = TrlParser(EvaluateArguments, prog="trl-epo evaluate")
    (args,) = parser.parse_args_and_config(args=list(argv) if argv is not None else None)
    return run_evaluation(args)
