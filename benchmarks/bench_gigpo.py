"""The cost of GiGPO's advantage computation per training step (`trl_epo.gigpo`), on a realistic batch: `groups` x
`num_generations` episodes of `turns` turns (default 16 x 8 = 128 episodes x 30 turns = 3840 turns), ALFWorld-like
states (a random walk over `locations` places with a few objects moved, per group its own reset; observation texts of
~`obs_chars` characters). Timed, per setting (median of `repeats` after one warm-up):

* `gigpo_advantages` with exact anchors on ALFWorld's state digests (`env_gigpo_anchor="env"`) and on the raw
  observation texts (`"observation"`), and with similarity anchors (`env_gigpo_similarity=0.95`, difflib);
* `set_turn_advantages` onto the batch's rows, one row per turn ("step") and one packed row per episode ("packed");
* GRPO's `group_advantages` (the episode part alone) for reference.

    python benchmarks/bench_gigpo.py --output benchmarks/results/bench_gigpo.json
    python benchmarks/bench_gigpo.py --tiny          # seconds
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class BenchGiGPOArguments:
    groups: int = field(default=16, metadata={"help": "Groups (tasks) per step (verl-agent ALFWorld: 16)."})
    num_generations: int = field(default=8, metadata={"help": "G: episodes per group."})
    turns: int = field(default=30, metadata={"help": "Turns per episode."})
    locations: int = field(default=25, metadata={"help": "Places of a game (states are place x moved objects)."})
    obs_chars: int = field(default=300, metadata={"help": "Characters of an observation text."})
    repeats: int = field(default=5, metadata={"help": "Timed repetitions per setting."})
    seed: int = field(default=0, metadata={"help": "Seed of the built batch."})
    output: str | None = field(default=None, metadata={"help": "Write the results as JSON here."})
    tiny: bool = field(default=False, metadata={"help": "Seconds: 2 groups x 4 episodes x 6 turns, 1 repetition."})


def build_batch(args: BenchGiGPOArguments):
    """Episodes of ALFWorld-like walks: (state digests, observation texts, invalid answers, rewards)."""
    rng = random.Random(args.seed)
    digests, texts, invalid, rewards = [], [], [], []
    for g in range(args.groups):
        things = [f"{rng.choice(['apple', 'mug', 'knife', 'book', 'pen'])} {i}" for i in range(12)]
        for _ in range(args.num_generations):
            place, moved = 0, 0
            d, t, bad = [], [], []
            for _ in range(args.turns):
                seen = ", ".join(f"a {x}" for x in things[place % 7 : place % 7 + 5])
                text = f"You arrive at loc {place}. On the countertop {place}, you see {seen}."
                text = (text + " You are facing the countertop and the cabinet. " * 10)[: args.obs_chars]
                d.append(hashlib.sha1(f"{g}/{place}/{moved}".encode()).hexdigest()[:20])
                t.append(f"game {g}: {text}")
                bad.append(rng.random() < 0.1)
                if not bad[-1]:
                    place = rng.randrange(min(args.locations, 1 + len(t)))  # early turns revisit few places
                    moved += rng.random() < 0.05
            digests.append(d)
            texts.append(t)
            invalid.append(bad)
            rewards.append(10.0 * (rng.random() < 0.3) - 0.1 * sum(bad))
    return digests, texts, invalid, rewards


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def rows_of(turn_counts, layout: str):
    from trl_epo.rows import TrainingRow

    rows = []
    for e, turns in enumerate(turn_counts):
        if layout == "step":
            rows += [TrainingRow([0] * 8, [1] * 20, [1] * 20, [t] * 20, e) for t in range(turns)]
        else:
            mask = ([0] * 30 + [1] * 20) * turns
            ids = [t for t in range(turns) for _ in range(50)]
            rows.append(TrainingRow([0] * 8, [1] * len(mask), mask, ids, e))
    return rows


def main(argv=None) -> dict:
    import torch
    from trl import TrlParser

    from trl_epo.gigpo import gigpo_advantages, set_turn_advantages
    from trl_epo.rows import group_advantages

    (args,) = TrlParser(BenchGiGPOArguments).parse_args_and_config(args=argv)
    if args.tiny:
        args.groups, args.num_generations, args.turns, args.repeats = 2, 4, 6, 1
    torch.set_num_threads(1)
    digests, texts, invalid, rewards = build_batch(args)
    g = args.num_generations
    counts = torch.tensor([len(d) for d in digests], dtype=torch.float32)
    reward_tensor = torch.tensor(rewards)
    results: dict = {"settings": asdict(args), "turns_total": sum(len(d) for d in digests), "ms": {}, "metrics": {}}

    seconds, episode = timed(lambda: group_advantages(reward_tensor, g, "group", "rows", counts), args.repeats)
    results["ms"]["grpo group_advantages"] = 1000 * seconds
    episode = episode.tolist()
    per_turn = None
    for name, anchors, similarity in (
        ("gigpo exact, state digests", digests, None),
        ("gigpo exact, observation texts", texts, None),
        ("gigpo similarity 0.95, observation texts", texts, 0.95),
    ):
        seconds, (per_turn, stats) = timed(
            lambda a=anchors, s=similarity: gigpo_advantages(
                episode, rewards, a, invalid, g, 0.95, 1.0, "mean_std_norm", s, 0.1
            ),
            args.repeats,
        )
        results["ms"][name] = 1000 * seconds
        results["metrics"][name] = stats.metrics()
    for layout in ("step", "packed"):
        rows = rows_of([len(d) for d in digests], layout)
        seconds, _ = timed(lambda r=rows: set_turn_advantages(r, per_turn), args.repeats)
        results["ms"][f"set_turn_advantages, {layout} rows ({len(rows)})"] = 1000 * seconds
    for key, value in results["ms"].items():
        print(f"{key:55s} {value:9.2f} ms")
    for key, value in results["metrics"].items():
        print(f"{key:55s} {json.dumps({k: round(v, 3) for k, v in value.items()})}")
    if args.output:
        from trl_epo.run_files import write_json_atomic

        write_json_atomic(os.path.abspath(args.output), results)
    return results


if __name__ == "__main__":
    main()
