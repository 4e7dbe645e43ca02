"""The "EPO training" section of the model card: what `EPOTrainer.create_model_card` adds to TRL's card.

TRL writes its own card (base model, trainer, paper link, citations, framework versions) at every checkpoint and in
`push_to_hub`; `add_epo_section` then inserts the environment and split (from the train dataset's task columns), the
`epo_*` and `env_*` settings, the base RL settings, the adapter/quantization, the final entropy reference and, when
`eval_results.json` has entries (`trl_epo.results`), the evaluation table and the Hub's `model-index` metadata.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .results import EvalResult


CARD_SECTION_TITLE = "## EPO training"
PAPER_URL = "https://arxiv.org/abs/2509.22576"

# GRPO/TRL settings worth recording next to the EPO ones (the full set is in training_args.bin).
BASE_SETTINGS = (
    "loss_type",
    "num_generations",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "steps_per_generation",
    "num_iterations",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_ratio",
    "max_steps",
    "beta",
    "epsilon",
    "temperature",
    "max_completion_length",
    "scale_rewards",
    "gradient_checkpointing",
    "bf16",
    "seed",
)
# PPO + EPO (EPOPPOTrainer): the critic's settings.
PPO_SETTINGS = (
    "critic_learning_rate",
    "vf_coef",
    "cliprange_value",
    "gamma",
    "lam",
    "whiten_advantages",
    "critic_model_name_or_path",
)


# ------------------------------------------------------------------------------------------------------------------
# What the card records
# ------------------------------------------------------------------------------------------------------------------


def dataset_tasks(dataset) -> dict[str, Any] | None:
    """The environment(s), split(s) and task counts of a dataset of tasks (rows with `env`/`split`/`task` columns, as
    built by the env modules' `make_dataset`); None when the dataset has no task columns."""
    columns = getattr(dataset, "column_names", None)
    if not columns or "env" not in columns:
        return None
    envs = list(dataset["env"])
    splits = list(dataset["split"]) if "split" in columns else [None] * len(envs)
    tasks = list(dataset["task"]) if "task" in columns else [None] * len(envs)
    rows = []
    for env, split in sorted({(e, s) for e, s in zip(envs, splits)}, key=str):
        chosen = [t for e, s, t in zip(envs, splits, tasks) if e == env and s == split]
        rows.append({"env": env, "split": split, "tasks": len(chosen), "task_types": len(set(chosen))})
    return {"envs": sorted(set(envs)), "splits": sorted({s for s in splits if s is not None}), "rows": rows}


def peft_summary(model) -> dict[str, Any] | None:
    """Adapter type and hyper-parameters of a PEFT model (None otherwise)."""
    config = getattr(model, "peft_config", None)
    if not isinstance(config, dict) or not config:
        return None
    name = getattr(model, "active_adapter", None) or next(iter(config))
    if isinstance(name, (list, tuple)):
        name = name[0]
    adapter = config[name]
    peft_type = str(getattr(adapter.peft_type, "value", adapter.peft_type))
    summary = {"peft_type": {"LORA": "LoRA"}.get(peft_type, peft_type)}
    for key in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora", "modules_to_save"):
        value = getattr(adapter, key, None)
        if value is not None:
            summary[key] = sorted(value) if isinstance(value, (set, frozenset)) else value
    targets = summary.get("target_modules")
    if isinstance(targets, list):  # PEFT expands "all-linear" into full module paths: keep the layer names
        summary["target_modules"] = sorted({name.split(".")[-1] for name in targets})
    summary["base_model"] = getattr(adapter, "base_model_name_or_path", None)
    return summary


def quantization_summary(model) -> str | None:
    """'4-bit nf4', '8-bit', ... when the (base) model is quantized, else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(getattr(base, "config", None), "quantization_config", None)
    if getattr(base, "is_loaded_in_4bit", False):
        kind = getattr(config, "bnb_4bit_quant_type", None) if config is not None else None
        return "4-bit" + (f" {kind}" if kind else "") + " (bitsandbytes)"
    if getattr(base, "is_loaded_in_8bit", False):
        return "8-bit (bitsandbytes)"
    if getattr(base, "hf_quantizer", None) is not None or config is not None:
        method = getattr(config, "quant_method", None) if not isinstance(config, dict) else config.get("quant_method")
        return f"quantized ({getattr(method, 'value', method) or 'unknown method'})"
    return None


def training_summary(trainer) -> dict[str, Any]:
    """Everything the EPO section of the card shows, from a trainer (plain JSON-serialisable data)."""
    args = trainer.args
    settings = args.to_dict()
    reference = trainer.epo_reference
    state = reference.state_dict()
    turn_values = {}
    if reference.mode == "per_turn":
        turn_values = {int(t): reference.turn_value(int(t)) for t in sorted(state["turn_count"], key=int)}
    model = trainer.accelerator.unwrap_model(trainer.model)
    accelerator = trainer.accelerator
    processes = accelerator.num_processes
    if getattr(trainer, "is_deepspeed_enabled", False):
        distributed = f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage} over {processes} process(es)"
    elif getattr(trainer, "is_fsdp_enabled", False):
        distributed = f"FSDP over {processes} process(es)"
    elif processes > 1:
        distributed = f"DDP over {processes} processes"
    else:
        distributed = "a single process"
    return {
        "epo": {k: v for k, v in settings.items() if k.startswith("epo_")},
        "env": {k: v for k, v in settings.items() if k.startswith("env_")},
        "base": {k: settings[k] for k in BASE_SETTINGS if k in settings},
        "ppo": {k: settings[k] for k in PPO_SETTINGS if k in settings} if hasattr(trainer, "critic") else None,
        "tasks": dataset_tasks(trainer.train_dataset),
        "eval_tasks": dataset_tasks(trainer.eval_dataset) if trainer.eval_dataset is not None else None,
        "reference": {
            "mode": reference.mode,
            "value": reference.value(),
            "num_updates": reference.num_updates,
            "last_step_entropy": reference.history[-1] if reference.history else None,
            "turn_values": turn_values,
        },
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "adapter": peft_summary(model),
        "quantization": quantization_summary(model),
        "distributed": distributed,
    }


# ------------------------------------------------------------------------------------------------------------------
# The card section
# ------------------------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) if value else "—"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return f"`{text}`" if isinstance(value, str) else text


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(cell if isinstance(cell, str) else _fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


EPO_SYMBOLS = {
    "epo_entropy_coef": "λ",
    "epo_smoothing_alpha": "α",
    "epo_kappa_low": "κ_l",
    "epo_kappa_high": "κ_r",
    "epo_phase_gamma": "γ",
}


def epo_card_section(
    summary: Mapping[str, Any], eval_results: Sequence[EvalResult] = (), contents: str | None = None
) -> str:
    """The markdown of the card's "EPO training" section."""
    out = [CARD_SECTION_TITLE, ""]
    if summary.get("ppo"):
        base, loss = (
            "`EPOPPOTrainer` (PPO: a learned critic gives per-token advantages by GAE over the action tokens): the "
            "clipped PPO loss",
            "L_PPO",
        )
    else:
        base, loss = "TRL's `GRPOTrainer`: the GRPO loss", "L_GRPO"
    out.append(
        "This model was trained with **EPO** (Entropy-regularized Policy Optimization, "
        f"[arXiv 2509.22576]({PAPER_URL})) "
        f"as a multi-turn text agent, with `trl_epo` on top of {base} plus a "
        "trajectory-level entropy bonus and an entropy-smoothing corridor around a historical entropy reference, "
        f"weighted by a phase schedule (`L = {loss} − λ·L_H + λ·β_k·L_smooth`)."
    )
    out.append("")
    adapter, quantization = summary.get("adapter"), summary.get("quantization")
    if contents:
        out += [f"**Contents of this folder:** {contents}", ""]
    if adapter:
        base = adapter.get("base_model")
        kind = "QLoRA" if quantization else adapter.get("peft_type", "PEFT")
        text = f"**Adapter:** {kind} (r={adapter.get('r')}, alpha={adapter.get('lora_alpha')}"
        text += f", target modules: {_fmt(adapter.get('target_modules'))})"
        if quantization:
            text += f" on a {quantization} base model"
        if base:
            text += f"; base model `{base}`"
        out += [text + ".", ""]
    steps, total = summary["global_step"], summary["max_steps"]
    out += [f"**Run:** {steps} optimizer steps (of {total}), {summary['distributed']}.", ""]

    out += ["### Environment", ""]
    tasks = summary.get("tasks")
    if tasks:
        out.append(
            _table(
                ["environment", "split", "tasks", "task types"],
                [(r["env"], r["split"], r["tasks"], r["task_types"]) for r in tasks["rows"]],
            )
        )
    else:
        out.append("The training dataset has no task columns (`env`, `split`, `task`): environment not recorded.")
    env = summary.get("env") or {}
    if env:
        out += ["", _table(["rollout setting", "value"], [(f"`{k}`", v) for k, v in sorted(env.items())])]
    out.append("")

    out += ["### EPO settings", ""]
    rows = []
    for key, value in sorted(summary["epo"].items()):
        symbol = EPO_SYMBOLS.get(key)
        rows.append((f"`{key}`" + (f" ({symbol})" if symbol else ""), value))
    out += [_table(["setting", "value"], rows), ""]

    out += ["### Base RL settings", ""]
    out += [_table(["setting", "value"], [(f"`{k}`", v) for k, v in summary["base"].items()]), ""]
    if summary.get("ppo"):
        out += ["### PPO critic settings", ""]
        out += [_table(["setting", "value"], [(f"`{k}`", v) for k, v in summary["ppo"].items()]), ""]

    reference = summary["reference"]
    out += ["### Entropy reference at the end of training", ""]
    if reference["value"] is None:
        out.append("No optimizer step was taken: the entropy reference is empty.")
    else:
        out.append(
            f"- final reference H̄ (`{reference['mode']}`): **{reference['value']:.6g}** after "
            f"{reference['num_updates']} optimizer step(s)"
        )
        out.append(f"- entropy of the last step: {_fmt(reference['last_step_entropy'])}")
        if reference["turn_values"]:
            out.append(
                "- per-turn references: "
                + ", ".join(f"turn {t}: {v:.4g}" for t, v in reference["turn_values"].items())
            )
    out.append("")

    if eval_results:
        out += ["### Evaluation", ""]
        rows = []
        for r in eval_results:
            ci = f"[{r.ci_low:.3f}, {r.ci_high:.3f}]" if r.ci_low is not None and r.ci_high is not None else "—"
            seeds = _fmt(r.seeds) if r.seeds else "—"
            rows.append(
                (r.env, r.split, f"{r.success_rate:.3f}", ci, r.episodes, seeds, r.temperature, r.mean_turns, r.model)
            )
        out += [
            _table(
                [
                    "environment",
                    "split",
                    "success rate",
                    "95% CI",
                    "episodes",
                    "seeds",
                    "temperature",
                    "mean turns",
                    "model",
                ],
                rows,
            ),
            "",
        ]
    return "\n".join(out).rstrip() + "\n"


def hub_eval_results(eval_results: Sequence[EvalResult]) -> list:
    """The results as `huggingface_hub.EvalResult`s (the card's `model-index`)."""
    from huggingface_hub import EvalResult as HubEvalResult

    return [
        HubEvalResult(
            task_type="reinforcement-learning",
            task_name="Multi-turn text agent",
            dataset_type=f"{r.env}",
            dataset_name=f"{r.env} ({r.split})",
            dataset_split=r.split,
            metric_type="success_rate",
            metric_name="success rate",
            metric_value=r.success_rate,
        )
        for r in eval_results
    ]


def add_epo_section(
    card,
    summary: Mapping[str, Any],
    eval_results: Sequence[EvalResult] = (),
    contents: str | None = None,
    tags: Iterable[str] = (),
):
    """Insert the EPO section into a TRL model card (a `huggingface_hub.ModelCard`) and add tags and `model-index`.
    The section goes right before TRL's "### Framework versions" (inside "Training procedure"); a card that already
    has one gets it replaced."""
    section = epo_card_section(summary, eval_results, contents)
    body = card.text  # the markdown below the YAML metadata
    if CARD_SECTION_TITLE in body:  # a card written before (e.g. at a checkpoint): replace its EPO section
        start = body.index(CARD_SECTION_TITLE)
        end = body.find("### Framework versions", start)
        if end < 0:
            end = body.find("\n## ", start + len(CARD_SECTION_TITLE))
        body = body[:start] + (body[end:].lstrip("\n") if end >= 0 else "")
    position = body.find("### Framework versions")
    if position < 0:
        position = body.find("## Citations")
    if position < 0:
        card.text = body.rstrip("\n") + "\n\n" + section
    else:
        card.text = body[:position] + section + "\n" + body[position:]
    data = card.data
    data.tags = sorted(set(data.tags or []) | set(tags))
    if eval_results:
        data.eval_results = hub_eval_results(eval_results)
        data.model_name = data.model_name or "model"
    return card
