"""Imported first by the ScienceWorld test modules: skips the importing module, saying what to install, when the
`scienceworld` package or Java is missing (CI's `.ci/run` checks Java itself and fails instead)."""

import pytest


pytest.importorskip(
    "scienceworld", reason="the scienceworld package is not installed (pip install 'trl-epo[sciworld]')"
)

from trl_epo.envs.sciworld import JavaNotFoundError, find_java  # noqa: E402


try:
    find_java()
except JavaNotFoundError:  # pragma: no cover - depends on the machine
    pytest.skip("Java is not installed (apt-get install -y openjdk-17-jre-headless)", allow_module_level=True)
