"""What fmc's command lines share (inference.py, train.py, fmc.sample, the simulators): the help
formatter, one-line errors, and parsed flags turned into the dataclass they configure."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")


def default_goes_unsaid(default: Any, help_text: str) -> bool:
    """True where ``(default: X)`` would say nothing: no default (None, an empty list), or a help
    text that already says what happens when the flag is left out."""
    empty = default is None or (isinstance(default, (list, tuple)) and not default)
    return empty or "default" in help_text.lower()


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where it tells something (see :func:`default_goes_unsaid`).

    Why: argparse's own formatter prints ``(default: None)`` after required flags and after
    flags whose help explains what happens when they are left out."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.required or default_goes_unsaid(action.default, text):
            return text
        return super()._get_help_string(action)


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``prog: error: ... (see prog --help)``), exit 2.

    Why: argparse prints its whole usage block first; for inference.py that is a dozen lines in
    front of the one that says what is wrong, and every command-line fault must be one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def from_flags(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """``cls`` (a dataclass) built from parsed flags: each field not in ``given`` takes the flag of
    the same name, or keeps its default where the parser has no such flag.

    Why: where a flag and a field share a name, the mapping is this one line, not one per field."""
    names = {f.name for f in dataclasses.fields(cls) if f.init} - given.keys()  # type: ignore[arg-type]
    flags = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return cls(**flags, **given)
