"""Training callbacks: throughput (samples/s) for the logs and the run summary."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class Throughput(L.Callback):
    """Samples per second over all ranks, measured batch end to batch end (data loading included);
    an epoch's first batch is timed from the epoch's start.

    The first ``skip`` batches of the run are left out (worker start, cuDNN autotuning). The
    summary goes to ``<path>`` as JSON at the end of training (``samples_per_s`` null when no
    batch was timed).
    """

    def __init__(self, path: Path, skip: int = 1) -> None:
        self.path = path
        self.skip = skip
        self._last: float | None = None
        self._seen = 0
        self._samples = 0
        self._seconds = 0.0
        self._world_size = 1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        self._seen += 1
        self._world_size = trainer.world_size
        if self._last is not None and self._seen > self.skip:
            size = int(batch[0].shape[0]) * trainer.world_size
            seconds = now - self._last
            self._samples += size
            self._seconds += seconds
            pl_module.log(
                "train/samples_per_s", size / seconds, on_step=True, on_epoch=False, batch_size=size
            )
        self._last = now

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the gap across validation / epoch boundaries is not training time, but an epoch's first
        # batch is: without it, runs of one-batch epochs would never be timed
        self._last = time.perf_counter()

    def summary(self) -> dict[str, float | None]:
        rate = self._samples / self._seconds if self._seconds > 0 else None
        return {
            "samples": self._samples,
            "seconds": round(self._seconds, 3),
            "samples_per_s": rate,
            "world_size": self._world_size,
        }

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.summary(), indent=2) + "\n")


class LastCheckpoint(L.Callback):
    """``last.ckpt`` after every validation and at the end of training, whatever the score did.

    Why not ModelCheckpoint's ``save_last``: in this Lightning version it writes last.ckpt only when
    the monitored score enters the top k at that step, so a run whose score stalls (or ties, as an
    identity-initialized network's does at first) would resume from an old step.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def _save(self, trainer: L.Trainer) -> None:
        if not trainer.sanity_checking:
            trainer.save_checkpoint(str(self.path))  # collective: every rank calls it, rank 0 writes

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)
