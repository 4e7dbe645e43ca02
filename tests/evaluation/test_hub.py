"""The EPO model card and `push_to_hub`, from a real short run on the toy env (through examples/train_toy.py).

The Hub is unreachable here, so the two calls transformers' `Trainer.push_to_hub` makes to it, `HfApi.create_repo` and
`HfApi.upload_folder` (through transformers' shared `hf_api()`), are intercepted at that boundary: the interceptor
selects the files the real `upload_folder` would send (same listing, same ignore patterns) and copies them aside, and
the test checks that folder file by file.
"""

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, RepoUrl
from huggingface_hub.utils import filter_repo_objects

from trl_epo.card import CARD_SECTION_TITLE, epo_card_section
from trl_epo.results import EvalResult, load_eval_results, save_eval_results, wilson_interval


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "examples"))

from train_toy import build_trainer, make_parser  # noqa: E402


class HubBoundary:
    """Stands in for the Hub's HTTP API: records the calls and copies what `upload_folder` would upload."""

    def __init__(self, staging: Path):
        self.staging = staging
        self.created: list[tuple[str, dict]] = []
        self.uploads: list[dict] = []

    def create_repo(self, api, repo_id, **kwargs):
        self.created.append((repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, api, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS

        ignore = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
        folder = Path(folder_path)
        listing = [p.relative_to(folder).as_posix() for p in sorted(folder.glob("**/*")) if p.is_file()]
        files = list(
            filter_repo_objects(
                listing, allow_patterns=allow_patterns, ignore_patterns=ignore + DEFAULT_IGNORE_PATTERNS
            )
        )
        for relative in files:
            target = self.staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / relative, target)
        self.uploads.append(
            {"repo_id": repo_id, "folder_path": str(folder_path), "files": files, "ignore_patterns": ignore, **kwargs}
        )
        return f"https://huggingface.co/{repo_id}/commit/0"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    boundary = HubBoundary(tmp_path / "uploaded")
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: boundary.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: boundary.upload_folder(api, **kw))
    return boundary


def test_push_to_hub_uploads_model_and_epo_card(tmp_path, hub):
    output_dir = tmp_path / "toy-epo"
    script_args, args, model_args = make_parser().parse_args_and_config(
        args=[
            "--model_name_or_path",
            "tiny",
            "--output_dir",
            str(output_dir),
            "--hub_model_id",
            "someone/toy-epo",
            "--bf16",
            "false",
            "--use_cpu",
            "true",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--num_generations",
            "2",
            "--max_completion_length",
            "96",
            "--env_max_turns",
            "3",
            "--env_max_turn_tokens",
            "8",
            "--env_pool_backend",
            "thread",
            "--num_tasks",
            "6",
            "--learning_rate",
            "1e-2",
            "--logging_steps",
            "1",
            "--save_strategy",
            "steps",
            "--save_steps",
            "1",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            "--epo_smoothing_alpha",
            "0.05",
            "--epo_kappa_high",
            "1.5",
            "--epo_reference",
            "per_turn",
        ]
    )
    trainer = build_trainer(script_args, args, model_args)
    trainer.train()
    # An evaluation function records its results next to the model (see trl_epo.results.save_eval_results).
    result = EvalResult.from_outcomes(
        "toy",
        "ood",
        [True, False, True, False, False],
        seeds=[0, 1],
        temperature=0.4,
        mean_turns=3.0,
        model=str(output_dir),
    )
    save_eval_results(result, str(output_dir))

    with pytest.raises(ValueError, match="--use_peft"):  # full fine-tuning: there is no adapter to save alone
        trainer.save_adapter(str(tmp_path / "adapter"))

    trainer.push_to_hub(commit_message="End of training")

    # The Hub calls: the repo is created, then one folder upload of output_dir without checkpoints or "_" folders.
    assert [repo for repo, _ in hub.created] == ["someone/toy-epo"]
    assert len(hub.uploads) == 1
    upload = hub.uploads[0]
    assert upload["repo_id"] == "someone/toy-epo" and Path(upload["folder_path"]) == output_dir
    assert upload["commit_message"] == "End of training"
    files = set(upload["files"])
    expected = {
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "training_args.bin",
        "eval_results.json",
    }
    assert expected <= files, expected - files
    assert (output_dir / "checkpoint-2" / "epo_state.json").exists()
    assert not [f for f in files if f.startswith(("checkpoint-", "_tiny_base"))]
    assert (output_dir / "_rollouts").is_dir()  # episode transcripts are written but not uploaded
    assert files - expected <= {"chat_template.jinja", "epo_run.json", "trainer_state.json"}
    uploaded = hub.staging

    # File by file.
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    weights = load_file(uploaded / "model.safetensors")
    for name, param in trainer.model.state_dict().items():
        if name in weights:
            assert torch.equal(weights[name], param.detach().cpu()), name
    assert "model.embed_tokens.weight" in weights
    assert AutoConfig.from_pretrained(uploaded).model_type == "qwen2"
    text = "Find the key. <action>go east</action>"
    assert AutoTokenizer.from_pretrained(uploaded)(text)["input_ids"] == trainer.processing_class(text)["input_ids"]
    uploaded_args = torch.load(uploaded / "training_args.bin", weights_only=False)
    assert uploaded_args.epo_smoothing_alpha == 0.05 and uploaded_args.epo_reference == "per_turn"
    assert load_eval_results(str(uploaded)) == [result]

    card = ModelCard.load(uploaded / "README.md")
    assert {"trl", "epo", "reinforcement-learning"} <= set(card.data.tags)
    [index] = card.data.to_dict()["model-index"]
    assert index["name"] == "toy-epo"
    [entry] = index["results"]
    assert entry["dataset"]["name"] == "toy (ood)" and entry["metrics"][0]["value"] == pytest.approx(0.4)
    body = card.text
    assert body.count(CARD_SECTION_TITLE) == 1  # rewritten at each checkpoint and at the push, never duplicated
    assert "trained with EPO" in body and "arxiv.org/abs/2509.22576" in body and "@article{xu2025epo" in body
    # Environment and split, from the train dataset's task columns.
    assert "| toy | train | 6 | 2 |" in body
    assert "| `env_max_turns` | 3 |" in body
    # Every epo_* setting with its value.
    for key, value in uploaded_args.to_dict().items():
        if key.startswith("epo_"):
            row = next(line for line in body.splitlines() if line.startswith(f"| `{key}`"))
            rendered = f"{value:.4g}" if isinstance(value, float) else str(value)
            assert row.endswith(f"| {rendered} |"), row
    # The final entropy reference (and the per-turn ones of this run's per_turn reference).
    reference = trainer.epo_reference
    assert reference.num_updates == 2 and math.isfinite(reference.value())
    assert f"**{reference.value():.6g}** after 2 optimizer step(s)" in body
    assert f"turn 0: {reference.turn_value(0):.4g}" in body
    # The evaluation table.
    assert f"| toy | ood | 0.400 | [{result.ci_low:.3f}, {result.ci_high:.3f}] | 5 | 0, 1 | 0.4 | 3 |" in body
    # The card TRL wrote is still there around the EPO section.
    assert body.index("## Quick start") < body.index(CARD_SECTION_TITLE) < body.index("### Framework versions")


def test_eval_results_file_round_trip_and_validation(tmp_path):
    a = EvalResult.from_outcomes("sciworld", "ood", [True] * 3 + [False] * 7, seeds=[1])
    assert a.success_rate == 0.3 and a.episodes == 10
    assert (a.ci_low, a.ci_high) == pytest.approx(wilson_interval(3, 10))
    assert a.ci_low == pytest.approx(0.1078, abs=1e-4) and a.ci_high == pytest.approx(0.6032, abs=1e-4)
    b = {"env": "sciworld", "split": "iid", "success_rate": 0.5, "episodes": 4}
    path = save_eval_results([a, b], str(tmp_path))
    assert path == str(tmp_path / "eval_results.json")
    # Saving again replaces the same (env, split, model) and keeps the rest.
    a2 = EvalResult(env="sciworld", split="ood", success_rate=0.4, episodes=10)
    save_eval_results(a2, str(tmp_path))
    loaded = load_eval_results(str(tmp_path))
    assert [(r.split, r.success_rate) for r in loaded] == [("ood", 0.4), ("iid", 0.5)]
    assert load_eval_results(str(tmp_path / "none")) == []
    with pytest.raises(ValueError, match="success_rate"):
        EvalResult(env="x", split="y", success_rate=42.0, episodes=3)
    with pytest.raises(ValueError, match="Unknown evaluation result fields"):
        save_eval_results({"env": "x", "split": "y", "success_rate": 0.1, "episodes": 1, "acc": 2}, str(tmp_path))
    (tmp_path / "bad.json").write_text(json.dumps({"results": []}))
    with pytest.raises(ValueError, match="save_eval_results"):
        load_eval_results(str(tmp_path / "bad.json"))


def test_card_section_without_task_columns_or_history():
    summary = {
        "epo": {"epo_entropy_coef": 0.001},
        "env": {},
        "base": {"loss_type": "dapo"},
        "tasks": None,
        "reference": {
            "mode": "cumulative",
            "value": None,
            "num_updates": 0,
            "last_step_entropy": None,
            "turn_values": {},
        },
        "global_step": 0,
        "max_steps": 5,
        "adapter": None,
        "quantization": None,
        "distributed": "a single process",
    }
    text = epo_card_section(summary)
    assert "environment not recorded" in text and "entropy reference is empty" in text
    assert "### Evaluation" not in text  # no table without results
    assert "| `epo_entropy_coef` (λ) | 0.001 |" in text
