"""The real SmolLM2-135M-Instruct (`trl_epo.models`, offline) in the two places where a real model costs most on CPU:
rollout generation (with and without KV-cache reuse, split into prefill and decode) and the loss backward at its real
49,152-token vocabulary (EPO vs GRPO, and where the time goes).

    python benchmarks/bench_real_model.py --parts rollout        # ScienceWorld, 4 episodes x 5 turns (~2.5 min)
    python benchmarks/bench_real_model.py --parts loss --loss_repetitions 7                  # (~3 min on 2 cores)
    python benchmarks/bench_real_model.py --smallest --output ''         # toy env, tiny batch (~25 s; the tests)

Rollout (`--parts rollout`): ScienceWorld episodes (`--env toy` without Java) played by `MultiTurnRollout` as in
training (ScienceWorld prompt style, whole-episode contexts, one batched `generate` per turn), once re-encoding every
turn (`reuse_kv_cache=False`) and once continuing from the last turn's KV cache, from the same sampling seed, so
both arms normally generate the same tokens (`identical_episodes`). An untimed warm-up play starts the envs.

Prefill/decode split: forward hooks time every forward of the model (`perf_counter`; CPU forwards are synchronous).
In each `generate` call the first forward is the prefill (it encodes the context, or with KV reuse only the tokens
the cache lacks, and yields the first new token); every later forward is one decode step (one token per row, rows
of finished answers included). prefill tokens/s = context tokens fed / prefill time; decode tokens/s = answer tokens
after each turn's first / decode time; "other" = `generate` time outside forwards (sampling, stopping, bookkeeping).

Loss (`--parts loss`): `bench_loss.py`'s measurement (multi-turn batch, trainers, interleaved repetitions, profiler
peak memory) with the real model and tokenizer, ids drawn from the real 49,152-token vocabulary: `compute_loss +
backward` of GRPOTrainer and EPOTrainer (`--loss_arms grpo epo trl_entropy epo_off` adds bench_loss.py's diagnostic
arms). Every timed step also times TRL's fused LM head (`trl.kernels.chunked_logprob`): forward, backward and, within
the backward, the elementwise CPU tile function `_backward_tile` (which adds the entropy gradient when the loss uses
the entropy, as EPO does); "rest" = the transformer's forward and backward and the loss. CPU tiles are
[min(tokens, 4096) x 32768] fp32 (the vocabulary is cut into 32768 + 16384 columns). Steps are timed in wall clock
and in process CPU time: with one torch thread the CPU time is the compute itself and does not grow when other
processes take the cores, so on a shared machine the EPO/GRPO ratio is taken on CPU time (paired median and IQR).

Results go to stdout (tables) and to `--output` (JSON, default `benchmarks/results/bench_real_model.json`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class BenchRealModelArguments:
    model: str = field(default="smollm2-135m", metadata={"help": "A `trl_epo.models` registry name."})
    cache_dir: str | None = field(default=None, metadata={"help": "Converted-model cache (default: user cache)."})
    parts: list[str] = field(default_factory=lambda: ["rollout", "loss"], metadata={"help": "rollout and/or loss."})
    threads: int = field(default=1, metadata={"help": "torch intra-op threads."})
    seed: int = field(default=0, metadata={"help": "Task draw, sampling and batch seed."})
    # rollout
    env: str = field(default="sciworld", metadata={"help": "sciworld or toy."})
    num_episodes: int = field(default=4, metadata={"help": "Episodes, played at once (one batched generate/turn)."})
    max_turns: int = field(default=5, metadata={"help": "Turns per episode."})
    max_turn_tokens: int = field(default=32, metadata={"help": "New tokens per answer."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0 = greedy)."})
    pool_backend: str = field(default="process", metadata={"help": "EnvPool backend (process, thread, inline)."})
    # loss (bench_loss.py's settings)
    loss_arms: list[str] = field(
        default_factory=lambda: ["grpo", "epo"], metadata={"help": "bench_loss.py arms (grpo and epo always)."}
    )
    loss_batch_size: int = field(default=2, metadata={"help": "Sequences per batch."})
    loss_prompt_length: int = field(default=64, metadata={"help": "Prompt tokens per sequence."})
    loss_completion_length: int = field(default=256, metadata={"help": "Completion tokens per sequence."})
    loss_turns: int = field(default=4, metadata={"help": "Turns per sequence."})
    loss_repetitions: int = field(default=3, metadata={"help": "Timed, interleaved repetitions per arm."})
    loss_warmup: int = field(default=1, metadata={"help": "Untimed repetitions per arm."})
    loss_memory_repetitions: int = field(default=1, metadata={"help": "Peak-memory measurements per arm."})
    output: str | None = field(
        default=os.path.join(HERE, "results", "bench_real_model.json"),
        metadata={"help": "JSON file for the results ('' = none)."},
    )
    smallest: bool = field(default=False, metadata={"help": "The smallest setting (toy env; for the tests)."})

    def apply_smallest(self) -> None:
        self.env, self.pool_backend, self.num_episodes, self.max_turns, self.max_turn_tokens = "toy", "inline", 2, 2, 3
        self.loss_arms, self.loss_batch_size, self.loss_turns = ["grpo", "epo"], 2, 2  # GRPO needs >= 2
        self.loss_prompt_length, self.loss_completion_length = 8, 24
        self.loss_repetitions, self.loss_warmup, self.loss_memory_repetitions = 1, 0, 1


def load_module(name: str):
    """A sibling benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------------------------------------------------
# Rollout: prefill / decode
# --------------------------------------------------------------------------------------------------------------------


class ForwardClock:
    """Forward hooks that time every forward of the model; the first forward after `arm()` is the prefill of a
    `generate` call, the others are decode steps (see the module docstring)."""

    def __init__(self, model):
        self.reset()
        self._handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def reset(self):
        self.prefill_s = self.decode_s = self.prefill_cpu_s = self.decode_cpu_s = 0.0
        self.decode_steps = self.decode_rows = 0
        self._next_is_prefill, self._start, self._start_cpu = False, 0.0, 0.0

    def arm(self):
        self._next_is_prefill = True

    def _pre(self, module, args):
        self._start, self._start_cpu = time.perf_counter(), time.process_time()

    def _post(self, module, args, output):
        elapsed, cpu = time.perf_counter() - self._start, time.process_time() - self._start_cpu
        if self._next_is_prefill:
            self.prefill_s += elapsed
            self.prefill_cpu_s += cpu
            self._next_is_prefill = False
        else:
            self.decode_s += elapsed
            self.decode_cpu_s += cpu
            self.decode_steps += 1
            self.decode_rows += output.logits.size(0)

    def close(self):
        for handle in self._handles:
            handle.remove()


def rollout_part(args: BenchRealModelArguments, model, tokenizer) -> dict:
    import torch

    from trl_epo.envs.registry import get_env
    from trl_epo.rollout import ModelGenerator, MultiTurnRollout, RolloutConfig

    class TimedGenerator(ModelGenerator):
        """Marks the start of each `generate` call for the `ForwardClock`; sums the context tokens fed."""

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.fed_total, self.calls = 0, 0

        def generate(self, contexts, limits):
            if contexts:
                clock.arm()
            results = super().generate(contexts, limits)
            self.fed_total, self.calls = self.fed_total + self.tokens_fed, self.calls + bool(contexts)
            return results

    entry = get_env(args.env)
    module = entry.load()  # ImportError with the install hint when scienceworld is missing
    if entry.name == "sciworld":
        tasks = module.make_tasks("train", num_tasks=args.num_episodes, seed=args.seed)
    else:
        tasks = module.make_tasks("train", args.num_episodes, seed=args.seed)
    config = RolloutConfig(
        max_turns=args.max_turns,
        max_turn_tokens=args.max_turn_tokens,
        max_episode_tokens=1 << 20,
        pool_backend=args.pool_backend,
        progress_bar=False,
        step_timeout=300.0,
        prompt_style=entry.prompt_style(),
    )
    rollout = MultiTurnRollout(entry.factory(), config)
    clock = ForwardClock(model)

    def generator(reuse):
        return TimedGenerator(
            model,
            tokenizer,
            temperature=args.temperature,
            max_completion_length=1 << 20,
            progress_bar=False,
            reuse_kv_cache=reuse,
        )

    arms, episodes_of = [], {}
    try:
        start = time.perf_counter()
        rollout.config = dataclasses.replace(config, max_turns=1, max_turn_tokens=2)
        rollout.play(tasks, generator(True), tokenizer)  # starts and resets the envs; warms the model up
        rollout.config = config
        startup = time.perf_counter() - start
        for reuse in (False, True):
            clock.reset()
            gen = generator(reuse)
            torch.manual_seed(args.seed)
            load_start = load_average()
            start = time.perf_counter()
            batch = rollout.play(tasks, gen, tokenizer)
            episodes, stats = batch.episodes, batch.stats
            wall = time.perf_counter() - start
            episodes_of[reuse] = [e.completion_ids for e in episodes]
            generated = stats.generated_tokens
            # Each turn's first answer token comes from the prefill forward; the others from decode steps.
            decoded = generated - sum(e.turns for e in episodes)
            other = max(0.0, stats.time_generate - clock.prefill_s - clock.decode_s)
            arms.append(
                {
                    "reuse_kv_cache": reuse,
                    "wall_s": wall,
                    "episodes": len(episodes),
                    "turns": sum(e.turns for e in episodes),
                    "generate_calls": gen.calls,
                    "context_tokens_fed": gen.fed_total,
                    "final_tokens": stats.final_tokens,
                    "refeed_ratio": stats.refeed_ratio,
                    "generated_tokens": generated,
                    "time_generate_s": stats.time_generate,
                    "time_env_s": stats.time_env,
                    "prefill_s": clock.prefill_s,
                    "decode_s": clock.decode_s,
                    "generate_other_s": other,
                    "prefill_cpu_s": clock.prefill_cpu_s,
                    "decode_cpu_s": clock.decode_cpu_s,
                    "decode_steps": clock.decode_steps,
                    "decode_rows": clock.decode_rows,
                    "prefill_tokens_per_s": gen.fed_total / max(clock.prefill_s, 1e-9),
                    "decode_tokens_per_s": decoded / max(clock.decode_s, 1e-9),
                    "generated_tokens_per_generate_s": generated / max(stats.time_generate, 1e-9),
                    "invalid_turn_rate": stats.invalid_turn_rate,
                    "load_average_start": load_start,
                    "load_average_end": load_average(),
                }
            )
            print(
                f"[bench_real_model] rollout reuse_kv_cache={reuse}: {wall:.1f} s, generate "
                f"{stats.time_generate:.1f} s (prefill {clock.prefill_s:.1f} s, decode {clock.decode_s:.1f} s)",
                flush=True,
            )
    finally:
        clock.close()
        rollout.close()
    off, on = arms

    def cpu(arm):
        return arm["prefill_cpu_s"] + arm["decode_cpu_s"]

    return {
        "env": entry.name,
        "tasks": [[t.task, t.variation] for t in tasks],
        "startup_s": startup,
        "arms": arms,
        "identical_episodes": episodes_of[False] == episodes_of[True],
        "speedup_generate": off["time_generate_s"] / max(on["time_generate_s"], 1e-9),
        "speedup_prefill": off["prefill_s"] / max(on["prefill_s"], 1e-9),
        "speedup_model_cpu": cpu(off) / max(cpu(on), 1e-9),
    }


# --------------------------------------------------------------------------------------------------------------------
# Loss: EPO vs GRPO at the real vocabulary, and where the step's time goes
# --------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def lm_head_clock(totals: dict):
    """Time TRL's fused LM head during the block (wall and process CPU seconds): its forward, its backward, and the
    backward's elementwise CPU tile function. The wrappers cost a few Python calls per tile."""
    from trl.kernels import chunked_logprob as kernel

    function = kernel.ChunkedLogProbFunction
    saved = {
        "forward": function.__dict__["forward"],
        "backward": function.__dict__["backward"],
        "tile": kernel._backward_tile,
    }

    def clocked(fn, key):
        def wrapper(*a, **k):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                totals[f"{key}_s"] = totals.get(f"{key}_s", 0.0) + time.perf_counter() - wall
                totals[f"{key}_cpu_s"] = totals.get(f"{key}_cpu_s", 0.0) + time.process_time() - cpu

        return wrapper

    function.forward = staticmethod(clocked(saved["forward"].__func__, "lm_head_forward"))
    function.backward = staticmethod(clocked(saved["backward"].__func__, "lm_head_backward"))
    kernel._backward_tile = clocked(saved["tile"], "backward_tile")
    try:
        yield totals
    finally:
        function.forward, function.backward, kernel._backward_tile = saved["forward"], saved["backward"], saved["tile"]


PART_KEYS = ("total", "lm_head_forward", "lm_head_backward", "backward_tile", "rest")


def clocked_step(bench_loss, trainer, model, batch) -> dict:
    """One `compute_loss + backward`, with the wall and CPU seconds of the step and of the LM head's parts."""
    parts = {}
    with lm_head_clock(parts):
        wall, cpu = time.perf_counter(), time.process_time()
        bench_loss.loss_and_backward(trainer, model, batch)
        parts["total_s"], parts["total_cpu_s"] = time.perf_counter() - wall, time.process_time() - cpu
    for unit in ("_s", "_cpu_s"):
        parts["rest" + unit] = parts["total" + unit] - sum(
            parts.get(k + unit, 0.0) for k in ("lm_head_forward", "lm_head_backward")
        )
    return parts


def loss_part(args: BenchRealModelArguments, path: str, tokenizer) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    bench_loss = load_module("bench_loss")
    # One copy of the model per trainer (each patches its own LM head), identical weights.
    arms = list(dict.fromkeys(["grpo", "epo", *args.loss_arms]))
    models = {arm: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32) for arm in arms}
    vocab = models["grpo"].config.vocab_size
    largs = bench_loss.BenchLossArguments(
        vocab_size=vocab,
        batch_size=args.loss_batch_size,
        prompt_length=args.loss_prompt_length,
        completion_length=args.loss_completion_length,
        turns=args.loss_turns,
        repetitions=args.loss_repetitions,
        warmup=args.loss_warmup,
        memory_repetitions=args.loss_memory_repetitions,
        threads=args.threads,
        seed=args.seed,
        arms=list(args.loss_arms),
    )
    batch = bench_loss.build_batch(largs, "cpu")
    steps, memory = {arm: [] for arm in arms}, {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as output_dir:
        trainers = {arm: bench_loss.build_trainer(arm, largs, models[arm], tokenizer, output_dir) for arm in arms}
        for arm in arms:
            if arm.startswith("epo"):
                bench_loss.set_reference(trainers[arm], models[arm], batch)
        for _ in range(largs.warmup):
            for arm in arms:
                bench_loss.loss_and_backward(trainers[arm], models[arm], batch)
        for rep in range(max(largs.repetitions, largs.memory_repetitions)):
            order = arms[rep % len(arms) :] + arms[: rep % len(arms)]  # no arm always first or after the same one
            order = order[::-1] if rep % 2 else order
            for arm in order:
                if rep < largs.repetitions:
                    steps[arm].append(clocked_step(bench_loss, trainers[arm], models[arm], batch))
                if rep < largs.memory_repetitions:
                    memory[arm].append(bench_loss.peak_memory(trainers[arm], models[arm], batch, "cpu"))
    tokens = int(batch["completion_ids"].numel() + batch["prompt_ids"].numel())
    peak = {arm: statistics.median(v) for arm, v in memory.items()}
    results = {}
    for arm in arms:
        median = {
            f"{k}{u}": statistics.median(s.get(f"{k}{u}", 0.0) for s in steps[arm])
            for k in PART_KEYS
            for u in ("_s", "_cpu_s")
        }
        paired = [a["total_cpu_s"] / g["total_cpu_s"] for a, g in zip(steps[arm], steps["grpo"])]
        results[arm] = {
            "description": bench_loss.ARMS[arm],
            "median": median,
            "steps": steps[arm],
            "wall_ratio": median["total_s"] / statistics.median(s["total_s"] for s in steps["grpo"]),
            "cpu_ratio": median["total_cpu_s"] / statistics.median(s["total_cpu_s"] for s in steps["grpo"]),
            "cpu_ratio_paired_median": statistics.median(paired),
            "cpu_ratio_paired_iqr": list(bench_loss.quartiles(paired)),
            "peak_bytes": peak[arm],
            "peak_bytes_all": memory[arm],
            "memory_ratio": peak[arm] / peak["grpo"] if peak["grpo"] else None,
        }
    return {
        "settings": asdict(largs),
        "vocab_size": vocab,
        "parameters": sum(p.numel() for p in models["grpo"].parameters()),
        "tokens_per_batch": tokens,
        "lm_head_tile": [min(tokens, 4096), 32768],
        "lm_head_tile_mib": min(tokens, 4096) * 32768 * 4 / 2**20,
        "model_tokens": int(batch["num_items_in_batch"]),
        "arms": results,
        "load_average_end": load_average(),
    }


# --------------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------------


def run(args: BenchRealModelArguments) -> dict:
    import logging

    import torch

    from trl_epo.models import load_pretrained, pretrained_path

    if args.smallest:
        args.apply_smallest()
    unknown = set(args.parts) - {"rollout", "loss"}
    if unknown:
        raise ValueError(f"Unknown parts {sorted(unknown)}; use rollout and/or loss.")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    result = {
        "settings": asdict(args),
        "load_average_start": load_average(),
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads,
    }
    start = time.perf_counter()
    path = pretrained_path(args.model, args.cache_dir)  # converts once (not timed below)
    result["prepare_s"] = time.perf_counter() - start
    model, tokenizer = load_pretrained(args.model, cache_dir=args.cache_dir)
    model.eval()
    result["model"] = {
        "name": args.model,
        "path": path,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": model.config.vocab_size,
    }
    if "rollout" in args.parts:
        result["rollout"] = rollout_part(args, model, tokenizer)
    del model
    if "loss" in args.parts:
        result["loss"] = loss_part(args, path, tokenizer)
    result["load_average_end"] = load_average()
    return result


def report(result: dict) -> str:
    m = result["model"]
    lines = [
        (
            f"model: {m['name']} ({m['parameters'] / 1e6:.1f}M params, vocab {m['vocab_size']}), float32, "
            f"{result['torch_threads']} torch thread(s), {result['cpu_count']} CPUs; load average "
            f"{result['load_average_start']} -> {result['load_average_end']}"
        )
    ]
    if "rollout" in result:
        r, s = result["rollout"], result["settings"]
        lines += [
            "",
            (
                f"rollout: {r['env']}, {s['num_episodes']} episodes x {s['max_turns']} turns x <= {s['max_turn_tokens']} "
                f"new tokens, T={s['temperature']}; identical episodes in both arms: {r['identical_episodes']}"
            ),
            (
                "| KV reuse | generate s | prefill s (tokens fed, tokens/s) | decode s (steps, tokens/s) | other s | "
                "prefill / decode CPU s | generated tokens/s (generate) | env s | tokens fed / final tokens | load avg |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for a in r["arms"]:
            lines.append(
                f"| {'on' if a['reuse_kv_cache'] else 'off'} | {a['time_generate_s']:.1f} | {a['prefill_s']:.1f} "
                f"({a['context_tokens_fed']}, {a['prefill_tokens_per_s']:.0f}) | {a['decode_s']:.1f} "
                f"({a['decode_steps']}, {a['decode_tokens_per_s']:.1f}) | {a['generate_other_s']:.1f} | "
                f"{a['prefill_cpu_s']:.1f} / {a['decode_cpu_s']:.1f} | "
                f"{a['generated_tokens_per_generate_s']:.1f} | {a['time_env_s']:.1f} | {a['refeed_ratio']:.2f} | "
                f"{a['load_average_start'][0]} |"
            )
        lines.append(
            f"generate speed-up from KV reuse: {r['speedup_generate']:.2f}x wall (prefill "
            f"{r['speedup_prefill']:.1f}x); model forward CPU time {r['speedup_model_cpu']:.2f}x"
        )
    if "loss" in result:
        lo, st = result["loss"], result["loss"]["settings"]
        lines += [
            "",
            (
                f"loss: batch {st['batch_size']} x ({st['prompt_length']} prompt + {st['completion_length']} "
                f"completion, {st['turns']} turns, {lo['model_tokens']} model tokens), V={lo['vocab_size']}, "
                f"loss_type={st['loss_type']}, {st['repetitions']} interleaved reps (medians); LM-head CPU tile "
                f"{lo['lm_head_tile'][0]} x {lo['lm_head_tile'][1]} fp32 = {lo['lm_head_tile_mib']:.0f} MiB"
            ),
            (
                "| arm | step wall s | step CPU s | CPU ratio vs GRPO (paired median, IQR) | peak MiB | memory ratio | "
                "LM head fwd CPU s | LM head bwd CPU s (of which _backward_tile) | rest CPU s |"
            ),
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for arm, a in lo["arms"].items():
            m, (low, high) = a["median"], a["cpu_ratio_paired_iqr"]
            lines.append(
                f"| {arm} | {m['total_s']:.2f} | {m['total_cpu_s']:.2f} | {a['cpu_ratio']:.3f} "
                f"({a['cpu_ratio_paired_median']:.3f}, {low:.3f}-{high:.3f}) | {a['peak_bytes'] / 2**20:.0f} | "
                f"{a['memory_ratio']:.3f} | {m['lm_head_forward_cpu_s']:.2f} | {m['lm_head_backward_cpu_s']:.2f} "
                f"({m['backward_tile_cpu_s']:.2f}) | {m['rest_cpu_s']:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    from trl import TrlParser

    (args,) = TrlParser(BenchRealModelArguments).parse_args_and_config(args=list(argv) if argv is not None else None)
    result = run(args)
    print(report(result))
    if args.output:
        from trl_epo.run_files import write_json_atomic

        write_json_atomic(os.path.abspath(args.output), result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
