"""Test data for the ALFWorld tests: the real games (a tarball shipped in tests/data/alfworld/, MIT-licensed, see its
README) and a small set of generated games, each prepared once per test session (extracted / generated into temporary
folders, never into the repo)."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest


REAL_GAMES_FILE = "json_2.1.1_valid_seen_valid_train.tar.xz"
REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATED_PER_TYPE = 2
GENERATED_SEED = 0


def real_games_tarball() -> Path:
    """``$TRL_EPO_ALFWORLD_TAR`` if set, else the copy in the repository (``tests/data/alfworld/<file>``)."""
    override = os.environ.get("TRL_EPO_ALFWORLD_TAR")
    if override:
        return Path(override)
    return REPO_ROOT / "tests" / "data" / "alfworld" / REAL_GAMES_FILE


def _temp_dir(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=None)
def real_games_root() -> str | None:
    """The real games extracted into a temporary folder (None when the tarball is absent)."""
    tarball = real_games_tarball()
    if not tarball.is_file():
        return None
    root = _temp_dir("alfworld-real-")
    with tarfile.open(tarball) as archive:
        archive.extractall(root, filter="data")
    return root


@functools.lru_cache(maxsize=None)
def generated_games():
    """(data root, games): GENERATED_PER_TYPE games of each task type, generated with GENERATED_SEED."""
    from trl_epo.envs.alfworld.game_writer import generate_games

    root = _temp_dir("alfworld-generated-")
    games = generate_games(root, "train", per_type=GENERATED_PER_TYPE, seed=GENERATED_SEED)
    return root, games


@pytest.fixture(scope="session")
def real_root():
    root = real_games_root()
    if root is None:  # the repository ships them: a missing file is a broken checkout or a wrong override
        pytest.fail(
            f"real ALFWorld games not found: {REAL_GAMES_FILE} (looked at {real_games_tarball()}). The repository "
            "ships it in tests/data/alfworld/; restore it (git checkout -- tests/data) or point TRL_EPO_ALFWORLD_TAR at "
            "a copy."
        )
    return root


@pytest.fixture(scope="session")
def generated_root():
    return generated_games()[0]


@pytest.fixture(scope="session")
def generated():
    return generated_games()[1]


def small_game_task(root: str, task_type: str = "look_at_obj_in_light") -> dict:
    """A dataset row of a generated game of a quick-to-load type (look-at tasks are in bedrooms / living rooms)."""
    from trl_epo.envs.alfworld import make_tasks

    return make_tasks("train", root, task_types=[task_type])[0].to_row()
