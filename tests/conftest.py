"""Shared fixtures: tiny real models and locally built tokenizers (no hub access)."""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from trl_epo.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402


# The ALFWorld game fixtures (real_root, generated_root, generated), prepared lazily once per session.
pytest_plugins = ["helpers.alfworld_testdata"]


# One intra-op thread: tiny models gain nothing from two on 2 cores, and under load (env workers, JVMs,
# a second process) OpenMP spin-waiting made two threads 10-30x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread and leaves it so (benchmarks and example scripts set their own count)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def make_model(tokenizer):
    def _make(seed: int = 0, **kwargs):
        return build_tiny_model(tokenizer, seed=seed, **kwargs)

    return _make


def count_a_reward(completions, **kwargs):
    """A dense toy reward: the share of 'a' characters in the completion."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [t.count("a") / max(1, len(t)) for t in texts]


@pytest.fixture
def single_turn_dataset():
    prompts = [
        "Say something with many a letters.",
        "Count to three.",
        "What is the answer?",
        "Name an action.",
        "Open the door.",
        "Take the key.",
        "Go north.",
        "Look around.",
    ]
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})


def base_config_kwargs(tmp_path, **overrides):
    """EPOConfig/GRPOConfig keyword arguments for fast CPU runs."""
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-3,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return kwargs


def windowed_config_kwargs(tmp_path, **overrides):
    """`base_config_kwargs` for toy-env episodes of up to 3 short turns seen through a window of 1 past turn (one
    training row per turn), on threads; `overrides` win."""
    kwargs = dict(
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=400,
        env_max_turns=3,
        env_max_turn_tokens=8,
        env_pool_backend="thread",
        env_history_turns=1,
        temperature=1.0,
    )
    kwargs.update(overrides)
    return base_config_kwargs(tmp_path, **kwargs)
