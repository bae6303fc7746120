"""``train.py export``: a training checkpoint -> safetensors + JSON model cards that inference.py loads.

Layout written (what :func:`fmc.weights.discover_models` searches)::

    <out>/<channel>/[study_<N>/]step1.{safetensors,json}
    <out>/<channel>/[study_<N>/]step2.{safetensors,json}

A stage-2 checkpoint carries its frozen step-1 network, so one file exports both steps.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from fmc.data.split import read_split, split_summary
from fmc.method import CHANNELS
from fmc.network import RUNet, RUNetConfig
from fmc.normalization import CARD_NORMALIZATION
from fmc.training.checkpoints import load_checkpoint, sub_state
from fmc.training.config import FitConfig
from fmc.weights import ModelCard, save_model

log = logging.getLogger(__name__)

EXPORT_CHANNELS = ("any", *CHANNELS)
FILE_MODE = 0o644
FOLDER_MODE = 0o755


def _make_shareable(out: Path, folder: Path, files: list[Path]) -> None:
    """0644 files and 0755 folders from ``out`` down to ``folder``, whatever the umask.

    Why: the exported folder is mounted into the ``fmc`` image, whose user (uid 1001) is not the
    one who exported; the atomic writer's temporaries are 0600, which that user cannot read.
    """
    for path in files:
        os.chmod(path, FILE_MODE)
    current = folder
    while True:
        os.chmod(current, FOLDER_MODE)
        if current == out or out not in current.parents:
            break
        current = current.parent


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint file as given; for a run folder, the best (else last) checkpoint of its latest stage."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a checkpoint nor a run folder")
    for stage in (2, 1):
        folder = path / f"step{stage}" / "checkpoints"
        best = sorted(folder.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
        if best:
            return best[-1]
        if (folder / "last.ckpt").is_file():
            return folder / "last.ckpt"
    raise FileNotFoundError(f"no checkpoint under {path}/step{{1,2}}/checkpoints")


def best_score(checkpoint: dict[str, Any]) -> float | None:
    """The ModelCheckpoint's best val/n_ssim stored in the checkpoint (None before any validation)."""
    for key, state in checkpoint.get("callbacks", {}).items():
        if "ModelCheckpoint" in key and isinstance(state, dict) and state.get("best_model_score") is not None:
            return float(state["best_model_score"])
    return None


def _portable(value: Any, base: Path) -> Any:
    """Absolute paths inside ``base`` (the working folder) as relative ones, in nested JSON values.

    Why: a card travels with the weights (into images, to other machines); a path like
    ``/home/me/runs/x`` says nothing there, ``runs/x`` says how the run was laid out.
    """
    if isinstance(value, str) and value.startswith("/"):
        path = Path(value)
        return str(path.relative_to(base)) if path.is_relative_to(base) else value
    if isinstance(value, dict):
        return {key: _portable(item, base) for key, item in value.items()}
    if isinstance(value, list):
        return [_portable(item, base) for item in value]
    return value


def _training_record(config: FitConfig, checkpoint: dict[str, Any], ckpt: Path) -> dict[str, Any]:
    """What the model card says about how the network was trained (paths relative to the cwd)."""
    run = Path(config.data.run_dir)
    record: dict[str, Any] = {
        "checkpoint": ckpt.name,
        "epoch": int(checkpoint.get("epoch", -1)),
        "global_step": int(checkpoint.get("global_step", -1)),
        "ablation": config.method.ablation,
        "fit_config": config.to_dict(),
        "pipeline": {
            **config.method.inference_settings().to_card(),
            "step1": config.method.step1_enabled,
            "step2": config.method.step2_enabled,
        },
    }
    split = run / "split.csv"
    if split.is_file():
        rows = read_split(split)
        record["split"] = {
            "summary": split_summary(rows),
            "val_cases": [r.case_id for r in rows if r.subset == "val"],
        }
    data = run / "data.json"
    if data.is_file():
        record["data"] = json.loads(data.read_text())
    return _portable(record, Path.cwd().resolve())


def export_checkpoint(
    ckpt: Path,
    out: Path,
    channel: str = "any",
    study: int | None = None,
    metrics: dict[str, Any] | None = None,
) -> list[Path]:
    """Write the networks of ``ckpt`` as safetensors + cards under ``out``; returns the stems written."""
    if channel not in EXPORT_CHANNELS:
        raise ValueError(f"channel must be one of {EXPORT_CHANNELS}, got {channel!r}")
    ckpt = resolve_checkpoint(ckpt)
    checkpoint = load_checkpoint(ckpt)
    hparams = checkpoint["hyper_parameters"]
    config = FitConfig.from_dict(hparams["config"])
    stage = int(hparams["stage"])
    state = checkpoint["state_dict"]
    networks: list[tuple[int, dict[str, Any], dict]] = []
    if stage == 1:
        networks.append((1, hparams["network"], sub_state(state, "generator")))
    else:
        if hparams.get("step1_network") is not None:
            networks.append((1, hparams["step1_network"], sub_state(state, "step1_net")))
        networks.append((2, hparams["network"], sub_state(state, "generator")))
    out = Path(out)
    folder = out / channel / (f"study_{study}" if study is not None else "")
    folder.mkdir(parents=True, exist_ok=True)
    scores = {"val_n_ssim": best_score(checkpoint), **(metrics or {})}
    training = _training_record(config, checkpoint, ckpt)
    created = time.strftime("%Y-%m-%dT%H:%M:%S")
    written = []
    for step, net_config, weights in networks:
        network = RUNet(RUNetConfig.from_dict(net_config))
        network.load_state_dict(weights)
        card = ModelCard(
            step=step,
            preset=config.method.preset,
            config=dict(net_config),
            normalization=dict(CARD_NORMALIZATION),
            training={**training, "trained_stage": stage},
            metrics={k: v for k, v in scores.items() if v is not None},
            created=created,
        )
        stem = folder / f"step{step}"
        save_model(stem, network, card)
        written.append(stem)
        log.info("exported step %d (%s preset) -> %s.safetensors", step, config.method.preset, stem)
    _make_shareable(
        out, folder, [stem.with_suffix(suffix) for stem in written for suffix in (".safetensors", ".json")]
    )
    exported = {step for step, _, _ in networks}
    for step in {1, 2} - exported:
        for suffix in (".safetensors", ".json"):
            stale = folder / f"step{step}{suffix}"
            if stale.exists():
                log.warning("removing %s: it belongs to another model than the one exported here", stale)
                stale.unlink()
    return written


def read_metrics_csv(path: Path) -> dict[str, Any]:
    """Held-out table (from ``train.py evaluate``) to put in the card: {channel: {method: mean}}."""
    table: dict[str, Any] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            table.setdefault(row["channel"], {})[row["method"]] = float(row["n_ssim_mean"])
    return {"held_out_n_ssim": table}
