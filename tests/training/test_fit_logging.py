"""One logging path for ``train.py fit`` (issue 26): Lightning's lines (the model summary, the
``weights_only`` notice) print once, in fmc's format, not a second time with a bare ``INFO:``."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from fmc.training.cli import one_logging_path

from .conftest import tiny_fit_args

REPO = Path(__file__).resolve().parents[2]


def test_a_fit_prints_each_lightning_line_once(sim_cache: Path, tmp_path: Path) -> None:
    args = tiny_fit_args(tmp_path / "run", sim_cache, "--step", "1")
    proc = subprocess.run(
        [sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert not [line for line in lines if line.startswith(("INFO: ", "WARNING: "))], proc.stderr
    assert sum("Trainable params" in line for line in lines) == 1, proc.stderr
    summary = [line for line in lines if "lightning.pytorch.callbacks.model_summary" in line]
    assert len(summary) == 1 and " INFO " in summary[0], proc.stderr


@pytest.mark.parametrize("configured", [True, False])
def test_lightning_keeps_its_console_only_where_nobody_configured_logging(
    configured: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Embedded use with no logging configured: removing Lightning's console would lose its lines."""
    console = logging.StreamHandler()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "handlers", [console] if name == "lightning" else [])
        monkeypatch.setattr(logger, "propagate", name == "lightning")
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.NullHandler()] if configured else [])
    one_logging_path()
    assert logging.getLogger("lightning").handlers == ([] if configured else [console])
    assert logging.getLogger("lightning.pytorch").propagate is configured
