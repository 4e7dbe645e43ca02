"""The GPU check of trl_epo: one script, one H100 (or H200), no network, at most ~8 minutes.

    python benchmarks/gpu_check.py                 # on the GPU machine -> benchmarks/results/gpu_check.json + a table
    python benchmarks/gpu_check.py --smoke         # the same code paths on CPU with tiny shapes, in seconds (tested)

Every model is built from a config with random weights (nothing is downloaded; the tokenizer is trl_epo's tiny
local one). Sections (`--sections`; one that fails is recorded with its error and the others still run):

* ``loss``: bf16 EPOTrainer vs GRPOTrainer `compute_loss` + backward at Qwen2.5-0.5B and -1.5B shapes on a batch of
  multi-turn episodes (8 turns of ~512 tokens, half of each turn model tokens; `bench_loss.py`'s batch and
  trainers): median time ratio and peak-memory ratio (goals <= 1.03x / <= 1.02x).
* ``entropy_kernel``: TRL's chunked log-prob kernel (`trl.kernels.chunked_logprob`, its Triton kernels on CUDA) vs a
  naive fp32 log-softmax over the full vocabulary: max abs difference of log-probs, entropies and the gradients of a
  loss on both w.r.t. the hidden states and the LM head (entropy gradient alone, and together).
* ``rows``: windowed episodes of 8 / 16 / 30 turns (~512 tokens each) trained as one row per turn ("step") or one
  packed row per episode ("packed"): one training micro-step (`trl_epo.rows` + the trainer's row forward and
  backward in token-budgeted chunks), peak memory and time.
* ``rollout``: a multi-turn HF-generate rollout on the toy env (a Qwen2.5-0.5B-shaped body) with and without KV-cache
  reuse: generated tokens/s.

Offline packages: the GPU image has torch, transformers, accelerate and peft but not trl or datasets. Before
importing them the script installs, from `benchmarks/wheels/` (`pip --no-index --no-deps --target`), every
distribution of `WHEELS` that is missing or older than this project needs: trl and datasets, their two pure-Python
needs the image lacks (dill, multiprocess; the rest -- pandas, pyarrow, xxhash, psutil, fsspec, jinja2 -- are in the
image) and transformers (the image's 5.17 predates the `generate(cache=...)` API trl_epo's KV reuse uses).
"""

from __future__ import annotations

import argparse
import gc
import glob
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WHEEL_DIR = os.path.join(HERE, "wheels")
SITE = os.path.join(tempfile.gettempdir(), "trl_epo_gpu_check_site")
WHEELS = {"trl": "1.16.0", "datasets": "4.7.0", "dill": "0.3.0", "multiprocess": "0.70.0", "transformers": "5.24.0"}
"""Distribution -> the lowest version this project runs with; each has its wheel in benchmarks/wheels/."""
SECTIONS = ("loss", "entropy_kernel", "rows", "rollout")
QWEN25 = {  # the Qwen2.5 body shapes (vocabulary 151936, tied embeddings)
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12),
    "smoke": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
}
FULL = dict(
    device="cuda", dtype="bfloat16", shapes=["0.5b", "1.5b"], vocab=151936, batch=2, prompt=512, turn_tokens=512,
    turns=8, reps=5, warmup=2, kernel_tokens=4096, row_turns=[8, 16, 30], row_episodes=4, row_prompt=384,
    row_answer=128, row_reps=2, rollout_episodes=32, rollout_turns=8, rollout_tokens=64,
)  # fmt: skip
SMOKE = dict(
    device="cpu", dtype="float32", shapes=["smoke"], vocab=512, batch=2, prompt=8, turn_tokens=8, turns=3, reps=1,
    warmup=1, kernel_tokens=24, row_turns=[2, 3], row_episodes=2, row_prompt=8, row_answer=4, row_reps=1,
    rollout_episodes=3, rollout_turns=2, rollout_tokens=8,
)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Offline packages
# --------------------------------------------------------------------------------------------------------------------


def ensure_packages(wheel_dir: str = WHEEL_DIR, site: str = SITE) -> list[str]:
    """Install from `wheel_dir` every distribution of `WHEELS` that is missing or too old, into `site` (put first on
    `sys.path`); returns their names. Call it before importing transformers or trl."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    def too_old(name: str) -> bool:
        try:
            return Version(version(name)) < Version(WHEELS[name])
        except PackageNotFoundError:
            return True

    if os.path.isdir(site) and site not in sys.path:  # installed by an earlier run on this machine
        sys.path.insert(0, site)
        importlib.invalidate_caches()
    needed = [name for name in WHEELS if too_old(name)]
    if not needed:
        return []
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    wheels = []
    for name in needed:
        found = [w for w in glob.glob(os.path.join(wheel_dir, f"{name}-*.whl")) if "-py3-" in w or f"-{tag}-" in w]
        if not found:
            raise RuntimeError(
                f"{name} >= {WHEELS[name]} is not installed and benchmarks/wheels/ has no wheel of it for {tag}. Where "
                f"pip works: pip download --no-deps --only-binary=:all: --python-version {sys.version_info.major}."
                f"{sys.version_info.minor} -d benchmarks/wheels {name}==<version>"
            )
        wheels.append(sorted(found)[-1])
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade"]
    subprocess.run([*command, "--target", site, *wheels], check=True)
    if site not in sys.path:
        sys.path.insert(0, site)
    importlib.invalidate_caches()
    return needed


# --------------------------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_bytes(fn, device: str) -> int:
    """Peak bytes of live tensors above the starting level during `fn()`: CUDA's allocator statistics, or on CPU the
    running sum of the profiler's allocation events (as `bench_loss.peak_memory`)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
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


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def build_model(shape: str, vocab_size: int, tokenizer, device: str, dtype: str, seed: int = 0):
    """A Qwen2.5-shaped causal LM with random weights, built directly on `device`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=vocab_size,
        num_key_value_heads=1 if shape == "smoke" else 2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **QWEN25[shape],
    )
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))


# --------------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------------


def check_loss(s: dict, tokenizer, workdir: str) -> dict:
    """EPO vs GRPO compute_loss + backward, interleaved repetitions, per model shape."""
    import bench_loss

    out = {}
    for shape in s["shapes"]:
        args = bench_loss.BenchLossArguments(
            vocab_size=s["vocab"],
            batch_size=s["batch"],
            prompt_length=s["prompt"],
            completion_length=s["turns"] * s["turn_tokens"],
            turns=s["turns"],
            device=s["device"],
            dtype=s["dtype"],
        )
        models = {arm: build_model(shape, s["vocab"], tokenizer, s["device"], s["dtype"]) for arm in ("grpo", "epo")}
        batch = bench_loss.build_batch(args, s["device"])
        trainers = {arm: bench_loss.build_trainer(arm, args, models[arm], tokenizer, workdir) for arm in models}
        bench_loss.set_reference(trainers["epo"], models["epo"], batch)
        for _ in range(s["warmup"]):
            for arm in models:
                bench_loss.loss_and_backward(trainers[arm], models[arm], batch)
        times = {arm: [] for arm in models}
        for rep in range(s["reps"]):
            for arm in ("grpo", "epo") if rep % 2 == 0 else ("epo", "grpo"):
                times[arm].append(bench_loss.timed(trainers[arm], models[arm], batch, s["device"]))
        peak = {arm: bench_loss.peak_memory(trainers[arm], models[arm], batch, s["device"]) for arm in models}
        median = {arm: statistics.median(v) for arm, v in times.items()}
        out[shape] = {
            "parameters": sum(p.numel() for p in models["grpo"].parameters()),
            "tokens": int(batch["completion_mask"].sum() + batch["prompt_mask"].sum()),
            "model_tokens": int(batch["num_items_in_batch"]),
            "time_s": median,
            "times_s": times,
            "peak_bytes": peak,
            "time_ratio": median["epo"] / median["grpo"],
            "memory_ratio": peak["epo"] / peak["grpo"] if peak["grpo"] else float("nan"),
            "goals": {"time_ratio": 1.03, "memory_ratio": 1.02},
        }
        del trainers, models, batch
        free(s["device"])
    return out


def check_entropy_kernel(s: dict) -> dict:
    """TRL's chunked log-prob kernel vs a naive fp32 log-softmax, at Qwen2.5-0.5B's LM-head shape."""
    import torch
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction, _use_triton
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    device, tokens, vocab = s["device"], s["kernel_tokens"], s["vocab"]
    hidden_size = QWEN25[s["shapes"][0]]["hidden_size"]
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden0 = (torch.randn(tokens, hidden_size, generator=g) * 2).to(device)
    weight0 = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5).to(device)
    targets = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    grad_entropy = torch.randn(tokens, generator=g).to(device)
    grad_logprobs = torch.randn(tokens, generator=g).to(device)

    def run(dtype, kernel: bool, with_logprob_grad: bool):
        hidden = hidden0.to(dtype).clone().requires_grad_()  # a fresh leaf per run: no gradient shared or summed
        weight = weight0.to(dtype).clone().requires_grad_()
        if kernel:
            logprobs, entropy, *_ = ChunkedLogProbFunction.apply(
                hidden, weight, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("entropy",)
            )
        else:  # the same (dtype-rounded) inputs in fp32, full [N, V] logits
            log_p = torch.log_softmax(hidden.float() @ weight.float().t(), dim=-1)
            entropy = -(log_p.exp() * log_p).sum(-1)
            logprobs = log_p.gather(1, targets[:, None]).squeeze(1)
        loss = (entropy.float() * grad_entropy).sum()
        if with_logprob_grad:
            loss = loss + (logprobs.float() * grad_logprobs).sum()
        loss.backward()
        return [x.detach().float() for x in (logprobs, entropy, hidden.grad, weight.grad)]

    out = {"tokens": tokens, "vocab": vocab, "hidden": hidden_size, "triton": _use_triton(torch.device(device))}
    names = ("logprobs", "entropy", "grad_hidden", "grad_weight")
    for dtype in (torch.float32, getattr(torch, s["dtype"])):
        for with_logprob_grad in (False, True):
            case = f"{str(dtype).removeprefix('torch.')}_{'entropy_and_logprob_grad' if with_logprob_grad else 'entropy_grad'}"
            if case in out:
                continue
            fused, naive = run(dtype, True, with_logprob_grad), run(dtype, False, with_logprob_grad)
            out[case] = {
                name: {
                    "max_abs_diff": float((a - b).abs().max()),
                    "max_abs_reference": float(b.abs().max()),
                    "relative": float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)),
                }
                for name, a, b in zip(names, fused, naive)
            }
            del fused, naive
            free(device)
    return out


ROW_MARKER = [3, 4, 5, 6]  # the header every windowed block starts with (random tokens never form it)


def rows_of_layout(s: dict, tokenizer, workdir: str, layout: str) -> dict:
    """Time and peak memory of one training micro-step (`RowTrainingMixin._train_micro_batch`: token-budgeted
    forward/backward chunks) on the rows of `row_episodes` windowed episodes, for each number of turns."""
    import torch

    from trl_epo import EPOConfig, EPOTrainer
    from trl_epo.envs.toy import ToyEnv, make_dataset
    from trl_epo.row_training import MicroBatch
    from trl_epo.rows import StepCounts, episode_rows, schedule_rows, set_epo_weights

    device, episodes, out = s["device"], s["row_episodes"], {}
    model = build_model(s["shapes"][0], s["vocab"], tokenizer, device, s["dtype"])
    config = EPOConfig(
        output_dir=workdir,
        per_device_train_batch_size=episodes,
        num_generations=episodes,
        max_completion_length=max(s["row_turns"]) * (len(ROW_MARKER) + s["row_prompt"] + s["row_answer"]),
        bf16=s["dtype"] == "bfloat16",
        use_cpu=device == "cpu",
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        env_history_turns=2,
        env_sample_layout=layout,
        env_pool_backend="inline",
        env_packed_mask_limit_gb=64.0,
    )
    trainer = EPOTrainer(
        model, args=config, train_dataset=make_dataset("train", episodes), processing_class=tokenizer,
        env_factory=ToyEnv,
    )  # fmt: skip
    trainer.current_gradient_accumulation_steps, trainer.state.max_steps = 1, 100
    trainer._packed_block_marker = ROW_MARKER if layout == "packed" else None
    trainer.model.train()
    for turns in s["row_turns"]:
        g = torch.Generator().manual_seed(turns)
        rows = []
        for e in range(episodes):
            parts = windowed_episode(turns, s["row_prompt"], s["row_answer"], s["vocab"], ROW_MARKER, g)
            rows += episode_rows(e, *parts, None, layout)
        for row in rows:
            row.advantage = 1.0 if row.episode % 2 else -1.0
        steps, counts = schedule_rows(rows, 1, 1)
        counts = StepCounts(*counts[0].tolist())
        set_epo_weights(rows, counts, "trajectory")
        micro = MicroBatch(steps[0][0], counts)

        def step(micro=micro):
            model.zero_grad(set_to_none=True)
            trainer._train_micro_batch(model, micro)

        step()  # warm-up
        times = [timed(step, device) for _ in range(s["row_reps"])]
        out[f"{layout}_{turns}"] = {
            "layout": layout,
            "turns": turns,
            "rows": len(rows),
            "tokens": sum(r.length for r in rows),
            "forward_chunks": len(trainer._chunks(micro.rows)),
            "time_s": statistics.median(times),
            "peak_bytes": peak_bytes(step, device),
        }
    trainer.close_envs()
    return out


def windowed_episode(turns: int, prompt: int, answer: int, vocab: int, marker: list[int], g):
    """A windowed episode as the rollout records it: per turn a block (marker + prompt tokens, mask 0) then the
    answer (mask 1); the first block is the episode's prompt, observation tokens belong to the turn they prompt."""
    import torch

    def tokens(n):
        return torch.randint(len(marker) + 10, vocab, (n,), generator=g).tolist()

    prompt_ids, completion, mask, turn_ids = marker + tokens(prompt), [], [], []
    for t in range(turns):
        if t:
            block = marker + tokens(prompt)
            completion += block
            mask += [0] * len(block)
            turn_ids += [t] * len(block)
        completion += tokens(answer)
        mask += [1] * answer
        turn_ids += [t] * answer
    return prompt_ids, completion, mask, turn_ids


def check_rows(s: dict, tokenizer, workdir: str) -> dict:
    """One training micro-step on the rows of windowed episodes, step vs packed layout."""
    out = {"episodes": s["row_episodes"], "tokens_per_turn": len(ROW_MARKER) + s["row_prompt"] + s["row_answer"]}
    for layout in ("step", "packed"):
        out.update(rows_of_layout(s, tokenizer, workdir, layout))
        free(s["device"])
    for turns in s["row_turns"]:
        step, packed = out[f"step_{turns}"], out[f"packed_{turns}"]
        out[f"packed_vs_step_{turns}"] = {
            "time_ratio": packed["time_s"] / step["time_s"],
            "memory_ratio": packed["peak_bytes"] / max(1, step["peak_bytes"]),
        }
    return out


def check_rollout(s: dict, tokenizer) -> dict:
    """Toy-env rollouts with HF generate, KV-cache reuse on and off, same seed."""
    import torch

    from trl_epo.envs.toy import ToyEnv, make_tasks
    from trl_epo.rollout import ModelGenerator, MultiTurnRollout, RolloutConfig

    device = s["device"]
    model = build_model(s["shapes"][0], len(tokenizer), tokenizer, device, s["dtype"]).eval()
    tasks = make_tasks("train", s["rollout_episodes"])
    out = {"episodes": len(tasks), "max_turns": s["rollout_turns"], "max_turn_tokens": s["rollout_tokens"]}
    for reuse in (True, False):
        config = RolloutConfig(
            max_turns=s["rollout_turns"],
            max_turn_tokens=s["rollout_tokens"],
            max_episode_tokens=1 << 20,
            pool_backend="inline",
            progress_bar=False,
            reuse_kv_cache=reuse,
        )
        rollout = MultiTurnRollout(ToyEnv, config)

        def generator():
            return ModelGenerator(
                model, tokenizer, max_completion_length=1 << 20, progress_bar=False, reuse_kv_cache=reuse
            )

        rollout.play(tasks[:2], generator(), tokenizer)  # warm-up
        torch.manual_seed(0)
        sync(device)
        start = time.perf_counter()
        batch = rollout.play(tasks, generator(), tokenizer)
        sync(device)
        wall = time.perf_counter() - start
        rollout.close()
        stats = batch.stats
        out["kv_reuse_on" if reuse else "kv_reuse_off"] = {
            "wall_s": wall,
            "turns": stats.turns,
            "generated_tokens": stats.generated_tokens,
            "generated_tokens_per_s": stats.generated_tokens / wall,
            "generated_tokens_per_generate_s": stats.generated_tokens_per_s,
            "refeed_ratio": stats.refeed_ratio,
        }
    out["speedup"] = out["kv_reuse_on"]["generated_tokens_per_s"] / out["kv_reuse_off"]["generated_tokens_per_s"]
    return out


# --------------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------------


def run(smoke: bool = False, sections=SECTIONS) -> dict:
    installed = ensure_packages()
    sys.path[:0] = [p for p in (ROOT, HERE) if p not in sys.path]  # trl_epo from this checkout; bench_loss
    import logging
    import warnings

    import torch
    import transformers
    import trl

    from trl_epo.tiny import build_tiny_tokenizer

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    settings = dict(SMOKE if smoke else FULL)
    if not smoke and not torch.cuda.is_available():
        raise RuntimeError("No CUDA device: run with --smoke for the CPU code-path check.")
    tokenizer = build_tiny_tokenizer()
    result = {
        "smoke": smoke,
        "device": "cpu" if smoke else torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "installed_from_wheels": installed,
        "settings": settings,
        "sections": {},
        "seconds": {},
        "errors": {},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        calls = {
            "loss": lambda: check_loss(settings, tokenizer, workdir),
            "entropy_kernel": lambda: check_entropy_kernel(settings),
            "rows": lambda: check_rows(settings, tokenizer, workdir),
            "rollout": lambda: check_rollout(settings, tokenizer),
        }
        for name in sections:
            t0 = time.perf_counter()
            try:
                result["sections"][name] = calls[name]()
            except Exception as error:  # noqa: BLE001 - recorded; the other sections still run
                result["errors"][name] = "".join(traceback.format_exception(error))[-4000:]
                print(f"[gpu_check] {name} failed: {type(error).__name__}: {error}", flush=True)
            result["seconds"][name] = time.perf_counter() - t0
            free(settings["device"])
            print(f"[gpu_check] {name}: {result['seconds'][name]:.1f} s", flush=True)
    result["seconds"]["total"] = time.perf_counter() - start
    return result


def report(result: dict) -> str:
    sections = result["sections"]
    lines = [f"gpu_check on {result['device']} ({result['versions']}), {result['seconds']['total']:.0f} s"]
    if "loss" in sections:
        lines += [
            "| shape | GRPO s | EPO s | time ratio (<= 1.03) | GRPO peak MiB | EPO peak MiB | memory ratio (<= 1.02) |"
        ]
        lines += ["|---|---|---|---|---|---|---|"]
        for shape, r in sections["loss"].items():
            t, p = r["time_s"], r["peak_bytes"]
            lines.append(
                f"| {shape} | {t['grpo']:.4f} | {t['epo']:.4f} | {r['time_ratio']:.3f} | {p['grpo'] / 2**20:.0f} | "
                f"{p['epo'] / 2**20:.0f} | {r['memory_ratio']:.3f} |"
            )
    if "entropy_kernel" in sections:
        k = sections["entropy_kernel"]
        lines += [f"chunked log-prob kernel vs naive fp32 (triton={k['triton']}, {k['tokens']} x {k['vocab']}):"]
        lines += ["| inputs, loss | logprobs | entropy | d/d hidden | d/d LM head |", "|---|---|---|---|---|"]
        for case, r in k.items():
            if isinstance(r, dict):
                cells = " | ".join(f"{r[n]['max_abs_diff']:.2e} ({r[n]['relative']:.1e} rel)" for n in r)
                lines.append(f"| {case} | {cells} |")
    if "rows" in sections:
        rows = sections["rows"]
        lines += [
            f"rows: {rows['episodes']} windowed episodes, {rows['tokens_per_turn']} tokens per turn, one micro-step"
        ]
        lines += ["| turns | step s | packed s | step peak MiB | packed peak MiB |", "|---|---|---|---|---|"]
        for key in sorted((k for k in rows if k.startswith("step_")), key=lambda k: int(k.split("_")[1])):
            turns = key.split("_")[1]
            a, b = rows[key], rows[f"packed_{turns}"]
            lines.append(
                f"| {turns} | {a['time_s']:.3f} | {b['time_s']:.3f} | {a['peak_bytes'] / 2**20:.0f} | "
                f"{b['peak_bytes'] / 2**20:.0f} |"
            )
    if "rollout" in sections:
        r = sections["rollout"]
        on, off = r["kv_reuse_on"], r["kv_reuse_off"]
        lines.append(
            f"rollout (toy, {r['episodes']} episodes x {r['max_turns']} turns): KV reuse on {on['generated_tokens_per_s']:.0f}"
            f" tokens/s (refeed {on['refeed_ratio']:.2f}), off {off['generated_tokens_per_s']:.0f} tokens/s (refeed "
            f"{off['refeed_ratio']:.2f}): {r['speedup']:.2f}x"
        )
    for name, error in result["errors"].items():
        lines.append(f"FAILED {name}: {error.strip().splitlines()[-1]}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="Tiny shapes on CPU: the code paths, in seconds.")
    parser.add_argument(
        "--output", default=None, help="JSON file (default: benchmarks/results/gpu_check[_smoke].json)."
    )
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    args = parser.parse_args(argv)
    output = args.output or os.path.join(HERE, "results", f"gpu_check{'_smoke' if args.smoke else ''}.json")
    result = run(args.smoke, args.sections)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=2)
    print(report(result))
    print(f"[gpu_check] results: {output}")
    return result


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1:])["errors"] else 0)
