"""The help formatter of fmc's command lines (inference.py, train.py, fmc.sample, the simulators)."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where the help does not already say what the default is.

    Why: argparse's own formatter prints ``(default: None)`` after required flags and after
    flags whose help explains what happens when they are left out."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.required or "default" in text.lower():
            return text
        return super()._get_help_string(action)
