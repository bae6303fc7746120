"""Train/validation split: seeded 4:1 by image id, stratified by (study, channel), or whole held-out studies.

Splitting by image id keeps every file of one specimen on one side. Holding out whole
studies (``--val-studies``) measures what the published method lost most on: studies
never seen in training.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLIT_FIELDS = ("case_id", "image_id", "channel", "study", "subset")


@dataclass(frozen=True)
class SplitRow:
    case_id: str
    image_id: int
    channel: str
    study: int | None
    subset: str  # "train" | "val"


def make_split(
    cases: list[tuple[str, int, str, int | None]],
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    val_studies: tuple[int, ...] = (),
    val_min_id: int = 0,
) -> list[SplitRow]:
    """Assign each ``(case_id, image_id, channel, study)`` to train or val.

    With ``val_min_id`` image ids from it on are validation (a held-out family placed beside the
    training pairs), with ``val_studies`` the listed studies; everything else trains.
    Otherwise ids are grouped by their stratum (study, channels the id has; an id with
    both channels forms a "membrane+nucleus" stratum), shuffled with ``seed``, and
    ``round(val_fraction * n)`` ids per stratum go to val (at least one when the stratum
    has two or more ids). Strata of one id are pooled by their channels and split as one
    stratum: simulated pairs draw their study at random, so a small simulated set is mostly
    such strata and would otherwise never validate.
    """
    if val_min_id > 0:  # a held-out family beside the training pairs: its ids validate
        return [
            SplitRow(c, i, ch, st, "val" if i >= val_min_id else "train")
            for c, i, ch, st in sorted(cases, key=_order)
        ]
    if val_studies:
        held = set(val_studies)
        return [
            SplitRow(c, i, ch, st, "val" if st in held else "train")
            for c, i, ch, st in sorted(cases, key=_order)
        ]
    channels: dict[int, set[str]] = defaultdict(set)
    studies: dict[int, str] = {}
    for _, image_id, channel, study in sorted(cases, key=_order):
        channels[image_id].add(channel)
        studies.setdefault(image_id, str(study))
    strata: dict[tuple[str, str], list[int]] = defaultdict(list)
    for image_id in sorted(channels):
        strata[(studies[image_id], "+".join(sorted(channels[image_id])))].append(image_id)
    pooled: dict[str, list[int]] = defaultdict(list)  # channels -> ids of one-id strata
    for (_, channel_set), ids in sorted(strata.items()):
        if len(ids) == 1:
            pooled[channel_set] += ids
    groups = [strata[key] for key in sorted(strata) if len(strata[key]) > 1]
    groups += [pooled[key] for key in sorted(pooled)]
    rng = np.random.default_rng(seed)
    val_ids: set[int] = set()
    for group in groups:
        ids = sorted(group)
        if len(ids) < 2 or val_fraction <= 0:
            continue
        count = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
        chosen = rng.permutation(len(ids))[:count]
        val_ids.update(ids[i] for i in chosen)
    return [
        SplitRow(c, i, ch, st, "val" if i in val_ids else "train")
        for c, i, ch, st in sorted(cases, key=_order)
    ]


def _order(case: tuple[str, int, str, int | None]) -> tuple[int, str]:
    return case[1], case[2]


def write_split(path: Path, rows: list[SplitRow]) -> None:
    """Write ``split.csv`` (one row per case)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(SPLIT_FIELDS)
        for row in rows:
            writer.writerow(
                [row.case_id, row.image_id, row.channel, "" if row.study is None else row.study, row.subset]
            )


def read_split(path: Path) -> list[SplitRow]:
    """Read a ``split.csv`` written by :func:`write_split`."""
    rows = []
    with open(path, newline="") as handle:
        for item in csv.DictReader(handle):
            if item["subset"] not in ("train", "val"):
                raise ValueError(f"{path}: subset must be train or val, got {item['subset']!r}")
            study = int(item["study"]) if item["study"] not in ("", "None") else None
            rows.append(
                SplitRow(item["case_id"], int(item["image_id"]), item["channel"], study, item["subset"])
            )
    return rows


def split_summary(rows: list[SplitRow]) -> dict[str, dict[str, int]]:
    """Counts per subset and (study, channel), for the log and the model card."""
    summary: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    for row in rows:
        study = f"study{row.study}" if row.study is not None else "no study"  # not "studyNone"
        key = f"{study}/{row.channel}"
        summary[row.subset][key] = summary[row.subset].get(key, 0) + 1
    return summary
