"""``train.py prepare``: resample every pair once into a cache that training memory-maps.

Per case the cache holds four float16 ``.npy`` arrays, each percentile-normalized the way
the inference pipeline normalizes (each volume by its own p2/p99.8), then resampled:
``input``/``target`` at 0.6 um isotropic (step-2 crops, validation) and
``input_global``/``target_global`` at ``global_size``^3 (step 1). A case is done when
its ``case.json`` exists and still matches the sources and settings, so an interrupted
run resumes where it stopped. Bad files are listed in the manifest and skipped.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fmc.atomic import atomic_write_bytes
from fmc.data.pairs import PairedFiles, find_pairs, reconcile
from fmc.device import select_device
from fmc.distance import coarse_distance_channel
from fmc.io import CaseError, read_case
from fmc.method import DEFAULT_GLOBAL_SIZE, TARGET_SPACING_UM
from fmc.normalization import PERCENTILE_HIGH, PERCENTILE_LOW, percentile_normalize
from fmc.resample import isotropic_shape, resample_to_shape

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
CACHE_VERSION = 1
ARRAYS = ("input", "target", "input_global", "target_global", "distance")


@dataclass
class PrepareConfig:
    """Settings of one ``prepare`` run; the ones that change the arrays are checked on resume."""

    data: Path
    cache: Path
    workers: int = 1
    device: str = "auto"
    global_size: int = DEFAULT_GLOBAL_SIZE
    target_spacing: float = TARGET_SPACING_UM
    low: float = PERCENTILE_LOW
    high: float = PERCENTILE_HIGH
    progress: bool = True

    def settings(self) -> dict[str, Any]:
        """What a cached case must have been made with to be reused."""
        return {
            "version": CACHE_VERSION,
            "global_size": self.global_size,
            "target_spacing": self.target_spacing,
            "normalization": {"method": "percentile", "low": self.low, "high": self.high},
        }


@dataclass
class CachedCase:
    """One prepared pair, as recorded in ``case.json`` and the manifest."""

    id: str
    image_id: int
    channel: str
    study: int | None
    original_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    spacing_source: str
    iso_shape: tuple[int, int, int]
    global_shape: tuple[int, int, int]
    sources: dict[str, str]
    source_stats: dict[str, list[int]]
    dtype: str
    warnings: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def array_path(self, cache: Path, name: str) -> Path:
        """Path of one of :data:`ARRAYS`."""
        return cache / "cases" / self.id / f"{name}.npy"

    def load(self, cache: Path, name: str, mmap: bool = True) -> np.ndarray:
        """The array, memory-mapped by default so workers share pages instead of copies."""
        return np.load(self.array_path(cache, name), mmap_mode="r" if mmap else None)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CachedCase:
        values = dict(data)
        for key in ("original_shape", "spacing", "iso_shape", "global_shape"):
            values[key] = tuple(values[key])
        return cls(**values)


@dataclass
class Manifest:
    """The cache's table of contents: prepared cases, failures and files that had no partner."""

    settings: dict[str, Any]
    data: str
    cases: list[CachedCase] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    unpaired: list[dict[str, str]] = field(default_factory=list)
    created: str = ""

    @property
    def global_size(self) -> int:
        return int(self.settings["global_size"])

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        values = dict(data)
        values["cases"] = [CachedCase.from_dict(c) for c in data.get("cases", [])]
        return cls(**values)


def load_manifest(cache: Path) -> Manifest:
    """Read ``<cache>/manifest.json``; says how to make one when it is missing."""
    path = cache / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {cache}: run `train.py prepare --data DIR --cache {cache}`"
        )
    return Manifest.from_dict(json.loads(path.read_text()))


def _save_array(path: Path, tensor: torch.Tensor) -> None:
    array = tensor.to(torch.float16).cpu().numpy()
    atomic_write_bytes(path, lambda handle: np.save(handle, array))


def _stats(path: Path) -> list[int]:
    """Size and mtime (ns) of a source file: a changed file invalidates its cached case."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _is_done(pair: PairedFiles, cache: Path, settings: dict[str, Any]) -> CachedCase | None:
    """The cached record if the case is complete and made from the same files with the same settings."""
    record_path = cache / "cases" / pair.case_id / "case.json"
    if not record_path.is_file():
        return None
    try:
        record = CachedCase.from_dict(json.loads(record_path.read_text()))
    except (ValueError, TypeError, KeyError):
        return None
    fresh = {"angle": _stats(pair.angle), "fused": _stats(pair.fused)}
    if record.settings != settings or record.source_stats != fresh:
        return None
    if not all(record.array_path(cache, name).is_file() for name in ARRAYS):
        return None
    return record


def prepare_pair(pair: PairedFiles, cache: Path, settings: dict[str, Any], device: str) -> CachedCase:
    """Read, check, normalize and resample one pair; writes its arrays and ``case.json`` (last)."""
    angle = read_case(pair.angle)
    fused = read_case(pair.fused)
    if angle.volume.shape != fused.volume.shape:
        raise CaseError(
            pair.fused, f"shape {fused.volume.shape} differs from the angle file's {angle.volume.shape}"
        )
    agreement = reconcile(pair, angle.meta, fused.meta)
    shape = tuple(int(s) for s in angle.volume.shape)
    iso_shape = isotropic_shape(shape, agreement.spacing, settings["target_spacing"])
    size = int(settings["global_size"])
    norm = settings["normalization"]
    folder = cache / "cases" / pair.case_id
    folder.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    with torch.inference_mode():
        for role, case in (("input", angle), ("target", fused)):
            volume = torch.from_numpy(np.asarray(case.volume, dtype=np.float32)).to(dev)
            case.volume = np.empty(0)  # drop the native copy early: big studies are GiBs
            volume = percentile_normalize(volume, norm["low"], norm["high"])
            iso = resample_to_shape(volume, iso_shape)
            del volume
            _save_array(folder / f"{role}.npy", iso)
            _save_array(folder / f"{role}_global.npy", resample_to_shape(iso, (size, size, size)))
            if role == "input":  # step 2's distance channel, as the pipeline upsamples it per patch
                coarse = coarse_distance_channel(iso, settings["target_spacing"])
                _save_array(folder / "distance.npy", resample_to_shape(coarse, tuple(iso_shape)))
            del iso
    record = CachedCase(
        id=pair.case_id,
        image_id=pair.image_id,
        channel=pair.channel,
        study=agreement.study,
        original_shape=shape,  # type: ignore[arg-type]
        spacing=agreement.spacing,
        spacing_source=agreement.spacing_source,
        iso_shape=tuple(iso_shape),  # type: ignore[arg-type]
        global_shape=(size, size, size),
        sources={"angle": str(pair.angle.resolve()), "fused": str(pair.fused.resolve())},
        source_stats={"angle": _stats(pair.angle), "fused": _stats(pair.fused)},
        dtype=angle.meta.dtype,
        warnings=agreement.warnings,
        settings=settings,
    )
    text = json.dumps(asdict(record), indent=2)
    atomic_write_bytes(folder / "case.json", lambda handle: handle.write(text.encode()))
    return record


def _worker(pair: PairedFiles, cache: Path, settings: dict[str, Any], device: str) -> tuple[str, Any]:
    """Process-pool entry: never raises, so one bad file cannot take the pool down or lose others' work."""
    try:
        return "ok", prepare_pair(pair, cache, settings, device)
    except CaseError as error:
        return "failed", {"case": pair.case_id, "file": str(error.path), "reason": error.reason}
    except Exception as error:
        return "failed", {
            "case": pair.case_id,
            "file": str(pair.angle),
            "reason": f"{type(error).__name__}: {error}",
        }


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def prepare_cache(config: PrepareConfig) -> Manifest:
    """Prepare every pair of ``config.data`` into ``config.cache``; returns (and writes) the manifest."""
    search = find_pairs(config.data)
    for path, reason in search.unpaired:
        log.warning("unpaired: %s: %s", path.name, reason)
    settings = config.settings()
    device = str(select_device(config.device))
    config.cache.mkdir(parents=True, exist_ok=True)
    done: dict[str, CachedCase] = {}
    todo: list[PairedFiles] = []
    for pair in search.pairs:
        record = _is_done(pair, config.cache, settings)
        if record is None:
            todo.append(pair)
        else:
            done[pair.case_id] = record
    log.info(
        "%d pair(s) in %s: %d already prepared, %d to do, %d unpaired file(s); device %s, %d worker(s)",
        len(search.pairs),
        config.data,
        len(done),
        len(todo),
        len(search.unpaired),
        device,
        config.workers,
    )
    failed: list[dict[str, str]] = []
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="prepare", unit="case", disable=not config.progress or None)
    results = _run(todo, config, settings, device)
    for status, payload in results:
        bar.update(1)
        if status == "ok":
            done[payload.id] = payload
            for message in payload.warnings:
                log.warning("%s: %s", payload.id, message)
        else:
            failed.append(payload)
            log.error("skipped %s: %s: %s", payload["case"], Path(payload["file"]).name, payload["reason"])
    bar.close()
    order = [p.case_id for p in search.pairs]
    manifest = Manifest(
        settings=settings,
        data=str(config.data.resolve()),
        cases=[done[c] for c in order if c in done],
        failed=failed,
        unpaired=[{"file": str(p), "reason": r} for p, r in search.unpaired],
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    text = json.dumps(manifest.to_dict(), indent=2)
    atomic_write_bytes(config.cache / MANIFEST_NAME, lambda handle: handle.write(text.encode()))
    log.info(
        "prepared %d case(s) (%d new) in %.1fs; %d failed; manifest %s",
        len(manifest.cases),
        len(todo) - len(failed),
        time.perf_counter() - start,
        len(failed),
        config.cache / MANIFEST_NAME,
    )
    return manifest


def _run(todo: list[PairedFiles], config: PrepareConfig, settings: dict[str, Any], device: str):
    """Yield (status, payload) per pair: in this process for one worker, else from a process pool."""
    if config.workers <= 1 or len(todo) <= 1:
        for pair in todo:
            yield _worker(pair, config.cache, settings, device)
        return
    threads = max(1, (os.cpu_count() or 1) // config.workers)
    # CUDA cannot be re-initialised in a forked child: spawn there. On CPU fork is much cheaper (no
    # re-import of torch per worker) and safe, as for DataLoader workers.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if device == "cpu" and "fork" in methods else "spawn")
    with cf.ProcessPoolExecutor(
        config.workers, mp_context=context, initializer=_init_worker, initargs=(threads,)
    ) as pool:
        futures = {pool.submit(_worker, pair, config.cache, settings, device): pair for pair in todo}
        for future in cf.as_completed(futures):
            pair = futures[future]
            try:
                yield future.result()
            except Exception as error:
                reason = f"worker died: {type(error).__name__}: {error}"
                yield "failed", {"case": pair.case_id, "file": str(pair.angle), "reason": reason}
