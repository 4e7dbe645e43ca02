"""The README's "Add your own environment" example runs as written: the module registers, passes
`check_text_env`, and trains one EPO step through `EPOTrainer`."""

import re
import sys
from pathlib import Path


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_blocks(after: str) -> list[str]:
    text = README.read_text()
    section = text[text.index(after) :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_environment_example(tmp_path, monkeypatch, tokenizer, make_model):
    module_code, check_code = readme_blocks("## Add your own environment")
    package = tmp_path / "my_envs"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "lights.py").write_text(module_code)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        exec(compile(check_code, "README", "exec"), {})  # the README's check: raises on a contract violation

        from my_envs.lights import LightsEnv, make_dataset

        from trl_epo import EPOConfig, EPOTrainer
        from trl_epo.envs.registry import get_env

        assert get_env("lights").max_turns == 5
        from conftest import base_config_kwargs

        args = EPOConfig(
            **base_config_kwargs(
                tmp_path / "run",
                max_steps=1,
                per_device_train_batch_size=2,
                num_generations=2,
                max_completion_length=64,
                env_max_turn_tokens=4,
                env_pool_backend="process",
            )
        )
        trainer = EPOTrainer(
            make_model(), args=args, train_dataset=make_dataset(), processing_class=tokenizer, env_factory=LightsEnv
        )
        trainer.train()
        episodes = trainer.env_rollout.last_batch.episodes
        assert episodes[0].messages[0]["content"].startswith("Switch the light on.")  # the registry's instruction
        assert trainer.env_rollout.config.max_turns == 5
    finally:
        from trl_epo.envs import registry

        registry._ENVS.pop("lights", None)
        for name in [m for m in sys.modules if m.startswith("my_envs")]:
            del sys.modules[name]
