"""Model files: safetensors weights + a JSON model card, and discovery of the model to use for a case.

A model is ``<stem>.safetensors`` (tensors only: loading it can never execute code) plus ``<stem>.json``
(the :class:`ModelCard`: network config, step, intensity normalization, training record, metrics, format
version). Pickle-based checkpoints (``.pt``/``.pth``/``.ckpt``/``.pkl``/``.bin``) are refused without being
opened: unpickling runs arbitrary code. Convert a training checkpoint with ``python train.py export``.

Discovery (:func:`discover_models`) searches, in order, ``--weights DIR``, ``/opt/ml/model`` (where the
platform unpacks model.tar.gz; ``FMC_MODEL_DIR`` overrides it) and the repository's ``resources/weights``.
Inside a root::

    <root>/<nucleus|membrane|any>/[study_<N>/]step1.{safetensors,json}, step2.{safetensors,json}
    <root>/step1.{safetensors,json}, ...      (flat layout, counts as "any")

The first root holding a usable folder wins; within a root the channel folder wins over ``any/``, and
``study_<N>/`` wins over its parent when the metadata study is N. No weights -> WeightsNotFoundError
(never a silent identity).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fmc.atomic import atomic_write
from fmc.card_reader import CardError, check_card, check_model_folder
from fmc.network import RUNet, RUNetConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_SUFFIX = ".safetensors"
CARD_SUFFIX = ".json"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin")
STEPS = ("step1", "step2")
PLATFORM_MODEL_DIR = Path("/opt/ml/model")
MODEL_DIR_ENV = "FMC_MODEL_DIR"
REPO_WEIGHTS = Path(__file__).resolve().parent.parent / "resources" / "weights"

HOW_TO_GET_WEIGHTS = (
    "To get weights: train and export them with "
    "`python train.py fit ... && python train.py export --ckpt <checkpoint> --out model/` "
    "(then pass --weights model/ or pack model/ as the platform's model.tar.gz), or put "
    "step1/step2 .safetensors + .json files in resources/weights/<nucleus|membrane|any>/, "
    "or pass --weights DIR."
)


class WeightsError(Exception):
    """A model file exists but cannot be used (pickle, bad card, tensors not matching the config)."""


class WeightsNotFoundError(WeightsError):
    """No model folder found in any weight root."""


@dataclass
class ModelCard:
    """What a network needs besides its tensors; written as JSON next to the safetensors file."""

    step: int  # 1 or 2
    preset: str
    config: dict  # RUNetConfig.to_dict()
    normalization: dict  # e.g. {"method": "percentile", "low": 2.0, "high": 99.8}
    training: dict = field(default_factory=dict)  # data description, split, etc.
    metrics: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    created: str = ""  # ISO date


@dataclass
class LoadedModel:
    network: RUNet | None  # None: the step is skipped, so only its card was read and checked
    card: ModelCard
    path: Path  # the .safetensors file


@dataclass
class ModelSet:
    """The networks for one case; either step may be missing (the pipeline decides what that means)."""

    step1: LoadedModel | None
    step2: LoadedModel | None
    folder: Path


# --------------------------------------------------------------------------------------------- saving


def _stem(path: Path | str) -> Path:
    """``x``, ``x.safetensors`` and ``x.json`` all name the model ``x``."""
    path = Path(path)
    if path.suffix in (WEIGHTS_SUFFIX, CARD_SUFFIX):
        return path.with_suffix("")
    return path


def save_model(path_stem: Path, network: RUNet, card: ModelCard) -> None:
    """Write ``<stem>.safetensors`` then ``<stem>.json`` (the card last: its presence marks a complete model).

    The card's config must describe ``network``; it is stored normalized (``network.config.to_dict()``).
    """
    stem = _stem(path_stem)
    if stem.suffix in PICKLE_SUFFIXES:
        raise WeightsError(f"{stem}: give a stem without a pickle suffix; models are saved as safetensors")
    try:
        card_config = RUNetConfig.from_dict(card.config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"card.config is not a valid RUNetConfig: {error}") from error
    if card_config != network.config:
        raise ValueError(f"card.config {card.config} does not match the network's config {network.config}")
    card = dataclasses.replace(card, config=network.config.to_dict())
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in network.state_dict().items()}
    metadata = {"format": "pt", "fmc_format_version": str(card.format_version), "step": str(card.step)}
    atomic_write(stem.with_suffix(WEIGHTS_SUFFIX), lambda p: save_file(tensors, str(p), metadata=metadata))
    write_card(stem.with_suffix(CARD_SUFFIX), card)
    log.info("saved step-%d model (%s) -> %s%s", card.step, card.preset, stem, WEIGHTS_SUFFIX)


def write_card(path: Path, card: ModelCard) -> None:
    """Write a model card as indented JSON, atomically (a reader never sees half a card)."""
    text = json.dumps(dataclasses.asdict(card), indent=2) + "\n"
    atomic_write(Path(path), lambda p: p.write_text(text, encoding="utf-8"))


def update_cards(weights: Path, edit: Callable[[ModelCard], None]) -> list[Path]:
    """Apply ``edit`` to every model card under ``weights`` and write each back; returns the cards.

    For settings fitted after export (the tuned baseline sigma, the safeguard): every step's card
    gets them, so the steps' cards keep agreeing.
    """
    changed = []
    for card_path in sorted(Path(weights).rglob("step*.json")):
        card = read_card(card_path)
        edit(card)
        write_card(card_path, card)
        changed.append(card_path)
    return changed


# -------------------------------------------------------------------------------------------- loading


def _pickle_refusal(path: Path) -> WeightsError:
    return WeightsError(
        f"{path}: pickle-based checkpoints are refused (unpickling can execute arbitrary code). "
        "Convert it to safetensors + a JSON model card with "
        "`python train.py export --ckpt <checkpoint> --out model/` and load that instead."
    )


def _pickle_siblings(stem: Path) -> list[Path]:
    return [stem.with_name(stem.name + s) for s in PICKLE_SUFFIXES if stem.with_name(stem.name + s).exists()]


def _looks_like_pickle(path: Path) -> bool:
    """torch.save writes a zip archive ('PK') or a raw pickle (protocol opcode 0x80)."""
    with path.open("rb") as f:
        head = f.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def read_card(path: Path) -> ModelCard:
    """Parse and validate a model card; every problem is a WeightsError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(f"{path}: cannot read the model card: {error}") from error
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: the model card must be a JSON object")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise WeightsError(
            f"{path}: model card format_version {version!r} is not supported (this code reads "
            f"version {FORMAT_VERSION}); re-export the model with this version of train.py export"
        )
    try:
        check_card(path, data, ModelCard)  # types, ranges, settings: one line naming the key
    except CardError as error:
        raise WeightsError(str(error)) from None
    known = {f.name for f in dataclasses.fields(ModelCard)}
    unknown = sorted(set(data) - known)
    if unknown:
        log.warning("%s: ignoring unknown model card keys %s", path, unknown)
    try:
        card = ModelCard(**{k: v for k, v in data.items() if k in known})
    except TypeError as error:
        raise WeightsError(f"{path}: incomplete model card: {error}") from error
    if card.step not in (1, 2):
        raise WeightsError(f"{path}: step must be 1 or 2, got {card.step!r}")
    if not isinstance(card.config, dict) or not isinstance(card.normalization, dict):
        raise WeightsError(f"{path}: 'config' and 'normalization' must be JSON objects")
    return card


def load_model(path_stem: Path, device: torch.device | str = "cpu", *, tensors: bool = True) -> LoadedModel:
    """Load ``<stem>.safetensors`` + ``<stem>.json`` into an eval-mode RUNet on ``device``.

    Never unpickles: a pickle path, or a stem for which only a pickle file exists, is refused.
    ``tensors=False`` (a skipped step) reads and checks the card only, never opening the weights
    file, so a run that does not need the step cannot fail on it.
    """
    given = Path(path_stem)
    if given.suffix in PICKLE_SUFFIXES:
        raise _pickle_refusal(given)
    stem = _stem(given)
    weights, card_path = stem.with_suffix(WEIGHTS_SUFFIX), stem.with_suffix(CARD_SUFFIX)
    if not weights.is_file():
        pickles = _pickle_siblings(stem)
        if pickles:
            raise _pickle_refusal(pickles[0])
        raise WeightsNotFoundError(f"{weights}: no such model file. {HOW_TO_GET_WEIGHTS}")
    if not card_path.is_file():
        raise WeightsError(f"{card_path}: model card missing next to {weights.name}")
    if tensors and _looks_like_pickle(weights):
        raise _pickle_refusal(weights)
    card = read_card(card_path)
    try:
        config = RUNetConfig.from_dict(card.config)
    except (TypeError, ValueError) as error:
        raise WeightsError(f"{card_path}: invalid network config: {error}") from error
    if not tensors:
        log.info("step-%d model %s skipped: its card was checked, its tensors not read", card.step, weights)
        return LoadedModel(network=None, card=card, path=weights)
    try:
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"{weights}: not a readable safetensors file: {error}") from error
    _check_finite(weights, tensors)
    network = RUNet(config)
    _check_tensors(weights, network, tensors)
    network.load_state_dict(tensors, strict=True)
    network.to(device).eval()
    log.info(
        "loaded step-%d model %s (preset %s, %d input channel(s)) on %s",
        card.step,
        weights,
        card.preset,
        config.in_channels,
        device,
    )
    return LoadedModel(network=network, card=card, path=weights)


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse weights holding NaN or Inf: such a network outputs NaN everywhere, and the safeguard
    that gives non-finite voxels the input's values would turn it into a silent identity."""
    broken = [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if broken:
        raise WeightsError(
            f"{path}: {len(broken)} of {len(tensors)} tensors hold NaN or Inf values (e.g. {broken[:3]}): "
            "the weights are broken; re-export or re-download them"
        )


def _check_tensors(path: Path, network: RUNet, tensors: dict[str, torch.Tensor]) -> None:
    """Compare names and shapes with the card's network so a mismatch reads better than load_state_dict."""
    expected = network.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [
        f"{k}: file {tuple(tensors[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if shapes:
        problems.append(f"{len(shapes)} with another shape (e.g. {shapes[:3]})")
    if problems:
        raise WeightsError(
            f"{path}: tensors do not match the network config of its model card: " + "; ".join(problems)
        )


# ------------------------------------------------------------------------------------------ discovery


def weight_roots(explicit: Path | None) -> list[Path]:
    """Folders searched for models, in priority order: --weights, /opt/ml/model, resources/weights."""
    candidates = [] if explicit is None else [Path(explicit)]
    candidates.append(Path(os.environ.get(MODEL_DIR_ENV) or PLATFORM_MODEL_DIR))
    candidates.append(REPO_WEIGHTS)
    roots: list[Path] = []
    seen: set[Path] = set()
    for root in candidates:
        key = root.expanduser().resolve()
        if key not in seen:
            seen.add(key)
            roots.append(root.expanduser())
    log.info("weight search order: %s", ", ".join(str(r) for r in roots))
    return roots


def _steps_in(folder: Path) -> list[str]:
    """Steps with a complete model (weights + card) in ``folder``; refuses a pickle-only step."""
    found = []
    for step in STEPS:
        stem = folder / step
        has_weights = stem.with_suffix(WEIGHTS_SUFFIX).is_file()
        has_card = stem.with_suffix(CARD_SUFFIX).is_file()
        if has_weights and has_card:
            found.append(step)
        elif has_weights or has_card:
            log.warning("%s: ignoring %s: it needs both %s and %s", folder, step, WEIGHTS_SUFFIX, CARD_SUFFIX)
        elif pickles := _pickle_siblings(stem):
            raise _pickle_refusal(pickles[0])
    return found


def _choose_folder(root: Path, channel: str, study: int | None) -> tuple[Path, str] | None:
    """The model folder to use inside one root and why, or None."""
    subfolders = [channel, "any"] if channel not in ("any", "", "unknown") else ["any"]
    for sub in subfolders:
        folder = root / sub
        if not folder.is_dir():
            continue
        why = f"channel folder {sub}/" if sub == channel else f"any/ (no usable {channel}/ folder)"
        if study is not None:
            study_folder = folder / f"study_{study}"
            if study_folder.is_dir() and _steps_in(study_folder):
                return study_folder, f"{why}, study_{study}/ matches the metadata study {study}"
        if _steps_in(folder):
            return folder, why
    if _steps_in(root):
        return root, f"model files directly in the root (flat layout, any channel; no {channel}/ or any/)"
    return None


def _check_folder_cards(folder: Path, steps: list[str], skip: Collection[str]) -> None:
    """Before any tensor is loaded: each card checked, every step the cards say the model has is
    there (never step 1 alone from a half-copied folder), and the two cards agree."""
    cards = {}
    for step in steps:
        path = folder / f"{step}{CARD_SUFFIX}"
        cards[step] = (path, dataclasses.asdict(read_card(path)))
    try:
        check_model_folder(folder, cards, skip)
    except CardError as error:
        raise WeightsError(str(error)) from None


def discover_models(
    explicit: Path | None,
    channel: str,
    study: int | None,
    device: torch.device | str = "cpu",
    skip: Collection[str] = (),
) -> ModelSet:
    """Find and load the step-1/step-2 models for a case of ``channel`` (and ``study``, when known).

    Steps named in ``skip`` (``"step1"``, ``"step2"``) get their card read and checked, not their tensors.
    """
    if explicit is not None and not Path(explicit).is_dir():
        raise WeightsNotFoundError(
            f"--weights {explicit}: no such folder. {HOW_TO_GET_WEIGHTS}"
            if not Path(explicit).exists()
            else f"--weights {explicit}: not a folder (give the folder holding step1/step2 files)"
        )
    searched: list[str] = []
    for root in weight_roots(explicit):
        if not root.is_dir():
            log.debug("weights: %s does not exist, skipped", root)
            searched.append(f"{root} (missing)")
            continue
        chosen = _choose_folder(root, channel, study)
        if chosen is None:
            searched.append(f"{root} (no {channel}/, any/ or flat step1/step2 models)")
            continue
        folder, why = chosen
        log.info("using models in %s: %s", folder, why)
        steps = _steps_in(folder)
        _check_folder_cards(folder, steps, skip)
        loaded = {step: load_model(folder / step, device, tensors=step not in skip) for step in steps}
        for step, model in loaded.items():
            if f"step{model.card.step}" != step:
                raise WeightsError(f"{model.path}: its card says step {model.card.step}, its name {step}")
        return ModelSet(step1=loaded.get("step1"), step2=loaded.get("step2"), folder=folder)
    raise WeightsNotFoundError(
        f"no model weights found for channel {channel!r}"
        + (f" (study {study})" if study is not None else "")
        + ". Searched: "
        + "; ".join(searched)
        + f". {HOW_TO_GET_WEIGHTS}"
    )
