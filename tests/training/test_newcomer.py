"""The newcomer's path (issue 13): Docker's small /dev/shm, exported files another user can read,
a CPU run with GPU-sized settings, help texts, cases without a study."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections import namedtuple
from pathlib import Path

import pytest

from fmc.data.split import SplitRow, split_summary
from fmc.training import fit
from fmc.training.cli import build_parser, main
from fmc.training.config import FitConfig

from .conftest import tiny_fit_args

REPO = Path(__file__).resolve().parents[2]
Usage = namedtuple("Usage", "total used free")


# ------------------------------------------------------------------ 8. Docker's 64 MB /dev/shm


def _small_shm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, free: int = 64 * 2**20) -> None:
    monkeypatch.setattr(fit, "SHM_PATH", tmp_path)
    monkeypatch.setattr(fit.shutil, "disk_usage", lambda path: Usage(free, 0, free))


def test_a_small_dev_shm_lowers_the_workers_with_a_warning_that_says_what_to_add(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _small_shm(monkeypatch, tmp_path)
    with caplog.at_level(logging.WARNING):
        assert fit.check_shared_memory(FitConfig.from_dict({"num_workers": 2})) == 0
    text = caplog.text
    assert "64 MiB free" in text and "--num-workers 0" in text
    assert "--ipc=host" in text and "--shm-size=" in text


def test_enough_dev_shm_keeps_the_workers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _small_shm(monkeypatch, tmp_path, free=8 * 2**30)
    assert fit.check_shared_memory(FitConfig.from_dict({"num_workers": 2})) == 2
    assert fit.check_shared_memory(FitConfig.from_dict({"num_workers": 0})) == 0


def test_fit_under_a_small_dev_shm_runs_with_no_workers(
    sim_cache: Path,
    split_csv: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _small_shm(monkeypatch, tmp_path / "shm", free=1 * 2**20)
    (tmp_path / "shm").mkdir()
    run = tmp_path / "run"
    args = tiny_fit_args(run, sim_cache, "--split-csv", str(split_csv), "--step", "1")
    args[args.index("--num-workers") + 1] = "2"
    assert main(args) == 0
    assert json.loads((run / "config.json").read_text())["num_workers"] == 0
    assert "--ipc=host" in capsys.readouterr().err  # train.py's own log handler writes to stderr


def test_every_documented_fit_in_docker_gives_shared_memory() -> None:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    texts = {str(page.relative_to(REPO)): page.read_text() for page in pages}
    texts["train.py --help"] = build_parser().format_help()
    fit_help = build_parser()._subparsers._group_actions[0].choices["fit"].format_help()  # type: ignore[union-attr]
    texts["train.py fit --help"] = fit_help
    texts["Dockerfile.train"] = (REPO / "Dockerfile.train").read_text()
    found = 0
    for where, text in texts.items():
        for line in text.replace("\\\n", " ").splitlines():
            if "docker run" in line and "fmc-train" in line and " fit " in line:
                found += 1
                assert "--ipc=host" in line or "--shm-size" in line, f"{where}: {line.strip()}"
    assert found >= 3


# ------------------------------------------------------------------ 9. exported files for another user


def _unprivileged() -> list[str]:
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("the suite runs as root and setpriv is missing: root would bypass the permission tested")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_export_writes_files_another_user_can_read(fit_run: Path) -> None:
    prefix = _unprivileged()
    shared = Path(tempfile.mkdtemp(prefix="fmc-export-"))
    try:
        shared.chmod(0o755)
        out = shared / "model"
        old = os.umask(0o077)  # a strict umask must not decide what the fmc image's user can read
        try:
            assert main(["export", "--ckpt", str(fit_run), "--out", str(out), "--channel", "nucleus"]) == 0
        finally:
            os.umask(old)
        for path in [out, *out.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o755 if path.is_dir() else 0o644), f"{path}: {oct(mode)}"
        check = "import sys; from fmc.weights import discover_models as d; d(sys.argv[1], 'nucleus', None)"
        result = subprocess.run(
            [*prefix, sys.executable, "-c", check, str(out)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HOME": tempfile.gettempdir()},
        )
        assert result.returncode == 0, result.stderr
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# ------------------------------------------------------------------ 12. a CPU run with GPU-sized settings


def test_gpu_sized_settings_on_a_cpu_warn_with_the_time_per_step(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        estimates = fit.warn_cpu_sized(FitConfig.from_dict({"accelerator": "cpu"}))
    assert estimates[1] > fit.CPU_SLOW_STEP_SECONDS
    assert "s per step" in caplog.text and "docs/training.md 'Training on a CPU'" in caplog.text
    assert "--global-size 64" in caplog.text


def test_the_cpu_recipe_gets_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    recipe = FitConfig.from_dict(
        {"accelerator": "cpu", "preset": "small", "global_size": 64, "patch": 48, "batch": 2}
    )
    with caplog.at_level(logging.WARNING):
        estimates = fit.warn_cpu_sized(recipe)
    assert max(estimates.values()) < fit.CPU_SLOW_STEP_SECONDS
    assert "GPU-sized" not in caplog.text


def test_the_training_doc_has_a_cpu_recipe() -> None:
    """fit's CPU warning names the section "Training on a CPU"; docs/training.md holds it."""
    training = (REPO / "docs" / "training.md").read_text()
    assert "\n## Training on a CPU\n" in training
    section = training.split("\n## Training on a CPU\n", 1)[1].split("\n## ", 1)[0]
    assert "--accelerator cpu" in section and "--global-size 64" in section and "--patch 48" in section


# ------------------------------------------------------------------ 13. help texts, no "studyNone"


def test_fit_help_shows_each_default_once() -> None:
    fit_help = build_parser()._subparsers._group_actions[0].choices["fit"].format_help()  # type: ignore[union-attr]
    flat = " ".join(fit_help.split())
    assert "(default: None)" not in flat
    assert "cache when --data or --simulate is given) (default" not in flat


def test_cases_without_a_study_are_not_called_study_none() -> None:
    rows = [
        SplitRow("image_1_nucleus", 1, "nucleus", None, "train"),
        SplitRow("image_2_nucleus", 2, "nucleus", 4, "val"),
    ]
    summary = split_summary(rows)
    assert summary == {"train": {"no study/nucleus": 1}, "val": {"study4/nucleus": 1}}
    assert "None" not in json.dumps(summary)
