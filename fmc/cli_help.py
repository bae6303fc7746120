"""The help formatter of fmc's command lines (inference.py, train.py, fmc.sample, the simulators)."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn


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
