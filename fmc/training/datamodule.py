"""LightningDataModule: prepares data once per node, splits, and serves one stage's datasets.

``prepare_data`` (one process per node, the others wait at Lightning's barrier) simulates,
prepares the cache and computes the step-1 outputs; ``setup`` (every rank) reads the
manifest, makes the split and builds the datasets. Lightning wraps the training loader
in a DistributedSampler under DDP, so each rank sees its own shard.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from fmc.data.split import SplitRow, make_split, read_split, split_summary, write_split
from fmc.network import RUNet
from fmc.training.cache import CachedCase, Manifest, load_manifest
from fmc.training.config import FitConfig
from fmc.training.data import GlobalDataset, JointDataset, PatchDataset, ValidationCases, first_item
from fmc.training.pipeline_config import pipeline_config_of
from fmc.training.sources import ensure_cache, load_matching_manifest
from fmc.training.step1_outputs import compute_step1_outputs

log = logging.getLogger(__name__)


def resolve_split(config: FitConfig, cases: list[CachedCase]) -> list[SplitRow]:
    """The run's split: ``--split-csv``, else the run's own split.csv when resuming, else a new seeded one."""
    run_split = Path(config.data.run_dir) / "split.csv"
    if config.validation.split_csv:
        rows = read_split(Path(config.validation.split_csv))
    elif run_split.is_file() and config.hardware.resume:
        rows = read_split(run_split)
    else:
        rows = make_split(
            [(c.id, c.image_id, c.channel, c.study) for c in cases],
            val_fraction=config.validation.val_fraction,
            seed=config.seed_of_split(),
            val_studies=tuple(config.validation.val_studies),
            val_min_id=config.validation.val_min_id,
        )
    known = {c.id for c in cases}
    missing = [r.case_id for r in rows if r.case_id not in known]
    if missing:
        log.warning(
            "%d case(s) of the split are not in the cache and are ignored: %s", len(missing), missing[:5]
        )
    unsplit = known - {r.case_id for r in rows}
    if unsplit:
        log.warning(
            "%d cached case(s) are not in the split and are not used: %s", len(unsplit), sorted(unsplit)[:5]
        )
    _write_split_rank_zero(run_split, rows)
    return rows


@rank_zero_only
def _write_split_rank_zero(path: Path, rows: list[SplitRow]) -> None:
    write_split(path, rows)


def pick_validation(cases: list[CachedCase], limit: int) -> list[CachedCase]:
    """At most ``limit`` cases, alternating channels so both are scored (0: all)."""
    ordered = sorted(cases, key=lambda c: (c.channel, c.image_id))
    if limit <= 0 or limit >= len(ordered):
        return ordered
    by_channel: dict[str, list[CachedCase]] = {}
    for case in ordered:
        by_channel.setdefault(case.channel, []).append(case)
    picked: list[CachedCase] = []
    while len(picked) < limit:
        for group in by_channel.values():
            if group and len(picked) < limit:
                picked.append(group.pop(0))
    return picked


class FusionDataModule(L.LightningDataModule):
    """Data of one stage of one run."""

    def __init__(
        self,
        config: FitConfig,
        stage: int,
        *,
        step1_network: RUNet | None = None,
        step1_network_config: dict | None = None,
        step1_dir: Path | None = None,
        prepare_workers: int = 1,
    ) -> None:
        super().__init__()
        self.config = config
        self.stage = stage
        self.step1_network = step1_network
        self.step1_network_config = step1_network_config
        self.step1_dir = step1_dir
        self.prepare_workers = prepare_workers
        self.prepare_data_per_node = True
        self.train_cases: list[CachedCase] = []
        self.val_cases: list[CachedCase] = []

    def prepare_data(self) -> None:
        cache = ensure_cache(self.config, workers=self.prepare_workers)
        if self.stage == 2 and self.step1_network is not None and not self.config.method.joint:
            assert self.step1_dir is not None and self.step1_network_config is not None
            train, _, _ = self._split(load_manifest(cache))
            device = self.trainer.strategy.root_device if self.trainer is not None else None
            precision = str(self.trainer.precision) if self.trainer is not None else ""
            device = device or self.step1_network_device()
            compute_step1_outputs(
                self.step1_network,
                self.step1_network_config,
                train,
                cache,
                self.step1_dir,
                pipeline=pipeline_config_of(self.config, 1, device, precision, with_dw=False),
                device=device,
            )

    def step1_network_device(self):
        assert self.step1_network is not None
        return next(self.step1_network.parameters()).device

    def _split(self, manifest: Manifest) -> tuple[list[CachedCase], list[CachedCase], list[SplitRow]]:
        cases = [
            c
            for c in manifest.cases
            if not self.config.data.channels or c.channel in self.config.data.channels
        ]
        if not cases:
            raise ValueError(
                f"no cached case matches channels {self.config.data.channels or 'any'} in "
                f"{self.config.data.cache_dir()}"
            )
        rows = resolve_split(self.config, cases)
        subset = {r.case_id: r.subset for r in rows}
        train = [c for c in cases if subset.get(c.id) == "train"]
        val = [c for c in cases if subset.get(c.id) == "val"]
        return train, val, rows

    def setup(self, stage: str) -> None:
        self.train_cases, all_val, rows = self._split(load_matching_manifest(self.config))
        if not self.train_cases:
            raise ValueError(
                "the split leaves no training case: lower --val-fraction or change --val-studies"
            )
        self.val_cases = pick_validation(all_val, self.config.validation.val_max_cases)
        if not self.val_cases:
            log.warning(
                "stage %d: the split leaves no validation case (--val-fraction 0, or fewer than two image "
                "ids per set of channels): no checkpoint is chosen by N_SSIM and export takes the last "
                "step; add pairs, or give --val-min-id, --val-studies or --split-csv",
                self.stage,
            )
        log.info(
            "stage %d: %d training case(s), %d validation case(s) (of %d); split %s",
            self.stage,
            len(self.train_cases),
            len(self.val_cases),
            len(all_val),
            split_summary(rows),
        )
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None:
            module.val_cases = self.val_cases

    def train_dataloader(self) -> DataLoader:
        cache = self.config.data.cache_dir()
        if self.stage == 1:
            dataset = GlobalDataset(cache, self.train_cases, flips=self.config.data.flips)
            batch = self.config.optimiser.batch_global
        elif self.config.method.joint:
            dataset = JointDataset(
                cache,
                self.train_cases,
                self.config.method.patch,
                self.config.data.patches_per_case,
                self.config.data.flips,
            )
            batch = self.config.optimiser.batch
        else:
            step1_dir = self.step1_dir if self.step1_network is not None else None
            dataset = PatchDataset(
                cache,
                self.train_cases,
                self.config.method.patch,
                self.config.data.patches_per_case,
                step1_dir,
                flips=self.config.data.flips,
                target_frame=self.config.method.target_frame,
                distance=self.config.method.distance_channel,
            )
            batch = self.config.optimiser.batch
        workers = self.config.hardware.num_workers
        return DataLoader(
            dataset,
            batch_size=batch,
            shuffle=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self._pin(),
            drop_last=len(dataset) >= batch,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(ValidationCases(self.val_cases), batch_size=1, shuffle=False, collate_fn=first_item)

    def _pin(self) -> bool:
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
