"""The same TRL tool environment trained three ways, same tiny model and budget:

* ``trl_grpo``: TRL's `GRPOTrainer(environment_factory=GuessEnv)` (TRL's tool loop, one row per episode);
* ``epo_trl_loop``: `EPOTrainer(environment_factory=GuessEnv)` (TRL's tool loop under EPO's loss);
* ``epo_own_loop``: `EPOTrainer(env_factory=TRLEnvironment(GuessEnv))` (our multi-turn rollout through the adapter:
  one row per turn with a history window, env workers).

    python benchmarks/bench_trl_tools.py --output benchmarks/results/bench_trl_tools.json
    python benchmarks/bench_trl_tools.py --tiny          # seconds (run by the tests)

Each arm runs in its own process (so that its peak RSS is its own) and reports: episodes/s over the whole run,
seconds per optimizer step (rollout included), peak RSS and its growth over the process's RSS before training, and
the training rows it produced (count and tokens per row).

The model is a randomly initialised tiny Qwen2 (`trl_epo.tiny`) with TRL's Qwen2.5 chat template (tools). A random
model never writes a tool call, so every arm steers generation the same way, with transformers' `sequence_bias`
(in `generation_kwargs`, which both trainers pass to `generate`): each answer is pushed to
``<tool_call>{"name": "guess", "arguments": {"number": D}}</tool_call>``, the digit D left to the model. TRL's loop
has no completion signal, so it keeps calling until `max_tool_calling_iterations`; our loop ends an episode when the
env's `done` is set (a correct guess). Both allow `turns` model answers per episode.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

ARMS = ("trl_grpo", "epo_trl_loop", "epo_own_loop")


@dataclass
class BenchTRLToolsArguments:
    arms: list[str] = field(default_factory=lambda: list(ARMS), metadata={"help": f"Which of {ARMS} to run."})
    steps: int = field(default=4, metadata={"help": "Optimizer steps per arm."})
    batch_size: int = field(default=8, metadata={"help": "Episodes per optimizer step (per_device_train_batch_size)."})
    num_generations: int = field(default=4, metadata={"help": "G, episodes per task."})
    turns: int = field(default=4, metadata={"help": "Model answers per episode at most."})
    turn_tokens: int = field(default=96, metadata={"help": "New tokens per answer."})
    history_turns: int = field(default=1, metadata={"help": "Our loop's window (env_history_turns)."})
    hidden_size: int = field(default=64, metadata={"help": "Tiny model width."})
    seed: int = field(default=0, metadata={"help": "Seed of every arm."})
    tiny: bool = field(default=False, metadata={"help": "Seconds-long settings (the tests)."})
    output: str | None = field(default=None, metadata={"help": "Write the results as JSON here."})
    arm: str | None = field(default=None, metadata={"help": "Internal: run this one arm in this process."})


class GuessEnv:
    """A TRL environment class: guess a number in 1..8 with the `guess` tool; reward 1 once guessed."""

    def reset(self, **row):
        self.target, self.done = int(row["target"]), False
        return " The number is between 1 and 8."

    def guess(self, number: int) -> str:
        """Guess the secret number.

        Args:
            number: your guess
        """
        if number == self.target:
            self.done = True
            return "correct"
        return "higher" if number < self.target else "lower"

    def get_reward(self) -> float:
        return float(self.done)


def steering_bias(tokenizer, strength: float = 60.0) -> list:
    """`sequence_bias` pairs that push every answer to one `guess` call (the digit is the model's choice)."""
    head = tokenizer('<tool_call>\n{"name": "guess", "arguments": {"number": ', add_special_tokens=False)["input_ids"]
    tail = tokenizer("}}\n</tool_call>", add_special_tokens=False)["input_ids"]
    digits = [tokenizer(str(d), add_special_tokens=False)["input_ids"] for d in range(1, 9)]
    pairs = [[head[:1], strength / 2]] + [[head[: k + 1], strength] for k in range(1, len(head))]
    for digit in digits:
        sequence = head + digit
        pairs += [[sequence[: len(head) + k + 1], strength] for k in range(len(digit))]
        sequence = sequence + tail + [tokenizer.eos_token_id]
        pairs += [[sequence[: len(head) + len(digit) + k + 1], strength] for k in range(len(tail) + 1)]
    return pairs


def rows(n: int, num_generations: int) -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": "Find the secret number."}], "target": 1 + (i * 5) % 8}
        for i in range(max(1, n // num_generations))
    ]


def run_arm(args: BenchTRLToolsArguments) -> dict:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import qwen2_5_chat_template

    from trl_epo import EPOConfig, EPOTrainer
    from trl_epo.envs.trl_tools import TRLEnvironment, make_dataset
    from trl_epo.rows import episode_rows
    from trl_epo.tiny import build_tiny_model, build_tiny_tokenizer

    torch.set_num_threads(1)
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = qwen2_5_chat_template
    model = build_tiny_model(tokenizer, hidden_size=args.hidden_size, seed=args.seed)
    data = rows(args.batch_size * args.steps, args.num_generations)
    common = dict(
        output_dir=tempfile.mkdtemp(prefix=f"bench_trl_tools_{args.arm}_"),
        per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations,
        # never binding: the turn limit is the budget (a windowed turn re-adds the ~600-token tool prompt)
        max_completion_length=args.turns * (args.turn_tokens + 1000),
        max_steps=args.steps,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        seed=args.seed,
        disable_tqdm=True,
        temperature=1.0,
        generation_kwargs={"sequence_bias": steering_bias(tokenizer)},
        max_tool_calling_iterations=args.turns - 1,
    )
    produced = []  # (rows, tokens per row) of each optimizer step's training data
    if args.arm == "epo_own_loop":
        config = EPOConfig(
            **common,
            env_max_turns=args.turns,
            env_max_turn_tokens=args.turn_tokens,
            env_history_turns=args.history_turns,
            env_pool_backend="thread",
        )
        trainer = EPOTrainer(
            model, args=config, train_dataset=make_dataset(data), processing_class=tokenizer,
            env_factory=TRLEnvironment(GuessEnv),
        )  # fmt: skip
        play = trainer._play_rollout_batch

        def recorded(batch_rows):  # instrumentation only: the rows the rollout's episodes become
            batch = play(batch_rows)
            for i, e in enumerate(batch.episodes):
                for row in episode_rows(i, e.prompt_ids, e.completion_ids, e.env_mask, e.turn_ids, None, "step"):
                    produced.append(len(row.prompt_ids) + len(row.completion_ids))
            return batch

        trainer._play_rollout_batch = recorded
    else:
        dataset = Dataset.from_list(data)
        if args.arm == "trl_grpo":
            trainer = GRPOTrainer(
                model, reward_funcs=[], args=GRPOConfig(**common), train_dataset=dataset,
                processing_class=tokenizer, environment_factory=GuessEnv,
            )  # fmt: skip
        else:
            trainer = EPOTrainer(
                model, args=EPOConfig(**common), train_dataset=dataset, processing_class=tokenizer,
                environment_factory=GuessEnv,
            )  # fmt: skip
        generate = trainer._generate_and_score_completions

        def recorded(inputs):  # instrumentation only: one training row per episode
            output = generate(inputs)
            lengths = output["prompt_mask"].sum(1) + output["completion_mask"].sum(1)
            produced.extend(int(n) for n in lengths)
            return output

        trainer._generate_and_score_completions = recorded
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if hasattr(trainer, "close_envs"):
        trainer.close_envs()
    history = [h for h in trainer.state.log_history if "loss" in h]
    episodes = args.batch_size * trainer.state.global_step
    # TRL logs tool calls per episode; every steered answer is one call, so its turns are calls + 1 when unfinished
    turns = [h.get("rollout/mean_turns", h.get("tools/call_frequency", 0.0)) for h in history]
    rewards = [h.get("reward", float("nan")) for h in history]
    return {
        "arm": args.arm,
        "optimizer_steps": trainer.state.global_step,
        "episodes": episodes,
        "seconds": seconds,
        "episodes_per_s": episodes / seconds,
        "seconds_per_optimizer_step": seconds / max(1, trainer.state.global_step),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_train_mib": rss_before,
        "rows": len(produced),
        "rows_per_episode": len(produced) / max(1, episodes),
        "tokens_per_row_mean": sum(produced) / max(1, len(produced)),
        "tokens_per_row_max": max(produced, default=0),
        "mean_turns_or_tool_calls": sum(turns) / max(1, len(turns)),
        "mean_reward": sum(rewards) / max(1, len(rewards)),
    }


def run(args: BenchTRLToolsArguments) -> dict:
    if args.tiny:
        args.steps, args.batch_size, args.num_generations, args.turns, args.hidden_size = 1, 4, 2, 2, 32
    results = []
    for arm in args.arms:
        if arm not in ARMS:
            raise ValueError(f"Unknown arm {arm!r}; choose from {ARMS}.")
        settings = {k: v for k, v in asdict(args).items() if k not in ("arms", "output", "arm", "tiny")}
        command = [sys.executable, os.path.abspath(__file__), "--arm", arm]
        for key, value in settings.items():
            command += [f"--{key}", str(value)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"arm {arm} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    settings = {k: v for k, v in asdict(args).items() if k not in ("output", "arm")}
    return {"settings": settings, "load_average": os.getloadavg(), "rows": results}


def report(result: dict) -> str:
    head = "| arm | episodes/s | s / optimizer step | peak RSS (MiB; growth) | rows (per episode) | tokens/row mean (max) |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        growth = r["peak_rss_mib"] - r["rss_before_train_mib"]
        lines.append(
            f"| {r['arm']} | {r['episodes_per_s']:.2f} | {r['seconds_per_optimizer_step']:.2f} | "
            f"{r['peak_rss_mib']:.0f} ({growth:+.0f}) | {r['rows']} ({r['rows_per_episode']:.2f}) | "
            f"{r['tokens_per_row_mean']:.0f} ({r['tokens_per_row_max']}) |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    from trl import TrlParser

    (args,) = TrlParser(BenchTRLToolsArguments).parse_args_and_config(args=list(argv) if argv is not None else None)
    if args.arm is not None:
        print("RESULT " + json.dumps(run_arm(args)), flush=True)
        return {}
    result = run(args)
    print(report(result))
    if args.output:
        from trl_epo.run_files import write_json_atomic

        write_json_atomic(os.path.abspath(args.output), result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
