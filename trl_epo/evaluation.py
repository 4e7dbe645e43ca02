"""Evaluate a policy on an environment split: success rate with a Wilson interval, turns, invalid turns.

There is one evaluation path. `play_episodes` plays a split with the training rollout (`MultiTurnRollout`: the same
prompts, action parsing and turn limits as training), sharded over processes; `evaluation_result` turns the episodes
into the result dict. `evaluate(model, tokenizer, ...)` is that path for a model outside training (the CLI
`trl-epo evaluate` calls it with the settings the run recorded in `epo_run.json`), and `EPOTrainer.evaluate` is the
same path during training (`eval_strategy` / `eval_steps`, the eval splits given as `eval_dataset`, its own
temperature `env_eval_temperature`), logged as `eval/<split>/success_rate`.

Sampling: a fixed temperature (the paper validates at 0.4) without top-k/top-p truncation. Unlike the paper's
validation (16 episodes per split), every result carries its episode count, its seeds and a Wilson 95% interval.
"""

from __future__ import annotations

import contextlib
import inspect
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from .envs.base import TaskSpec
from .envs.registry import get_env
from .results import success_summary
from .rollout.config import RolloutConfig
from .seeding import derive_seed, isolated_rng


def split_tasks(
    env: str, split: str, num_episodes: int | None = None, task_kwargs: dict[str, Any] | None = None
) -> tuple[list[TaskSpec], dict[str, Any]]:
    """The tasks to play for ``num_episodes`` episodes of a split (per seed), and how they were chosen.

    * ``num_episodes=None``: every task of the split, once (the env module's ``make_tasks(split)``).
    * Env modules whose ``make_tasks`` takes ``num_tasks`` (generated splits such as the toy env's) are asked for
      exactly ``num_episodes`` tasks.
    * Fewer than the split: a seeded random subset (splits are often ordered by task type), in split order.
    * More than the split: the split is cycled (each task played several times).
    """
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


def play_episodes(
    rollout,
    generator,
    tokenizer,
    tasks: Sequence[TaskSpec],
    seeds: Sequence[int],
    batch_size: int,
    process_index: int = 0,
    num_processes: int = 1,
    gather: Callable[[list], list] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Play every task once per seed with `rollout` and `generator`; returns one record per episode (all processes'
    records when `gather` is given). With several processes, task i is played by process i % num_processes, and
    every process plays the same number of batches (a short shard is padded with repeats whose records are
    dropped), so collective generators (ZeRO-3, vLLM server) stay in step.

    Randomness: each (eval seed, process) samples from its own stream (`derive_seed`), on a forked copy of the global
    RNGs (`isolated_rng`), and a generator with `seed_sampling` (vLLM) seeds its requests from it; the caller's RNG
    states are the same after the evaluation as before it."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    per_process = -(-len(tasks) // num_processes)
    mine = [(i, t) for i, t in enumerate(tasks) if i % num_processes == process_index]
    padded = mine + [mine[j % len(mine)] if mine else (-1, tasks[0]) for j in range(per_process - len(mine))]
    records: list[dict[str, Any]] = []
    seed_engine = getattr(generator, "seed_sampling", None)  # vLLM: per-request seeds
    for eval_seed in seeds:
        process_seed = derive_seed(eval_seed, process_index)
        # The training RNG streams are left exactly as they were (`trl_epo.seeding`).
        # vLLM gets the eval seed itself: its request ids carry the process, and a TP group's ranks must agree.
        with isolated_rng(process_seed), _seeded_engine(seed_engine, eval_seed):
            for first in range(0, len(padded), batch_size):
                chunk = padded[first : first + batch_size]
                batch = rollout.play([t for _, t in chunk], generator, tokenizer)
                for j, ((index, _), episode) in enumerate(zip(chunk, batch.episodes)):
                    if first + j < len(mine):  # not a padding repeat
                        records.append(episode_record(episode, eval_seed, index))
                if progress is not None:
                    progress(len(records), sum(r["won"] for r in records))
    if gather is not None:
        records = [r for part in gather(records) for r in (part if isinstance(part, list) else [part])]
    return sorted(records, key=lambda r: (r["eval_seed"], r["index"]))


@contextlib.contextmanager
def _seeded_engine(seed_sampling, seed: int):
    """Seed a generator's own sampler (vLLM's per-request seeds) for the block, and unseed it afterwards."""
    if seed_sampling is None:
        yield
        return
    seed_sampling(seed)
    try:
        yield
    finally:
        seed_sampling(None)


def episode_record(episode, eval_seed: int, index: int) -> dict[str, Any]:
    """The compact per-episode record of an evaluation."""
    return {
        "index": index,
        "task": episode.task.task,
        "variation": episode.task.variation,
        "task_seed": episode.task.seed,
        "eval_seed": eval_seed,
        "won": bool(episode.won),
        "won_paper": bool(episode.info.get("won_paper", episode.won)),
        "turns": episode.turns,
        "invalid_turns": episode.invalid_turns,
        "truncated": episode.truncated,
        "env_error": (episode.env_error or "").splitlines()[0][:200] if episode.env_error else None,
        "score": float(episode.score),
        "generated_tokens": int(sum(episode.env_mask)),
    }


def summarize_episodes(records: Sequence[dict[str, Any]], confidence: float = 0.95) -> dict[str, Any]:
    """Pooled statistics of episode records: success with CI, turns, invalid turns, per task."""
    overall = success_summary([bool(r["won"]) for r in records], confidence)
    turns = sum(r["turns"] for r in records)
    success_turns = [r["turns"] for r in records if r["won"]]
    n = max(1, len(records))
    per_task = {
        name: success_summary([r["won"] for r in records if r["task"] == name], confidence)
        for name in sorted({r["task"] for r in records})
    }
    summary = {
        "num_episodes": overall["episodes"],
        "successes": overall["successes"],
        "success_rate": overall["success_rate"],
        "success_ci": overall["success_ci"],
        "ci_method": "wilson",
        "confidence": confidence,
        "mean_turns": turns / n,
        "mean_turns_success": sum(success_turns) / len(success_turns) if success_turns else None,
        "invalid_turn_rate": sum(r["invalid_turns"] for r in records) / max(1, turns),
        "truncation_rate": sum(r["truncated"] in ("max_turns", "token_budget", "context_limit") for r in records) / n,
        "env_error_episodes": sum(r["env_error"] is not None for r in records),
        "mean_score": sum(r["score"] for r in records) / n / 100.0,
        "generated_tokens": sum(r["generated_tokens"] for r in records),
        "per_task": per_task,
    }
    if any(r.get("won_paper") != r["won"] for r in records):
        summary["success_rate_paper_rule"] = sum(bool(r.get("won_paper")) for r in records) / n
    return summary


def evaluation_result(
    records: Sequence[dict[str, Any]],
    env: str,
    split: str,
    model_name: str,
    seeds: Sequence[int],
    num_tasks: int,
    selection: dict[str, Any],
    settings: dict[str, Any],
    elapsed: float,
    confidence: float = 0.95,
    return_episodes: bool = True,
) -> dict[str, Any]:
    """The JSON-serialisable result of an evaluation (stored by `trl_epo.results.save_eval_results`)."""
    from . import __version__

    result = {
        "env": env,
        "split": split,
        "model": model_name,
        **summarize_episodes(records, confidence),
        "num_tasks": num_tasks,
        "seeds": list(seeds),
        "num_seeds": len(seeds),
        "split_size": selection.get("split_size", num_tasks),
        "selection": selection.get("selection", "given"),
        "settings": {**settings, "task_kwargs": selection.get("task_kwargs", {})},
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
        result["episodes"] = list(records)
    return result


def sampling_config(
    eos_token_ids: Sequence[int], pad_token_id: int, temperature: float, top_p: float = 1.0, top_k: int = 0
):
    """The evaluation's `GenerationConfig`: `temperature` alone sets the distribution (no top-k/top-p truncation,
    no repetition penalty), overriding the model's own `generation_config`, as in training."""
    from transformers import GenerationConfig

    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
    sample = temperature > 0
    return GenerationConfig(
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=top_k if sample else None,
        repetition_penalty=1.0,
        eos_token_id=list(eos_token_ids),
        pad_token_id=pad_token_id,
    )


def evaluate(
    model,
    tokenizer,
    env: str = "toy",
    split: str = "iid",
    num_episodes: int | None = None,
    temperature: float = 0.4,
    seed: int | Sequence[int] = 0,
    rollout_config: RolloutConfig | None = None,
    batch_size: int = 64,
    top_p: float = 1.0,
    top_k: int = 0,
    env_kwargs: dict[str, Any] | None = None,
    task_kwargs: dict[str, Any] | None = None,
    tasks: Sequence[TaskSpec] | None = None,
    confidence: float = 0.95,
    progress_bar: bool = True,
    model_name: str | None = None,
    return_episodes: bool = True,
    **rollout_settings: Any,
) -> dict[str, Any]:
    """Play a model on an environment split and report its success rate with a confidence interval.

    Args:
        model / tokenizer: a Hugging Face causal LM (a `PeftModel` works too) on its device, and its tokenizer (with a
            chat template).
        env: a registered environment name ("toy", "sciworld", "alfworld", ...).
        split: "iid" or "ood" (or "train", or any split the env module offers).
        num_episodes: episodes per seed; None plays every task of the split once (see `split_tasks`).
        temperature: sampling temperature (paper validation: 0.4); 0 is greedy decoding.
        seed: a sampling seed, or several: the split is played once per seed and the results are pooled.
        rollout_config: the rollout settings (prompt style, turn and token limits); default: the env's defaults
            (`RolloutConfig` with the registry's turn limit and prompt style). Use the training run's
            (`trl-epo evaluate` reads them from `epo_run.json`). Keyword arguments such as ``max_turns=10`` or
            ``max_turn_tokens=64`` override single fields.
        batch_size: episodes played at the same time (one batched `generate` call per turn for all of them).
        top_p / top_k: the defaults (1.0 / 0) disable truncation, so the temperature alone sets the distribution.
        env_kwargs / task_kwargs: the env class's constructor arguments / extra `make_tasks(split, ...)` arguments.
        tasks: play these `TaskSpec`s instead of a registry split (``split`` is then only a label).
        confidence: level of the Wilson interval.
        model_name: recorded in the result (default: the model's `name_or_path`).
        return_episodes: include one compact record per episode under ``"episodes"``.

    Returns:
        A JSON-serialisable dict: ``env``, ``split``, ``model``, ``num_episodes``, ``successes``, ``success_rate``,
        ``success_ci`` ([low, high], Wilson), ``mean_turns``, ``invalid_turn_rate``, ``truncation_rate``,
        ``env_error_episodes`` (failures count as losses), ``mean_score``, ``per_task``, ``per_seed``, ``seeds``,
        ``settings``, timing and, with ``return_episodes``, ``episodes``.
    """
    from .rollout import ModelGenerator, MultiTurnRollout

    seeds = [int(seed)] if isinstance(seed, int) else [int(s) for s in seed]
    if not seeds:
        raise ValueError("Give at least one seed.")
    entry = get_env(env)
    if tasks is None:
        tasks, selection = split_tasks(entry.name, split, num_episodes, task_kwargs)
    else:
        tasks = [TaskSpec.from_row(t) for t in tasks]
        selection = {"split_size": len(tasks), "selection": "given", "task_kwargs": dict(task_kwargs or {})}
    config = rollout_config or RolloutConfig(max_turns=entry.max_turns, prompt_style=entry.prompt_style())
    config = config.replace(pool_size=batch_size, progress_bar=False, **rollout_settings)
    generator = ModelGenerator(model, tokenizer, max_completion_length=config.max_episode_tokens or 8192)
    generator.show_progress = False
    generator.generation_config = sampling_config(
        generator.eos_token_ids, generator.pad_token_id, temperature, top_p, top_k
    )
    rollout = MultiTurnRollout(entry.factory(**(env_kwargs or {})), config)
    bar = _progress_bar(len(tasks) * len(seeds), f"eval {entry.name}/{split}", progress_bar)
    was_training = getattr(model, "training", False)
    model.eval()
    start = time.perf_counter()
    try:
        records = play_episodes(rollout, generator, tokenizer, tasks, seeds, batch_size, progress=bar)
    finally:
        rollout.close()
        if was_training:
            model.train()
    settings = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "max_turns": config.max_turns,
        "max_turn_tokens": config.max_turn_tokens,
        "max_episode_tokens": config.max_episode_tokens,
        "history_turns": config.history_turns,
        "batch_size": batch_size,
        "action_tag": config.prompt_style.action_tag,
        "env_kwargs": dict(env_kwargs or {}),
    }
    name = model_name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return evaluation_result(
        records,
        entry.name,
        split,
        name,
        seeds,
        len({(t.task, t.variation, t.seed) for t in tasks}),
        selection,
        settings,
        time.perf_counter() - start,
        confidence,
        return_episodes,
    )


def _progress_bar(total: int, desc: str, enabled: bool):
    """A `progress(done, won)` callback drawing a tqdm bar, or None."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="episode")

    def update(done: int, won: int) -> None:
        bar.update(done - bar.n)
        bar.set_postfix(success=f"{won}/{done}")
        if done >= total:
            bar.close()

    return update
