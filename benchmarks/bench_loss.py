"""EPOTrainer vs GRPOTrainer: the cost of the EPO terms in `compute_loss` + `backward`, on identical batches.

    python benchmarks/bench_loss.py                       # default CPU setting (~5 minutes on 1 idle core)
    python benchmarks/bench_loss.py --tiny                # seconds (run by the tests)
    python benchmarks/bench_loss.py --device cuda --dtype bfloat16 --hidden_size 896 --num_layers 24 \
        --num_heads 14 --vocab_size 151936 --batch_size 8 --completion_length 2048   # Qwen2.5-0.5B-sized, on a GPU

Both trainers live in one process, each with its own copy of one model (same seed, identical weights);
each repetition runs `trainer.compute_loss(model, batch)` then `loss.backward()` on the same multi-turn batch (prompt,
completion with an env mask and turn ids, advantages), in alternating order (GRPO first on even repetitions, EPO
first on odd ones), after warm-up repetitions. The EPO trainer has the paper's objective fully on: entropy bonus,
hinge corridor with a reference already set (so the corridor branch runs), phase weight, once-per-step reference
update. Reported: the median time of each and their ratio (with the ratio's interquartile range over repetitions).

Two more arms split the overhead into its causes (`--arms`): `epo_off` (EPOTrainer with `epo_entropy_coef=0`: the
EPO bookkeeping, metrics and reference update, but no gradient through the entropies) and `trl_entropy`
(GRPOTrainer with TRL's own `entropy_coef=1e-3`: TRL's entropy gradient, no EPO code). Any objective that puts the
entropy into the loss makes the fused LM-head backward also compute the entropy's gradient, d H / d z_j =
-p_j (log p_j + H), over every position and the whole vocabulary; GRPO alone skips it. On CUDA this is fused into
TRL's Triton kernel; on CPU it runs as extra torch ops on each [tokens x vocab-chunk] tile.

Peak memory:
* CPU: PyTorch has no allocator statistics for CPU tensors, so the benchmark records every CPU allocation and free
  made by PyTorch's allocator during one `compute_loss + backward` with the profiler (`profile_memory=True`; the
  allocator reports each (de)allocation to it), orders the events by time and takes the maximum of the running sum:
  the peak of live tensor bytes above what was live when the call began. It counts exactly the tensors the call
  creates (activations, logits tiles, gradients), not Python objects or malloc caching, and is deterministic.
* CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the bytes allocated at the start.

Results go to stdout (a table) and to `--output` (JSON).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


ARMS = {
    "grpo": "GRPOTrainer (baseline)",
    "epo": "EPOTrainer, full EPO (lambda=1e-3, hinge corridor, phase weight)",
    "epo_off": "EPOTrainer with epo_entropy_coef=0 (EPO bookkeeping and metrics only, no entropy gradient)",
    "trl_entropy": "GRPOTrainer with TRL's own entropy bonus (entropy_coef=1e-3): the entropy-gradient cost alone",
}


@dataclass
class BenchLossArguments:
    hidden_size: int = field(default=256, metadata={"help": "Model width."})
    num_layers: int = field(default=4, metadata={"help": "Transformer layers."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads."})
    vocab_size: int = field(default=32768, metadata={"help": "Vocabulary size (the LM head dominates entropy cost)."})
    batch_size: int = field(default=2, metadata={"help": "Sequences (episodes) per batch."})
    prompt_length: int = field(default=128, metadata={"help": "Prompt tokens per sequence."})
    completion_length: int = field(default=512, metadata={"help": "Completion tokens (answers + env observations)."})
    turns: int = field(default=8, metadata={"help": "Turns per episode; half of each turn's tokens are model tokens."})
    loss_type: str = field(default="dapo", metadata={"help": "TRL GRPO loss type (the same for both)."})
    repetitions: int = field(default=10, metadata={"help": "Timed repetitions per trainer (interleaved)."})
    warmup: int = field(default=3, metadata={"help": "Untimed warm-up repetitions per trainer."})
    memory_repetitions: int = field(default=3, metadata={"help": "Peak-memory measurements per trainer."})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda."})
    dtype: str = field(default="float32", metadata={"help": "float32 or bfloat16 (model weights and autocast)."})
    threads: int = field(default=1, metadata={"help": "torch intra-op threads (CPU)."})
    seed: int = field(default=0, metadata={"help": "Seed of the model and the batch."})
    output: str | None = field(default=None, metadata={"help": "JSON file for the results."})
    arms: list[str] = field(
        default_factory=lambda: ["grpo", "epo", "epo_off", "trl_entropy"],
        metadata={
            "help": "Trainers to time (grpo and epo always): " + "; ".join(f"{k}: {v}" for k, v in ARMS.items())
        },
    )
    tiny: bool = field(default=False, metadata={"help": "Seconds-long smoke setting."})

    def apply_tiny(self) -> None:
        self.hidden_size, self.num_layers, self.num_heads, self.vocab_size = 32, 1, 2, 512
        self.batch_size, self.prompt_length, self.completion_length, self.turns = 2, 8, 24, 3
        self.repetitions, self.warmup, self.memory_repetitions = 2, 1, 1


# --------------------------------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------------------------------


def build_model(args: BenchLossArguments, pad_token_id: int, eos_token_id: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=max(1, args.num_heads // 2),
        max_position_embeddings=args.prompt_length + args.completion_length + 8,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
    )
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(args.device)


def build_batch(args: BenchLossArguments, device):
    """A multi-turn batch as the rollout produces it: per turn, model tokens then environment tokens; the last rows
    end early (right padding); advantages of both signs."""
    import torch

    g = torch.Generator().manual_seed(args.seed)
    B, P, C, T = args.batch_size, args.prompt_length, args.completion_length, args.turns
    prompt_ids = torch.randint(3, args.vocab_size, (B, P), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, : P // 4] = 0  # left padding
    completion_ids = torch.randint(3, args.vocab_size, (B, C), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    tool_mask = torch.zeros_like(completion_ids)
    turn_ids = torch.full_like(completion_ids, -1)
    per_turn = max(2, C // T)
    for b in range(B):
        length = C if b < B // 2 or B == 1 else C - (b * C) // (2 * B)  # later rows are shorter
        completion_mask[b, length:] = 0
        for t in range(T):
            start = t * per_turn
            if start >= length:
                break
            end = min(length, start + per_turn)
            turn_ids[b, start:end] = t
            tool_mask[b, start : start + max(1, (end - start) // 2)] = 1  # the answer; the rest is the observation
    advantages = torch.randn(B, generator=g)
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "tool_mask": tool_mask,
        "turn_ids": turn_ids,
        "advantages": advantages,
    }
    batch["num_items_in_batch"] = (completion_mask * tool_mask).sum()
    return {k: v.to(device) for k, v in batch.items()}


def build_trainer(arm: str, args: BenchLossArguments, model, tokenizer, output_dir: str):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from trl_epo import EPOConfig, EPOTrainer

    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        num_generations=args.batch_size,
        max_completion_length=args.completion_length,
        loss_type=args.loss_type,
        report_to="none",
        bf16=args.dtype == "bfloat16",
        use_cpu=args.device == "cpu",
        gradient_checkpointing=False,
        max_steps=100,
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1000,
        dataloader_num_workers=0,
    )
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "x"}]] * args.batch_size})

    def reward(completions, **kwargs):  # never called: compute_loss only
        return [0.0] * len(completions)

    epo_settings = dict(epo_smoothing="hinge", epo_smoothing_alpha=0.1, epo_kappa_low=0.5, epo_kappa_high=1.5)
    if arm == "grpo":
        cls, config = GRPOTrainer, GRPOConfig(**common)
    elif arm == "trl_entropy":
        cls, config = GRPOTrainer, GRPOConfig(**common, entropy_coef=1e-3)
    elif arm == "epo":
        cls, config = EPOTrainer, EPOConfig(**common, epo_entropy_coef=1e-3, **epo_settings)
    elif arm == "epo_off":
        cls, config = EPOTrainer, EPOConfig(**common, epo_entropy_coef=0.0, **epo_settings)
    else:
        raise ValueError(f"Unknown arm {arm!r}; use {sorted(ARMS)}.")
    trainer = cls(model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    trainer.state.max_steps = 100
    trainer.model.train()
    return trainer


def epo_terms_seconds(args: BenchLossArguments, model, tokenizer, batch, output_dir: str, repetitions: int = 30):
    """Median time of EPOTrainer's own additions alone: its real `_compute_loss` code (trajectory weights, corridor,
    phase weight, metrics, reference bookkeeping) and the backward of its terms, with TRL's base loss replaced by a
    stub that hands over synthetic per-token entropies (a leaf tensor) instead of running the model."""
    import torch
    from trl import GRPOTrainer

    from trl_epo import EPOTrainer

    shape = batch["completion_ids"].shape

    class BaseLossStub(GRPOTrainer):
        def _compute_loss(self, model, inputs):
            self._entropy_leaf = (torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 4).requires_grad_()
            self._epo_entropies = self._entropy_leaf  # what EPOTrainer captures from the loss forward
            return self._entropy_leaf.new_zeros((), requires_grad=True)

    class EPOTermsOnly(EPOTrainer, BaseLossStub):  # EPOTrainer's super()._compute_loss is the stub
        def _get_per_token_logps_and_entropies(self, *a, **k):  # pragma: no cover - never called
            raise AssertionError

    trainer = build_trainer("epo", args, model, tokenizer, output_dir)
    trainer.__class__ = EPOTermsOnly
    from trl_epo.objective import EntropyReference, StepEntropy

    trainer.epo_reference = EntropyReference("cumulative")
    trainer.epo_reference.update(StepEntropy(mean=2.0, turn_means={}))
    times = []
    for rep in range(repetitions + 3):
        start = time.perf_counter()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        _sync(args.device)
        if rep >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def set_reference(trainer, model, batch) -> None:
    """Give an EPOTrainer an entropy reference equal to the batch's entropy, so the corridor branch runs (k > 0)."""
    import torch

    from trl_epo.objective import EntropyReference, StepEntropy

    with torch.no_grad():
        trainer._compute_loss(model, dict(batch))
    trainer.epo_reference = EntropyReference("cumulative")
    entropy = float(trainer._metrics["train"]["epo/entropy"][-1])
    trainer.epo_reference.update(StepEntropy(mean=entropy, turn_means={}))


# --------------------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------------------


def loss_and_backward(trainer, model, batch) -> None:
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(trainer, model, batch, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    loss_and_backward(trainer, model, batch)
    _sync(device)
    return time.perf_counter() - start


def peak_memory(trainer, model, batch, device: str) -> int:
    """Peak bytes of live tensors above the starting level during one compute_loss + backward (see the docstring)."""
    import torch

    model.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_and_backward(trainer, model, batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        loss_and_backward(trainer, model, batch)
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()) == "DeviceType.CPU"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def quartiles(values):
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return q[0], q[2]


def run(args: BenchLossArguments) -> dict:
    import torch

    from trl_epo.tiny import build_tiny_tokenizer

    if args.tiny:
        args.apply_tiny()
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    tokenizer = build_tiny_tokenizer()
    arms = list(dict.fromkeys(["grpo", "epo", *args.arms]))
    # Identical models (same seed), one per trainer: each trainer patches its own model's LM head.
    models = {arm: build_model(args, tokenizer.pad_token_id, tokenizer.eos_token_id) for arm in arms}
    batch = build_batch(args, args.device)
    with tempfile.TemporaryDirectory() as output_dir:
        trainers = {arm: build_trainer(arm, args, models[arm], tokenizer, output_dir) for arm in arms}
        for arm in arms:
            if arm.startswith("epo"):
                set_reference(trainers[arm], models[arm], batch)
        for _ in range(args.warmup):
            for arm in arms:
                loss_and_backward(trainers[arm], models[arm], batch)
        times = {arm: [] for arm in arms}
        memory = {arm: [] for arm in arms}
        for rep in range(max(args.repetitions, args.memory_repetitions)):
            shift = rep % len(arms)
            order = arms[shift:] + arms[:shift]  # rotate, so no arm always runs first or after the same one
            if rep % 2:
                order = order[::-1]
            for arm in order:
                if rep < args.repetitions:
                    times[arm].append(timed(trainers[arm], models[arm], batch, args.device))
            for arm in order:
                if rep < args.memory_repetitions:
                    memory[arm].append(peak_memory(trainers[arm], models[arm], batch, args.device))
        out_of_corridor = trainers["epo"]._metrics["train"]["epo/out_of_corridor_frac"][-1]
        terms_only = epo_terms_seconds(args, models["epo"], tokenizer, batch, output_dir)

    median = {arm: statistics.median(v) for arm, v in times.items()}
    peak = {arm: statistics.median(v) for arm, v in memory.items()}
    arm_results = {}
    for arm in arms:
        paired = [a / g for g, a in zip(times["grpo"], times[arm])]
        arm_results[arm] = {
            "description": ARMS[arm],
            "time_s": {"median": median[arm], "min": min(times[arm]), "max": max(times[arm])},
            "time_ratio": median[arm] / median["grpo"],
            "time_ratio_paired_median": statistics.median(paired),
            "time_ratio_paired_iqr": list(quartiles(paired)),
            "peak_bytes": peak[arm],
            "peak_bytes_all": memory[arm],
            "memory_ratio": peak[arm] / peak["grpo"] if peak["grpo"] else float("nan"),
        }
    epo = arm_results["epo"]
    return {
        "settings": asdict(args),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "parameters": sum(p.numel() for p in models["grpo"].parameters()),
        "completion_tokens": int(batch["completion_mask"].sum()),
        "model_tokens": int(batch["num_items_in_batch"]),
        "out_of_corridor_frac": out_of_corridor,
        "epo_terms_only_s": terms_only,
        "epo_terms_only_fraction_of_grpo": terms_only / median["grpo"],
        "arms": arm_results,
        "time_ratio": epo["time_ratio"],
        "time_ratio_paired_median": epo["time_ratio_paired_median"],
        "time_ratio_paired_iqr": epo["time_ratio_paired_iqr"],
        "memory_ratio": epo["memory_ratio"],
        "memory_method": "cuda max_memory_allocated" if args.device != "cpu" else "profiler allocation events (CPU)",
        "targets": {"time_ratio": 1.03, "memory_ratio": 1.02},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def report(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"model: qwen2 h={s['hidden_size']} L={s['num_layers']} V={s['vocab_size']} ({result['parameters'] / 1e6:.1f}M "
        f"params, {s['dtype']}, {result['device']}); batch {s['batch_size']} x ({s['prompt_length']} prompt + "
        f"{s['completion_length']} completion, {s['turns']} turns, {result['model_tokens']} model tokens); "
        f"loss_type={s['loss_type']}; {s['repetitions']} interleaved reps; threads={s['threads']}; "
        f"load average {result['load_average']}",
        "| arm | compute_loss + backward, median s | time ratio vs GRPO (paired median, IQR) | peak MiB | "
        "memory ratio vs GRPO |",
        "|---|---|---|---|---|",
    ]
    for arm, r in result["arms"].items():
        low, high = r["time_ratio_paired_iqr"]
        lines.append(
            f"| {arm} | {r['time_s']['median']:.4f} | {r['time_ratio']:.3f} ({r['time_ratio_paired_median']:.3f}, "
            f"{low:.3f}-{high:.3f}) | {r['peak_bytes'] / 2**20:.1f} | {r['memory_ratio']:.3f} |"
        )
    lines.append(
        f"EPOTrainer's own terms alone (its _compute_loss code + their backward, base loss stubbed): "
        f"{1000 * result['epo_terms_only_s']:.2f} ms per call = "
        f"{100 * result['epo_terms_only_fraction_of_grpo']:.2f}% of GRPO's compute_loss + backward"
    )
    lines.append(
        f"targets for epo: time <= {result['targets']['time_ratio']}, memory <= {result['targets']['memory_ratio']}"
    )
    return "\n".join(lines)


def main(argv=None) -> dict:
    from trl import TrlParser

    (args,) = TrlParser(BenchLossArguments).parse_args_and_config(args=list(argv) if argv is not None else None)
    result = run(args)
    print(report(result))
    if args.output:
        from trl_epo.run_files import write_json_atomic

        write_json_atomic(os.path.abspath(args.output), result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
