"""Model cards, evaluation results and saving helpers for EPO runs (used by `EPOTrainer`).

* **Model card.** `EPOTrainer.create_model_card` (called by TRL at every checkpoint and by `push_to_hub`) first lets
  TRL write its own card (base model, trainer name, paper link, citations, framework versions), then adds an
  "EPO training" section built here: the environment and split (from the train dataset's task columns), the `epo_*`
  and `env_*` settings, the base RL settings, the adapter/quantization, the final entropy reference and, when one
  exists, the evaluation table. The tags trl, epo and reinforcement-learning come from the trainer.

* **Evaluation results.** An evaluation writes its numbers with `save_eval_results(results, output_dir)` into
  `<output_dir>/eval_results.json`; the next card (a checkpoint, `push_to_hub`, `trainer.create_model_card()`) shows
  them as a table and as `model-index` metadata (the Hub's evaluation widget). The file format::

      {"format": "trl_epo.eval_results/1",
       "results": [{"env": "sciworld", "split": "ood", "success_rate": 0.41, "episodes": 1684,
                    "ci_low": 0.39, "ci_high": 0.43, "seeds": [0, 1, 2], "temperature": 0.4,
                    "mean_turns": 17.2, "model": "out/checkpoint-125", "extra": {}}]}

  `EvalResult.from_outcomes(env, split, won)` builds an entry from per-episode outcomes (with a Wilson 95% interval);
  saving again replaces the entry of the same (env, split, model) and keeps the others.

* **Saving.** `save_adapter` writes the PEFT adapter alone (+ tokenizer and card); `save_merged_model` writes the base
  model with the adapter merged into it, without altering the training model (under ZeRO-3 the weights are gathered
  for the merge); both must be called on every process, like `Trainer.save_model`. A 4-bit/8-bit (bitsandbytes)
  base is never merged into: `save_merged_model` refuses, and `merge_adapter_checkpoint` merges a saved adapter into a
  full-precision copy of the base model instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .evaluation import wilson_interval


EVAL_RESULTS_NAME = "eval_results.json"
EVAL_RESULTS_FORMAT = "trl_epo.eval_results/1"
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


# ------------------------------------------------------------------------------------------------------------------
# Evaluation results
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """One evaluation of the policy on one environment split.

    Attributes:
        env: environment name ("sciworld", "alfworld", "toy", ...).
        split: split name ("iid", "ood", ...).
        success_rate: fraction of episodes won, in [0, 1].
        episodes: number of episodes played.
        ci_low / ci_high: a 95% confidence interval of the success rate (e.g. Wilson).
        seeds: the evaluation seeds.
        temperature: sampling temperature of the evaluation (paper: 0.4).
        mean_turns: mean episode length in turns.
        model: what was evaluated (a checkpoint path or Hub id).
        extra: any other JSON-serialisable numbers (e.g. {"score": 63.2}).
    """

    env: str
    split: str
    success_rate: float
    episodes: int
    ci_low: float | None = None
    ci_high: float | None = None
    seeds: list[int] | None = None
    temperature: float | None = None
    mean_turns: float | None = None
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not 0.0 <= float(self.success_rate) <= 1.0:
            raise ValueError(f"success_rate must be a fraction in [0, 1], got {self.success_rate}.")
        if int(self.episodes) < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}.")

    @classmethod
    def from_outcomes(cls, env: str, split: str, won: Sequence[bool], **kwargs) -> EvalResult:
        """Success rate and Wilson 95% interval from per-episode outcomes."""
        n, k = len(won), sum(bool(w) for w in won)
        if n == 0:
            raise ValueError("No episodes: pass the outcome (won or not) of every evaluation episode.")
        low, high = wilson_interval(k, n)
        return cls(env=env, split=split, success_rate=k / n, episodes=n, ci_low=low, ci_high=high, **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalResult:
        known = {name for name in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown evaluation result fields {unknown}; allowed: {sorted(known)}.")
        return cls(**data)

    @property
    def key(self) -> tuple:
        return (self.env, self.split, self.model)


def _eval_path(path: str) -> str:
    return os.path.join(path, EVAL_RESULTS_NAME) if not path.endswith(".json") else path


def save_eval_results(results: EvalResult | Mapping | Iterable[EvalResult | Mapping], path: str) -> str:
    """Write evaluation results for the model card into `path` (a folder, usually the training `output_dir`, or a
    `.json` file). Entries already there with another (env, split, model) are kept; the same key is replaced.
    Returns the file path."""
    if isinstance(results, (EvalResult, Mapping)):
        results = [results]
    new = [r if isinstance(r, EvalResult) else EvalResult.from_dict(r) for r in results]
    file = _eval_path(path)
    merged = {r.key: r for r in (load_eval_results(file) if os.path.exists(file) else [])}
    merged.update({r.key: r for r in new})
    payload = {"format": EVAL_RESULTS_FORMAT, "results": [asdict(r) for r in merged.values()]}
    from .trainer import write_json_atomic

    write_json_atomic(file, payload)
    return file


def load_eval_results(path: str) -> list[EvalResult]:
    """Read the results written by `save_eval_results` (a folder or a `.json` file); [] when there are none."""
    file = _eval_path(path)
    if not os.path.exists(file):
        return []
    with open(file) as f:
        payload = json.load(f)
    if not isinstance(payload, dict) or payload.get("format") != EVAL_RESULTS_FORMAT:
        raise ValueError(
            f"{file} is not an evaluation results file of trl_epo (expected a JSON object with "
            f"'format': {EVAL_RESULTS_FORMAT!r} and 'results'). Write it with trl_epo.hub.save_eval_results."
        )
    return [EvalResult.from_dict(entry) for entry in payload["results"]]


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
    out.append(
        "This model was trained with **EPO** (Entropy-regularized Policy Optimization, "
        f"[arXiv 2509.22576]({PAPER_URL})) "
        "as a multi-turn text agent, with `trl_epo` on top of TRL's `GRPOTrainer`: the GRPO loss plus a "
        "trajectory-level entropy bonus and an entropy-smoothing corridor around a historical entropy reference, "
        "weighted by a phase schedule (`L = L_GRPO − λ·L_H + λ·β_k·L_smooth`)."
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
        out.append(_table(["environment", "split", "tasks", "task types"],
                          [(r["env"], r["split"], r["tasks"], r["task_types"]) for r in tasks["rows"]]))
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
            out.append("- per-turn references: " + ", ".join(
                f"turn {t}: {v:.4g}" for t, v in reference["turn_values"].items()))
    out.append("")

    if eval_results:
        out += ["### Evaluation", ""]
        rows = []
        for r in eval_results:
            ci = f"[{r.ci_low:.3f}, {r.ci_high:.3f}]" if r.ci_low is not None and r.ci_high is not None else "—"
            seeds = _fmt(r.seeds) if r.seeds else "—"
            rows.append((r.env, r.split, f"{r.success_rate:.3f}", ci, r.episodes, seeds, r.temperature,
                         r.mean_turns, r.model))
        out += [_table(["environment", "split", "success rate", "95% CI", "episodes", "seeds", "temperature",
                        "mean turns", "model"], rows), ""]
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


def add_epo_section(card, summary: Mapping[str, Any], eval_results: Sequence[EvalResult] = (),
                    contents: str | None = None, tags: Iterable[str] = ()):
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


# ------------------------------------------------------------------------------------------------------------------
# Saving: adapter alone, merged model
# ------------------------------------------------------------------------------------------------------------------


ADAPTER_CONTENTS = "the PEFT adapter alone (load it on the base model)."
QUANTIZED_MERGE_ERROR = (
    "The policy's base model is quantized ({quantization}): merging the adapter into it would round the merged "
    "weights back to the quantized format and lose the adapter's update, so trl_epo never merges into a quantized "
    "base. Save the adapter instead (`trainer.save_adapter(dir)`) and either serve it on the quantized base, or merge "
    "it into a full-precision copy of the base model with `trl_epo.hub.merge_adapter_checkpoint(adapter_dir, "
    "output_dir, dtype='bfloat16')` (note that the adapter was trained against the quantized weights)."
)


def _require_peft(model, what: str):
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise ValueError(
            f"{what} needs a PEFT (LoRA) model, but this run fine-tunes the full model ({type(model).__name__}). "
            "Use `trainer.save_model(dir)` to save it, or train with a `peft_config` (`--use_peft`)."
        )
    return model


def save_adapter(trainer, output_dir: str | None = None) -> str:
    """Save the PEFT adapter alone (adapter_config.json + adapter_model.safetensors), the tokenizer and the EPO model
    card into `output_dir` (default: `args.output_dir`). Call it on every process (ZeRO-3 gathers the adapter)."""
    output_dir = output_dir or trainer.args.output_dir
    _require_peft(trainer.accelerator.unwrap_model(trainer.model), "save_adapter")
    trainer.save_model(output_dir)  # transformers saves only the adapter of a PeftModel (gathered under ZeRO-3)
    if trainer.args.should_save:
        trainer.create_model_card(output_dir=output_dir, contents=ADAPTER_CONTENTS)
    trainer.accelerator.wait_for_everyone()
    return output_dir


def merged_state_dict(model) -> dict:
    """The state dict of `model`'s base model with its active adapter merged in, named like the plain base model.

    `model` must be a PeftModel whose adapter is currently merged (`merge_adapter()`): adapter weights are dropped,
    `base_layer.` is removed from wrapped layers' names and `modules_to_save` copies replace their originals, which is
    what PEFT's `merge_and_unload()` produces, without unloading the adapter from the training model."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    base = model.get_base_model()
    active = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    adapter_keys: set[str] = set()
    renames: list[tuple[str, str]] = []
    for name, module in base.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, ModulesToSaveWrapper):
            adapter_keys.update(f"{prefix}{k}" for k in module.original_module.state_dict())
            for adapter_name, copy in module.modules_to_save.items():
                keys = [f"{prefix}modules_to_save.{adapter_name}.{k}" for k in copy.state_dict()]
                if adapter_name == active:
                    renames += [(key, f"{prefix}{k}") for key, k in zip(keys, copy.state_dict())]
                else:
                    adapter_keys.update(keys)
            adapter_keys.update(f"{prefix}original_module.{k}" for k in module.original_module.state_dict())
        elif isinstance(module, BaseTunerLayer):
            for layer_name in module.adapter_layer_names:
                layer = getattr(module, layer_name, None)
                if layer is None:
                    continue
                adapter_keys.update(f"{prefix}{layer_name}.{k}" for k in layer.state_dict())
    rename = dict(renames)
    out = {}
    for key, tensor in base.state_dict().items():
        if key in rename:
            out[rename[key]] = tensor.detach().to("cpu", copy=True)
            continue
        if key in adapter_keys:
            continue
        out[key.replace(".base_layer.", ".")] = tensor.detach().to("cpu", copy=True)
    return out


def save_merged_model(trainer, output_dir: str, safe_serialization: bool = True) -> str:
    """Save the base model with the LoRA adapter merged into it (a plain transformers model) + tokenizer + card.

    The training model is left as it was: the adapter is merged in place with PEFT's `merge_adapter()`, the merged
    weights are copied, and `unmerge_adapter()` restores the separate adapter (under ZeRO-3 the weights are gathered
    for this and the merge is discarded with the gathered copies). Refuses a quantized (4-bit/8-bit) base model.
    Call it on every process."""
    model = _require_peft(trainer.accelerator.unwrap_model(trainer.model), "save_merged_model")
    quantization = quantization_summary(model)
    if quantization is not None:
        raise ValueError(QUANTIZED_MERGE_ERROR.format(quantization=quantization))
    state_dict = None
    with trainer._dist.gather_params(list(model.parameters())):  # ZeRO-3: full weights on every process
        if trainer.args.should_save:
            model.merge_adapter()
            try:
                state_dict = merged_state_dict(model)
            finally:
                model.unmerge_adapter()
    if trainer.args.should_save:
        base = model.get_base_model()
        base.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=safe_serialization)
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(output_dir)
        trainer.create_model_card(
            output_dir=output_dir, contents="the base model with the adapter merged into it (a plain model)."
        )
    trainer.accelerator.wait_for_everyone()
    return output_dir


def merge_adapter_checkpoint(adapter_dir: str, output_dir: str, base_model: str | None = None,
                             dtype: str = "bfloat16", **from_pretrained_kwargs) -> str:
    """Merge a saved adapter into a full-precision copy of its base model and save the result (offline, one
    process). This is the way to get a merged model from a QLoRA run: the base is reloaded *unquantized*.

    Args:
        adapter_dir: a folder written by `save_adapter` / `save_model` (adapter_config.json + weights).
        output_dir: where to write the merged model (+ tokenizer when the adapter folder has one).
        base_model: the base model id/path; default: the adapter config's `base_model_name_or_path`.
        dtype: dtype to load the base model in ("bfloat16", "float16", "float32" or "auto").
    """
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = PeftConfig.from_pretrained(adapter_dir)
    base_model = base_model or config.base_model_name_or_path
    if not base_model:
        raise ValueError(f"{adapter_dir} does not name its base model: pass `base_model=`.")
    if "quantization_config" in from_pretrained_kwargs:
        raise ValueError("merge_adapter_checkpoint loads the base model unquantized; do not pass quantization_config.")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch_dtype, **from_pretrained_kwargs)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(output_dir)
    if os.path.exists(os.path.join(adapter_dir, "tokenizer_config.json")):
        AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(output_dir)
    card = os.path.join(adapter_dir, "README.md")
    if os.path.exists(card):
        with open(card) as f:
            text = f.read()
        with open(os.path.join(output_dir, "README.md"), "w") as f:
            f.write(text.replace(
                f"**Contents of this folder:** {ADAPTER_CONTENTS}",
                f"**Contents of this folder:** the adapter merged into a {dtype} copy of the base model.",
            ))
    return output_dir
