"""One reader for the model cards of a model folder: every value's type and range, and the two
steps' cards against each other, before any tensor is loaded.

Why generic: the method settings a card stores (``training.pipeline``) are the fields of
:class:`fmc.method.MethodSettings`; the reader walks those fields and their type hints, so a
setting added there is checked here without a second list to keep in step. A fault is one
:class:`CardError` naming the card and the key (``step2.json: training.pipeline.max_filter: "3"
is not an integer``), which :mod:`fmc.weights` turns into its WeightsError; the run then fails
that case with one line, never a TypeError traceback and a retry.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fmc.method import MethodSettings
from fmc.network import RUNetConfig
from fmc.normalization import CARD_NORMALIZATION as NORMALIZATION

log = logging.getLogger(__name__)

#: ``training.pipeline`` keys besides the method settings: which steps the model has
#: (``train.py export`` writes both; false marks a one-step model).
STEP_FLAGS = ("step1", "step2")
#: Upper bounds no type hint carries: a cube or patch edge past these is a typo, and would ask
#: for terabytes (4096^3 float32 is 256 GiB per buffer) before anything could say so.
SIZE_LIMITS = {"global_size": 1024, "patch": 1024}
#: Older cards stored difference weighting as a bool (MethodSettings.from_card reads it).
LEGACY_TYPES: dict[str, Any] = {"difference_weighting": bool}


class CardError(ValueError):
    """A model card this pipeline cannot follow; ``str(error)`` is one line naming card and key."""

    def __init__(self, path: Path | str, key: str, problem: str) -> None:
        self.path, self.key = Path(path), key
        super().__init__(f"{path}: {key}: {problem}" if key else f"{path}: {problem}")


# ------------------------------------------------------------------------------------ values


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:  # which values: MethodSettings' own check says
        return _type_name(_literal_type(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if origin is tuple or hint is tuple:
        return "a list"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object"}
    return names.get(hint, "null" if hint is type(None) else getattr(hint, "__name__", str(hint)))


def matches(value: Any, hint: Any) -> bool:
    """Whether a JSON ``value`` is of the Python type ``hint`` (ints are not bools, 64.5 is no int)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is typing.Literal:  # the values' type here; which values, MethodSettings' own check
        return matches(value, _literal_type(hint))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if origin is tuple or hint is tuple:
        args = [arg for arg in typing.get_args(hint) if arg is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(matches(item, args[0]) for item in value if args)
    if origin in (dict, Mapping) or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a hint this reader does not know: MethodSettings' own checks still run


def _literal_type(hint: Any) -> type:
    """The one Python type of a Literal's values (``Literal["a", "b"]``: str)."""
    kinds = {type(arg) for arg in typing.get_args(hint)}
    return kinds.pop() if len(kinds) == 1 else object


def _check_fields(
    path: Path, prefix: str, data: Mapping[str, Any], cls: type, legacy: Mapping[str, Any] | None = None
) -> None:
    """Every key of ``data`` that is a field of the dataclass ``cls`` has the field's type."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        legacy_hint = (legacy or {}).get(f.name)
        if matches(value, hint) or (legacy_hint is not None and matches(value, legacy_hint)):
            continue
        raise CardError(path, f"{prefix}{f.name}", f"{_shown(value)} is not {_type_name(hint)}")


def _shown(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else f'"{value}"'
    text = "null" if value is None else text
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------------ one card


def check_card(path: Path, data: Mapping[str, Any], card_type: type) -> None:
    """One card as a whole: its blocks' types, the network config, normalization, method settings.

    ``card_type`` is :class:`fmc.weights.ModelCard` (passed in: that module imports this one).
    """
    _check_fields(path, "", data, card_type)
    if data.get("step") not in (1, 2):
        raise CardError(path, "step", f"{_shown(data.get('step'))} is not 1 or 2")
    _check_fields(path, "config.", data.get("config", {}), RUNetConfig)
    check_normalization(path, data.get("normalization", {}))
    training = data.get("training", {})
    if "pipeline" in training:
        check_pipeline(path, training["pipeline"])


def check_normalization(path: Path, block: Mapping[str, Any]) -> None:
    """The intensity normalization the network was trained with must be the one this pipeline does
    (fixed percentiles, :mod:`fmc.normalization`): a card that says otherwise would be ignored."""
    for key, wanted in NORMALIZATION.items():
        if key not in block:
            raise CardError(
                path, f"normalization.{key}", f"missing (this pipeline normalizes as {NORMALIZATION})"
            )
        value = block[key]
        if not matches(value, type(wanted)):
            raise CardError(
                path, f"normalization.{key}", f"{_shown(value)} is not {_type_name(type(wanted))}"
            )
        if value != wanted:
            raise CardError(
                path,
                f"normalization.{key}",
                f"{_shown(value)}, but this pipeline normalizes with {key}={wanted!r}; re-export the model",
            )
    unknown = sorted(set(block) - set(NORMALIZATION))
    if unknown:
        log.warning("%s: normalization keys %s are not read by this pipeline: ignored", path, unknown)


def check_pipeline(path: Path, pipeline: Any) -> None:
    """``training.pipeline``: the method settings' types and ranges, the step flags; unknown keys warned."""
    prefix = "training.pipeline."
    if not isinstance(pipeline, dict):
        raise CardError(path, "training.pipeline", f"{_shown(pipeline)} is not an object")
    _check_fields(path, prefix, pipeline, MethodSettings, LEGACY_TYPES)
    for flag in STEP_FLAGS:
        if flag in pipeline and not isinstance(pipeline[flag], bool):
            raise CardError(path, prefix + flag, f"{_shown(pipeline[flag])} is not true or false")
    for key, limit in SIZE_LIMITS.items():
        if key in pipeline and pipeline[key] > limit:
            raise CardError(path, prefix + key, f"{pipeline[key]} is larger than {limit}")
    for key in (f.name for f in dataclasses.fields(MethodSettings)):
        if key in pipeline:  # each setting alone first, so the line names its key
            try:
                MethodSettings.from_card({key: pipeline[key]})
            except ValueError as error:
                raise CardError(path, prefix + key, str(error)) from None
    try:
        MethodSettings.from_card(pipeline)
    except ValueError as error:
        raise CardError(path, "training.pipeline", str(error)) from None
    known = {f.name for f in dataclasses.fields(MethodSettings)} | set(STEP_FLAGS)
    unknown = sorted(set(pipeline) - known)
    if unknown:
        log.warning(
            "%s: training.pipeline keys %s are not settings of this pipeline: ignored (it reads %s)",
            path,
            unknown,
            ", ".join(sorted(known)),
        )


# ------------------------------------------------------------------------------------ a folder


def steps_the_model_has(data: Mapping[str, Any]) -> set[str]:
    """The steps a card says its model has (``training.pipeline.step1/step2``, both when unsaid)."""
    pipeline = data.get("training", {}).get("pipeline", {})
    return {flag for flag in STEP_FLAGS if pipeline.get(flag, True)}


def check_model_folder(folder: Path, cards: Mapping[str, tuple[Path, Mapping[str, Any]]], skip=()) -> None:
    """The steps' cards of one folder together: every step the cards say the model has is there
    (a half-copied folder is not a one-step model), and the cards agree on every setting.

    ``cards`` maps ``"step1"``/``"step2"`` to (card path, checked card dict); ``skip``: steps the run
    switches off, which need not be there.
    """
    wanted: set[str] = set()
    for _, data in cards.values():
        wanted |= steps_the_model_has(data)
    missing = sorted(wanted - set(cards) - set(skip))
    if missing:
        present = ", ".join(sorted(cards)) or "no step"
        path = next(iter(cards.values()))[0] if cards else folder
        raise CardError(
            path,
            "",
            f"the model has {' and '.join(sorted(wanted))} but {folder} holds {present} only: "
            + ", ".join(f"{step}.safetensors + {step}.json" for step in missing)
            + " missing (a one-step model says so in its card: training.pipeline."
            + f"{missing[0]}: false)",
        )
    if len(cards) == 2:
        _check_agreement(cards["step1"], cards["step2"])


def _check_agreement(first: tuple[Path, Mapping], second: tuple[Path, Mapping]) -> None:
    """Step 1's and step 2's cards hold one method: a setting both state must be the same."""
    (path1, card1), (path2, card2) = first, second
    stated1 = card1.get("training", {}).get("pipeline", {})
    stated2 = card2.get("training", {}).get("pipeline", {})
    keys = [f.name for f in dataclasses.fields(MethodSettings)] + list(STEP_FLAGS)
    for key in keys:
        if key in stated1 and key in stated2 and _same(key, stated1[key]) != _same(key, stated2[key]):
            raise CardError(
                path2,
                f"training.pipeline.{key}",
                f"{_shown(stated2[key])} here but {_shown(stated1[key])} in {path1.name}: the steps' cards "
                "must describe one method",
            )
    if card1.get("normalization") != card2.get("normalization"):
        raise CardError(path2, "normalization", f"differs from {path1.name}'s")


def _same(key: str, value: Any) -> Any:
    """A setting as compared across cards: lists and tuples alike, the legacy DW bool as its form."""
    if key == "difference_weighting" and isinstance(value, bool):
        return "paper" if value else "none"
    return tuple(value) if isinstance(value, list) else value
