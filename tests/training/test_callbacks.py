"""Throughput: every batch is timed, also in runs of one-batch epochs; no rate is null, not NaN."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from fmc.training.callbacks import Throughput


class _Module:
    def __init__(self) -> None:
        self.logged: list[float] = []

    def log(self, name: str, value: float, **kwargs: object) -> None:
        self.logged.append(value)


def test_one_batch_epochs_are_timed(tmp_path: Path) -> None:
    callback = Throughput(tmp_path / "throughput.json", skip=1)
    trainer, module = SimpleNamespace(world_size=2), _Module()
    batch = (torch.zeros(3, 1, 4, 4, 4),)
    for _ in range(4):  # one batch per epoch, the first one skipped as warm-up
        callback.on_train_epoch_start(trainer, module)  # type: ignore[arg-type]
        callback.on_train_batch_end(trainer, module, None, batch, 0)  # type: ignore[arg-type]
    summary = callback.summary()
    assert summary["samples"] == 3 * 3 * 2 and summary["samples_per_s"] > 0 and len(module.logged) == 3


def test_a_run_with_nothing_timed_writes_valid_json(tmp_path: Path) -> None:
    callback = Throughput(tmp_path / "throughput.json", skip=1)
    callback.on_train_end(SimpleNamespace(), _Module())  # type: ignore[arg-type]
    summary = json.loads((tmp_path / "throughput.json").read_text())  # NaN would not be JSON
    assert summary["samples_per_s"] is None and summary["samples"] == 0
