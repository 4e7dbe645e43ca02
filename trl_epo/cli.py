"""The `trl-epo` command line.

    trl-epo evaluate --model PATH [--env sciworld] --split iid ood ...    # = examples/evaluate.py
    trl-epo plot OUTPUT_DIR [--out DIR] [--kappa_low K] [--kappa_high K]   # PNG figures of a run

`python -m trl_epo ...` is the same. `evaluate` shows a trained model exactly the prompts it was trained on: the
environment, its constructor arguments and the rollout settings (prompt style, turn and token limits, chat-template
arguments) come from the run's `epo_run.json` unless given on the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .envs.pool import BACKENDS
from .run_files import EVAL_RESULTS_NAME, read_run_settings


@dataclass
class EvaluateArguments:
    """Arguments of `trl-epo evaluate` / `examples/evaluate.py`."""

    model: str = field(
        metadata={"help": "A saved model directory, a checkpoint directory or a LoRA adapter directory."}
    )
    env: str | None = field(
        default=None, metadata={"help": "Environment ('toy', 'sciworld', 'alfworld'); default: the training run's."}
    )
    split: list[str] = field(default_factory=lambda: ["iid"], metadata={"help": "Split(s), e.g. `--split iid ood`."})
    num_episodes: int | None = field(
        default=None, metadata={"help": "Episodes per split and seed (default: the whole split)."}
    )
    temperature: float = field(default=0.4, metadata={"help": "Sampling temperature (paper validation: 0.4)."})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Sampling seed(s), e.g. `--seeds 0 1 2`."})
    max_turns: int | None = field(default=None, metadata={"help": "Turns per episode (default: the run's)."})
    max_turn_tokens: int | None = field(default=None, metadata={"help": "New tokens per answer (default: the run's)."})
    max_episode_tokens: int | None = field(
        default=None, metadata={"help": "Completion tokens per episode (default: the run's, else 8192)."}
    )
    batch_size: int = field(default=64, metadata={"help": "Episodes played at the same time."})
    pool_backend: str = field(default="process", metadata={"help": "Env pool backend.", "choices": list(BACKENDS)})
    env_kwargs: str | None = field(
        default=None, metadata={"help": "Env constructor arguments as JSON (default: the run's), e.g. '{\"a\": 1}'."}
    )
    task_kwargs: str | None = field(default=None, metadata={"help": "Extra `make_tasks` arguments as JSON."})
    output: str | None = field(
        default=None,
        metadata={"help": f"Where to add the results (default: <model>/{EVAL_RESULTS_NAME}); a file or directory."},
    )
    device: str | None = field(default=None, metadata={"help": "Device (default: cuda if available, else cpu)."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: 'auto', 'float32', 'bfloat16', 'float16'."})


def _has_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer_config.json"))


def load_model_for_eval(path: str, device: str | None = None, dtype: str = "auto"):
    """Load a saved model directory, a trainer checkpoint directory or a PEFT (LoRA) adapter directory.

    The tokenizer comes from ``path``, else from its parent (an output directory holding `checkpoint-*` folders),
    else (adapters) from the base model. Returns ``(model, tokenizer)`` with the model in eval mode on ``device``.
    """
    import torch
    from transformers import AutoModelForCausalLM

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
    source = next((c for c in candidates if os.path.isdir(c) and _has_tokenizer(c)), candidates[-1])
    from .models import load_tokenizer

    tokenizer = load_tokenizer(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"The tokenizer found at {source} has no chat template; the rollout needs one.")
    model.to(device).eval()
    return model, tokenizer


def evaluation_settings(args: EvaluateArguments) -> dict[str, Any]:
    """The environment, env arguments and rollout settings to evaluate with: the training run's (`epo_run.json`)
    unless given on the command line."""
    from .envs.registry import get_env
    from .rollout.config import RolloutConfig

    run = read_run_settings(args.model)
    recorded = run.get("rollout") or {}
    env = args.env or recorded.get("env")
    if env is None:
        raise ValueError(f"No --env given and {args.model} has no epo_run.json naming its environment: pass --env.")
    entry = get_env(env)
    same_env = recorded.get("env") is not None and get_env(recorded["env"]).name == entry.name
    if same_env:
        config = RolloutConfig.from_dict(recorded["config"])
        env_kwargs = recorded.get("env_kwargs") or {}
    else:
        config = RolloutConfig(max_turns=entry.max_turns, prompt_style=entry.prompt_style())
        env_kwargs = {}
    overrides = {
        "max_turns": args.max_turns,
        "max_turn_tokens": args.max_turn_tokens,
        "max_episode_tokens": args.max_episode_tokens,
    }
    config = config.replace(pool_backend=args.pool_backend, **{k: v for k, v in overrides.items() if v is not None})
    if args.env_kwargs:
        env_kwargs = json.loads(args.env_kwargs)
    return {"env": entry.name, "rollout_config": config, "env_kwargs": env_kwargs}


def run_evaluation(args: EvaluateArguments) -> list[dict[str, Any]]:
    """Evaluate `args.model` on each requested split and save the results; returns the result dicts."""
    from .evaluation import evaluate
    from .results import save_eval_results

    settings = evaluation_settings(args)
    model, tokenizer = load_model_for_eval(args.model, device=args.device, dtype=args.dtype)
    output = args.output or os.path.join(args.model, EVAL_RESULTS_NAME)
    results = []
    for split in args.split:
        result = evaluate(
            model,
            tokenizer,
            env=settings["env"],
            split=split,
            num_episodes=args.num_episodes,
            temperature=args.temperature,
            seed=args.seeds,
            rollout_config=settings["rollout_config"],
            batch_size=args.batch_size,
            env_kwargs=settings["env_kwargs"],
            task_kwargs=json.loads(args.task_kwargs) if args.task_kwargs else None,
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


def evaluate_main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    from trl import TrlParser

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = TrlParser(EvaluateArguments, prog="trl-epo evaluate")
    (args,) = parser.parse_args_and_config(args=list(argv) if argv is not None else None)
    return run_evaluation(args)


def _plot(args: argparse.Namespace) -> int:
    from .plotting import plot_run

    written = plot_run(
        args.output_dir, out_dir=args.out, kappa_low=args.kappa_low, kappa_high=args.kappa_high, title=args.title
    )
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trl-epo", description="EPO for multi-turn LLM agents, on TRL.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plot = commands.add_parser(
        "plot",
        help="Plot a run's entropy dynamics (PNG) from its trainer_state.json / checkpoints.",
        description="Write epo_dynamics.png (entropy and its corridor, beta_k, smoothing penalty, out-of-corridor "
        "fraction, success rate, evaluation success, turns) and entropy_turn_heatmap.png (turn x step) for a run.",
    )
    plot.add_argument("output_dir", help="The run's output_dir (or one of its checkpoint-* folders).")
    plot.add_argument("--out", default=None, help="Folder for the PNG files (default: OUTPUT_DIR/plots).")
    plot.add_argument("--kappa_low", type=float, default=None, help="Corridor lower bound (default: the run's).")
    plot.add_argument("--kappa_high", type=float, default=None, help="Corridor upper bound (default: the run's).")
    plot.add_argument("--title", default=None, help="Figure title (default: the run's name and EPO settings).")
    plot.set_defaults(handler=_plot)
    commands.add_parser(
        "evaluate", help="Evaluate a model on an env split (see `trl-epo evaluate --help`).", add_help=False
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "evaluate":  # its own (TrlParser) argument parser
        evaluate_main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
