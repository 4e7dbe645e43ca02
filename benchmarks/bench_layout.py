"""Training layouts of windowed multi-turn episodes: one row per turn ("step") vs one packed row per episode.

From real episode lengths in the paper's windowed prompt format (`env_history_turns=2`): ScienceWorld gold paths,
ALFWorld expert games (the shared real games, else generated ones) and toy-env expert episodes, tokenized with the
rollout's own chat segments. Per source and layout:

* rows, real tokens, padding fraction (rows cut into forward chunks under `env_forward_token_budget`, each chunk
  padded to its longest row, as `EPOTrainer` trains them), the longest forward in tokens;
* attention FLOPs of the forwards (4 * L^2 * d per layer and row: a packed row attends over its whole length under
  sdpa/eager, which is what transformers does for position-id-packed rows) and the dense B x L x L mask a packed
  forward needs;
* the measured CPU peak memory of forward + loss + backward of a small Qwen2-shaped model (trl's fused LM head, with
  entropies, as the trainer computes them) on the longest episodes, chunk by chunk (peak live tensor bytes from the
  profiler's allocation events, as `bench_loss.py`);
* a projection for Qwen2.5-7B (ScienceWorld, 30 turns) and Qwen2.5-3B (ALFWorld, 50 turns) at the paper's lengths
  (2048-token prompts, 512-token answers) from the same formulas.

    python benchmarks/bench_layout.py --output benchmarks/results/bench_layout.json
    python benchmarks/bench_layout.py --tiny        # seconds: the toy source only, tiny shapes (the test runs it)
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAPER = {  # model, layers, hidden, turns, prompt tokens, answer tokens (paper: prompt 2048 / response 512 per turn)
    "Qwen2.5-7B / ScienceWorld": (28, 3584, 30, 2048, 512),
    "Qwen2.5-3B / ALFWorld": (36, 2048, 50, 2048, 512),
}


@dataclass
class BenchLayoutArguments:
    sources: list[str] = field(
        default_factory=lambda: ["toy", "sciworld", "alfworld"], metadata={"help": "Episode sources."}
    )
    num_episodes: int = field(default=16, metadata={"help": "Episodes per source."})
    history_turns: int = field(default=2, metadata={"help": "Windowed prompts: the last k steps (paper: 2)."})
    token_budget: int = field(default=16384, metadata={"help": "env_forward_token_budget of the step layout."})
    hidden_size: int = field(default=128, metadata={"help": "Width of the small Qwen2 model measured."})
    num_layers: int = field(default=2, metadata={"help": "Depth of the small Qwen2 model measured."})
    measure_episodes: int = field(default=2, metadata={"help": "Longest episodes per source measured (memory)."})
    max_measure_tokens: int = field(
        default=12000, metadata={"help": "Measured packed rows are cut to this many tokens (CPU attention is L^2)."}
    )
    tiny: bool = field(default=False, metadata={"help": "Seconds-long smoke run (toy source, tiny shapes)."})
    output: str | None = field(default=None, metadata={"help": "Write the result JSON here."})


# --------------------------------------------------------------------------------------------------------------------
# Episodes: per turn (prompt ids, answer ids), in the windowed format
# --------------------------------------------------------------------------------------------------------------------


def tokenized_turns(segments, tokenizer, turns) -> list[tuple[list[int], list[int]]]:
    eos = [tokenizer.eos_token_id]
    return [(segments.prompt(prompt), segments.encode_data(answer["content"]) + eos) for prompt, answer in turns]


def toy_episodes(n: int, history: int, segments, tokenizer):
    from trl_epo.envs.prompting import expert_turns
    from trl_epo.envs.registry import get_env
    from trl_epo.envs.toy import ToyEnv, expert_actions, make_tasks

    style = get_env("toy").prompt_style()
    episodes = []
    for task in make_tasks("ood", n, seed=1):
        env = ToyEnv()
        result = env.reset(task)
        steps = []
        for action in expert_actions(task):
            steps.append((result, action))
            result = env.step(action)
            if result.done:
                break
        description = steps[0][0].info.get("task_description", "")
        episodes.append(tokenized_turns(segments, tokenizer, expert_turns(style, description, steps, history)))
    return episodes


def sciworld_episodes(n: int, history: int, segments, tokenizer):
    from trl_epo.envs.registry import get_env
    from trl_epo.envs.sciworld import gold_episodes, make_tasks

    style = get_env("sciworld").prompt_style()
    gold = gold_episodes(make_tasks("train", num_tasks=n, seed=0), env_kwargs={"max_turns": 30})
    return [tokenized_turns(segments, tokenizer, e.windowed_turns(history, style)) for e in gold]


def alfworld_episodes(n: int, history: int, segments, tokenizer):
    import tarfile
    import tempfile

    from trl_epo.envs.alfworld import expert_sft_dataset, make_tasks

    tarball = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        "..",
        "shared",
        "data",
        "alfworld",
        "json_2.1.1_valid_seen_valid_train.tar.xz",
    )
    root = tempfile.mkdtemp(prefix="bench-layout-alfworld-")
    if os.path.exists(tarball):
        with tarfile.open(tarball) as archive:
            archive.extractall(root, filter="data")
        split = "iid"
    else:
        from trl_epo.envs.alfworld.game_writer import generate_games

        generate_games(root, "train", per_type=max(1, n // 6 + 1), seed=0)
        split = "train"
    tasks = make_tasks(split, root)
    tasks = [tasks[i * len(tasks) // n] for i in range(min(n, len(tasks)))]  # spread over the (sorted) task types
    data = expert_sft_dataset(tasks, data_root=root, history=history, skip_failures=True)
    by_task: dict[str, list] = {}
    for row in data:
        by_task.setdefault(row["task"], []).append((row["turn"], row["prompt"], row["completion"][0]))
    return [
        tokenized_turns(segments, tokenizer, [(p, a) for _, p, a in sorted(turns, key=lambda t: t[0])])
        for turns in by_task.values()
    ]


SOURCES = {"toy": toy_episodes, "sciworld": sciworld_episodes, "alfworld": alfworld_episodes}


# --------------------------------------------------------------------------------------------------------------------
# Rows, chunks and their cost
# --------------------------------------------------------------------------------------------------------------------


def layout_rows(episodes, layout: str):
    from trl_epo.rows import TrainingRow

    rows = []
    for e, turns in enumerate(episodes):
        if layout == "step":
            for t, (prompt, answer) in enumerate(turns):
                rows.append(TrainingRow(prompt, answer, [1] * len(answer), [t] * len(answer), e))
            continue
        completion, mask, turn_ids = list(turns[0][1]), [1] * len(turns[0][1]), [0] * len(turns[0][1])
        for t, (prompt, answer) in enumerate(turns[1:], start=1):
            completion += prompt + answer
            mask += [0] * len(prompt) + [1] * len(answer)
            turn_ids += [t] * (len(prompt) + len(answer))
        rows.append(TrainingRow(turns[0][0], completion, mask, turn_ids, e))
    return rows


def chunked(rows, budget: int):
    from trl_epo.rows import token_chunks

    return [[rows[i] for i in chunk] for chunk in token_chunks([r.length for r in rows], budget)]


def layout_stats(rows, budget: int, hidden: int, layers: int) -> dict:
    from trl_epo.rows import attention_flops, dense_mask_bytes, padding_fraction

    chunks = chunked(rows, budget)
    widths = [max(len(r.prompt_ids) for r in c) + max(len(r.completion_ids) for r in c) for c in chunks]
    return {
        "rows": len(rows),
        "tokens": sum(r.length for r in rows),
        "forwards": len(chunks),
        "padding_fraction": padding_fraction(chunks),
        "longest_row_tokens": max(r.length for r in rows),
        "longest_forward_tokens": max(len(c) * w for c, w in zip(chunks, widths)),
        "attention_flops": attention_flops(rows, hidden, layers),
        "packed_mask_bytes_max": max(dense_mask_bytes(len(c), w, 1) for c, w in zip(chunks, widths)),
    }


def measure_peak(model, rows, budget: int, marker) -> int:
    """Peak live CPU tensor bytes over the chunks of forward + loss + backward (each chunk's backward frees it)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from trl_epo.packing import row_logps_and_entropies
    from trl_epo.rows import collate

    peak = 0
    for chunk in chunked(rows, budget):
        batch = collate(chunk, pad_token_id=0)
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        keep = batch["completion_ids"].size(1)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            logps, entropies, _ = row_logps_and_entropies(
                model, ids, mask, keep, True, False, marker, contextlib.nullcontext
            )
            action = batch["completion_mask"] * batch["tool_mask"]
            loss = -((logps + 1e-3 * entropies) * action).sum() / action.sum().clamp(min=1)
            loss.backward()
        model.zero_grad(set_to_none=True)
        live = 0
        events = sorted(
            (e for e in prof.profiler.kineto_results.events() if e.nbytes() != 0), key=lambda e: e.start_ns()
        )
        for event in events:
            live += event.nbytes()
            peak = max(peak, live)
    return peak


def cut_packed(row, limit: int):
    from trl_epo.rows import TrainingRow

    keep = max(1, limit - len(row.prompt_ids))
    return TrainingRow(
        row.prompt_ids, row.completion_ids[:keep], row.env_mask[:keep], row.turn_ids[:keep], row.episode
    )


def projection(layers: int, hidden: int, turns: int, prompt: int, answer: int, budget: int) -> dict:
    """One episode at the paper's lengths, per layout: forward tokens, attention FLOPs, packed mask bytes and the
    bf16 activation bytes of one layer's attention scores when not fused (the sdpa math path)."""
    step_rows, step_len = turns, prompt + answer
    packed_len = turns * (prompt + answer)
    per_forward = max(1, budget // step_len)
    return {
        "step": {
            "rows": step_rows,
            "longest_forward_tokens": min(step_rows, per_forward) * step_len,
            "attention_flops": 4 * step_len**2 * hidden * layers * step_rows,
        },
        "packed": {
            "rows": 1,
            "longest_forward_tokens": packed_len,
            "attention_flops": 4 * packed_len**2 * hidden * layers,
            "dense_mask_bytes": packed_len**2,
            "bf16_mask_bias_bytes": 2 * packed_len**2,
        },
        "attention_flops_ratio_packed_over_step": packed_len**2 / (step_rows * step_len**2),
    }


def run(args: BenchLayoutArguments) -> dict:
    import torch
    from trl.trainer import add_fused_lm_head

    from trl_epo.rollout import ChatSegments
    from trl_epo.tiny import build_tiny_model, build_tiny_tokenizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.tiny:
        args.sources, args.num_episodes, args.measure_episodes, args.hidden_size = ["toy"], 4, 1, 32
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(
        tokenizer, hidden_size=args.hidden_size, num_layers=args.num_layers, max_position_embeddings=65536, seed=0
    )
    add_fused_lm_head(model, temperature=1.0, outputs=("log_probs", "entropy"))
    result = {"settings": asdict(args), "load_average": os.getloadavg(), "sources": {}}
    for source in args.sources:
        start = time.perf_counter()
        try:
            segments = ChatSegments(tokenizer, _system(source))
            episodes = SOURCES[source](args.num_episodes, args.history_turns, segments, tokenizer)
        except ImportError as error:
            result["sources"][source] = {"skipped": str(error)}
            continue
        marker = segments.block_marker()
        entry = {
            "episodes": len(episodes),
            "turns": [len(e) for e in episodes],
            "mean_turns": statistics.mean(len(e) for e in episodes),
        }
        for layout in ("step", "packed"):
            rows = layout_rows(episodes, layout)
            entry[layout] = layout_stats(rows, args.token_budget, args.hidden_size, args.num_layers)
        longest = sorted(range(len(episodes)), key=lambda i: -sum(len(p) + len(a) for p, a in episodes[i]))
        chosen = [episodes[i] for i in longest[: args.measure_episodes]]
        step_rows = layout_rows(chosen, "step")
        packed_rows = [cut_packed(r, args.max_measure_tokens) for r in layout_rows(chosen, "packed")]
        entry["measured"] = {
            "episodes": len(chosen),
            "packed_row_tokens": [r.length for r in packed_rows],
            "step_longest_turn_tokens": max(r.length for r in step_rows),
            "step_peak_bytes": measure_peak(model, step_rows, args.token_budget, None),
            "step_peak_bytes_one_turn_per_forward": measure_peak(model, step_rows, 1, None),
            "packed_peak_bytes": measure_peak(model, packed_rows, args.token_budget, marker),
        }
        entry["seconds"] = time.perf_counter() - start
        result["sources"][source] = entry
        print(report_source(source, entry), flush=True)
    result["projection"] = {name: projection(*dims, budget=args.token_budget) for name, dims in PAPER.items()}
    print(report_projection(result["projection"]))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _system(source: str):
    from trl_epo.envs.registry import get_env

    return get_env(source).prompt_style().system_messages()


def report_source(source: str, entry: dict) -> str:
    lines = [
        f"\n## {source}: {entry['episodes']} episodes, mean {entry['mean_turns']:.1f} turns (max "
        f"{max(entry['turns'])})",
        "| layout | rows | tokens | forwards | padding | longest forward | attention GFLOPs | packed mask MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layout in ("step", "packed"):
        s = entry[layout]
        lines.append(
            f"| {layout} | {s['rows']} | {s['tokens']} | {s['forwards']} | {s['padding_fraction']:.1%} | "
            f"{s['longest_forward_tokens']} | {s['attention_flops'] / 1e9:.2f} | "
            f"{s['packed_mask_bytes_max'] / 2**20:.1f} |"
        )
    m = entry["measured"]
    lines.append(
        f"measured loss+backward peak on the {m['episodes']} longest episode(s): step "
        f"{m['step_peak_bytes'] / 2**20:.1f} MiB with the token budget, "
        f"{m['step_peak_bytes_one_turn_per_forward'] / 2**20:.1f} MiB one turn per forward (longest turn "
        f"{m['step_longest_turn_tokens']} tokens), packed {m['packed_peak_bytes'] / 2**20:.1f} MiB (rows of "
        f"{m['packed_row_tokens']} tokens)"
    )
    return "\n".join(lines)


def report_projection(projection: dict) -> str:
    lines = [
        "\n## projection at the paper's lengths (one episode)",
        "| setting | layout | longest forward tokens | attention TFLOPs | dense mask GiB | bf16 mask bias GiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in projection.items():
        s, k = p["step"], p["packed"]
        lines.append(f"| {name} | step | {s['longest_forward_tokens']} | {s['attention_flops'] / 1e12:.1f} | - | - |")
        lines.append(
            f"| {name} | packed | {k['longest_forward_tokens']} | {k['attention_flops'] / 1e12:.1f} | "
            f"{k['dense_mask_bytes'] / 2**30:.1f} | {k['bf16_mask_bias_bytes'] / 2**30:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    from trl import TrlParser

    (args,) = TrlParser(BenchLayoutArguments).parse_args_and_config(args=argv)
    return run(args)


if __name__ == "__main__":
    main()
