"""Rollout throughput: episodes/s, env steps/s, generated tokens/s and the generate/env/other time split, with 1 vs
N env workers, on the toy env and (when their modules are installed) ScienceWorld and ALFWorld.

    python benchmarks/bench_rollout.py                                   # toy (+ sciworld/alfworld if available)
    python benchmarks/bench_rollout.py --envs toy --model out/sft        # a trained policy instead of a random one
    python benchmarks/bench_rollout.py --tiny                            # seconds (run by the tests)

Two policies, because they measure different things:

* ``model``: a Hugging Face causal LM generating every answer (`--model PATH`, else a randomly initialised tiny
  Qwen2 model). Measures generation throughput and the time split of a real rollout. A random model mostly writes
  invalid answers, so the env is seldom stepped; give a trained `--model` for a realistic env share.
* ``random_valid``: no model; every answer is a uniformly random action from the env's admissible-action list in the
  last observation (the rollout's own text). Generation is ~free, so this isolates env stepping and pool overhead:
  the 1-vs-N-worker comparison that matters for slow envs (ScienceWorld's JVM, ALFWorld's PDDL engine).

Worker settings: `EnvPool` has one env slot per concurrently played episode, so `pool_size=1` plays the episodes one
after another (one env worker, generation batch 1) and `pool_size=N` plays N at once (N worker processes, one
batched generate call per turn). The ``process`` backend is the training default; ``inline`` (no workers, no IPC)
is shown as a reference. Each configuration is played once untimed first (worker start-up, imports, JIT), then
timed; the start-up time is reported separately.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class BenchRolloutArguments:
    envs: list[str] = field(
        default_factory=lambda: ["toy", "sciworld", "alfworld"],
        metadata={"help": "Environments; those whose module is missing are skipped."},
    )
    policies: list[str] = field(
        default_factory=lambda: ["model", "random_valid"],
        metadata={"help": "'model' and/or 'random_valid' (see the module docstring)."},
    )
    pool_sizes: list[int] = field(default_factory=lambda: [1, 32], metadata={"help": "Env workers to compare."})
    backends: list[str] = field(
        default_factory=lambda: ["process", "inline"],
        metadata={"help": "EnvPool backends (inline is run at the largest pool size only)."},
    )
    num_episodes: int = field(default=32, metadata={"help": "Episodes per measurement."})
    split: str = field(default="train", metadata={"help": "Split the tasks come from."})
    max_turns: int = field(default=8, metadata={"help": "Turns per episode."})
    max_turn_tokens: int = field(default=32, metadata={"help": "New tokens per answer."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the model policy."})
    reuse_kv_cache: bool = field(
        default=True, metadata={"help": "Model policy: continue each turn from the last turn's KV cache."}
    )
    model: str | None = field(default=None, metadata={"help": "A saved model directory (default: tiny random)."})
    hidden_size: int = field(default=128, metadata={"help": "Width of the tiny random model."})
    num_layers: int = field(default=2, metadata={"help": "Depth of the tiny random model."})
    threads: int = field(default=1, metadata={"help": "torch intra-op threads."})
    env_kwargs: str | None = field(default=None, metadata={"help": "JSON dict: env name -> constructor kwargs."})
    step_timeout: float = field(default=120.0, metadata={"help": "Per-step env timeout (s)."})
    seed: int = field(default=0, metadata={"help": "Sampling / random-policy seed."})
    output: str | None = field(default=None, metadata={"help": "JSON file for the results."})
    tiny: bool = field(default=False, metadata={"help": "Seconds-long smoke setting (toy env only)."})

    def apply_tiny(self) -> None:
        self.envs = ["toy"]
        self.pool_sizes = [1, 3]
        self.num_episodes, self.max_turns, self.max_turn_tokens = 3, 2, 16
        self.hidden_size, self.num_layers = 32, 1


class RandomValidGenerator:
    """A generator (the interface `MultiTurnRollout.play` uses) that answers with a random admissible action read
    from the last observation of each context; no model."""

    returns_logprobs = False
    synced = False

    def __init__(self, tokenizer, seed: int = 0, action_tag: str = "action"):
        self.tokenizer = tokenizer
        self.eos_token_ids = [tokenizer.eos_token_id]
        self.pad_token_id = tokenizer.pad_token_id
        self.default_budget = 1 << 20
        self.rng = random.Random(seed)
        self.tag = action_tag
        self.pattern = re.compile(r"Available actions: (.*)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def is_main_process(self) -> bool:
        return True

    def any_live_anywhere(self, local_live: bool) -> bool:
        return local_live

    def progress(self, total, enabled):
        from trl_epo.rollout.generation import _NoProgress

        return _NoProgress()

    def generate(self, contexts, limits):
        results = []
        for ids, limit in zip(contexts, limits):
            tail = self.tokenizer.decode(ids[-1500:])
            found = self.pattern.findall(tail)
            actions = [a.strip() for a in found[-1].split(",")] if found else []
            actions = [a for a in actions if a and not a.startswith("...")] or ["look"]
            text = f"<{self.tag}>{self.rng.choice(actions)}</{self.tag}>"
            answer = self.tokenizer(text, add_special_tokens=False)["input_ids"] + self.eos_token_ids
            results.append((answer[:limit], None))
        return results


def load_policy_model(args: BenchRolloutArguments):
    import torch

    from trl_epo.tiny import build_tiny_model, build_tiny_tokenizer

    if args.model:
        from trl_epo.cli import load_model_for_eval

        return load_model_for_eval(args.model, device="cpu" if not torch.cuda.is_available() else None)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=args.hidden_size, num_layers=args.num_layers, seed=args.seed)
    return model.eval(), tokenizer


def measure(env_name, tasks, factory, policy, pool_size, backend, model, tokenizer, args) -> dict:
    import torch

    from trl_epo.rollout import ModelGenerator, MultiTurnRollout, RolloutConfig

    config = RolloutConfig(
        max_turns=args.max_turns,
        max_turn_tokens=args.max_turn_tokens,
        max_episode_tokens=1 << 20,
        pool_backend=backend,
        pool_size=pool_size,
        step_timeout=args.step_timeout,
        progress_bar=False,
    )
    rollout = MultiTurnRollout(factory, config)

    def generator():
        if policy == "model":
            return ModelGenerator(
                model,
                tokenizer,
                temperature=args.temperature,
                max_completion_length=1 << 20,
                progress_bar=False,
                reuse_kv_cache=args.reuse_kv_cache,
            )
        return RandomValidGenerator(tokenizer, seed=args.seed)

    try:
        start = time.perf_counter()
        warm_tasks = tasks[: min(len(tasks), pool_size)]
        torch.manual_seed(args.seed)
        rollout.play(warm_tasks, generator(), tokenizer)  # starts the workers; not timed
        startup = time.perf_counter() - start
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        batch = rollout.play(tasks, generator(), tokenizer)
        episodes, stats = batch.episodes, batch.stats
        wall = time.perf_counter() - start
    finally:
        rollout.close()
    env_steps = sum(e.turns - e.invalid_turns for e in episodes)
    total = max(stats.time_total, 1e-9)
    return {
        "env": env_name,
        "policy": policy,
        "backend": backend,
        "pool_size": pool_size,
        "episodes": len(episodes),
        "turns": sum(e.turns for e in episodes),
        "env_steps": env_steps,
        "env_errors": stats.env_error_episodes,
        "env_error_example": next((e.env_error[:300] for e in episodes if e.env_error), None),
        "wall_s": wall,
        "startup_s": startup,
        "episodes_per_s": len(episodes) / wall,
        "env_steps_per_s": env_steps / wall,
        "generated_tokens": stats.generated_tokens,
        "generated_tokens_per_s": stats.generated_tokens / wall,
        "generated_tokens_per_generate_s": stats.generated_tokens_per_s,
        "time_generate_s": stats.time_generate,
        "time_env_s": stats.time_env,
        "time_other_s": stats.time_other,
        "share_generate": stats.time_generate / total,
        "share_env": stats.time_env / total,
        "share_other": stats.time_other / total,
        "invalid_turn_rate": stats.invalid_turn_rate,
        "refeed_ratio": stats.refeed_ratio,
        "success_rate": stats.success_rate,
    }


def run(args: BenchRolloutArguments) -> dict:
    import logging

    import torch

    from trl_epo.envs.registry import get_env
    from trl_epo.evaluation import split_tasks

    if args.tiny:
        args.apply_tiny()
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_policy_model(args)
    env_kwargs = json.loads(args.env_kwargs) if args.env_kwargs else {}
    rows, skipped = [], {}
    load_start = [round(x, 2) for x in os.getloadavg()]
    for env_name in args.envs:
        try:
            entry = get_env(env_name)
            entry.load()
            tasks, _ = split_tasks(entry.name, args.split, args.num_episodes)
            factory = entry.factory(**env_kwargs.get(env_name, {}))
        except (ImportError, ValueError, OSError, RuntimeError) as error:
            skipped[env_name] = f"{type(error).__name__}: {error}"
            print(f"[bench_rollout] skipping {env_name}: {skipped[env_name]}", flush=True)
            continue
        largest = max(args.pool_sizes)
        configs = [("process", size) for size in args.pool_sizes if "process" in args.backends]
        configs += [(backend, largest) for backend in args.backends if backend != "process"]
        for policy in args.policies:
            for backend, size in configs:
                row = measure(env_name, tasks, factory, policy, size, backend, model, tokenizer, args)
                rows.append(row)
                print(
                    f"[bench_rollout] {env_name} {policy} {backend} x{size}: {row['episodes_per_s']:.2f} episodes/s, "
                    f"{row['env_steps_per_s']:.1f} env steps/s, {row['generated_tokens_per_s']:.0f} tokens/s",
                    flush=True,
                )
    return {
        "settings": asdict(args),
        "model": args.model or f"tiny random qwen2 (h={args.hidden_size}, L={args.num_layers})",
        "parameters": sum(p.numel() for p in model.parameters()),
        "rows": rows,
        "skipped": skipped,
        "load_average_start": load_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
    }


def report(result: dict) -> str:
    lines = [
        f"policy model: {result['model']} ({result['parameters'] / 1e6:.2f}M params); "
        f"{result['settings']['num_episodes']} episodes x <= {result['settings']['max_turns']} turns; load average "
        f"{result['load_average_start']} -> {result['load_average_end']} on {result['cpu_count']} CPUs; KV-cache reuse "
        f"{'on' if result['settings'].get('reuse_kv_cache', True) else 'off'}",
        "| env | policy | backend | workers | episodes/s | env steps/s | gen tokens/s (wall) | gen tokens/s "
        "(generate) | generate / env / other | invalid turns | tokens fed / final tokens | start-up s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['env']} | {r['policy']} | {r['backend']} | {r['pool_size']} | {r['episodes_per_s']:.2f} | "
            f"{r['env_steps_per_s']:.1f} | {r['generated_tokens_per_s']:.0f} | {r['generated_tokens_per_generate_s']:.0f}"
            f" | {100 * r['share_generate']:.0f}% / {100 * r['share_env']:.0f}% / {100 * r['share_other']:.0f}% | "
            f"{r['invalid_turn_rate']:.2f} | {r['refeed_ratio']:.2f} | {r['startup_s']:.1f} |"
        )
    for name, reason in result["skipped"].items():
        lines.append(f"skipped {name}: {reason}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    from trl import TrlParser

    (args,) = TrlParser(BenchRolloutArguments).parse_args_and_config(args=list(argv) if argv is not None else None)
    result = run(args)
    print(report(result))
    if args.output:
        from trl_epo.run_files import write_json_atomic

        write_json_atomic(os.path.abspath(args.output), result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
