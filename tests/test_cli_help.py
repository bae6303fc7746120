"""fmc.cli_help: a default is shown once, and never as "None" or after a required flag."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from fmc.cli_help import DefaultsHelpFormatter

REPO = Path(__file__).resolve().parents[1]


def _help_of(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_help().split())


def test_defaults_are_shown_once_and_never_as_none() -> None:
    parser = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--weights", default=None, help="model folder (default: discovery order)")
    parser.add_argument("--seed", type=int, default=None, help="seed")
    parser.add_argument("--n", type=int, default=3, help="pairs per channel")
    parser.add_argument("--extra", nargs="*", default=[], help="more weights")
    text = _help_of(parser)
    assert "pairs per channel (default: 3)" in text
    assert "(default: discovery order)" in text and text.count("(default:") == 2
    assert "None" not in text and "[]" not in text


@pytest.mark.parametrize(
    "command", [["-m", "fmc.simulate"], ["-m", "fmc.simulate_heldout"], ["-m", "fmc.sample"]]
)
def test_module_commands_print_no_none_default(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, *command, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "usage:" in result.stdout
    assert "(default: None)" not in result.stdout


def test_train_py_subcommands_print_no_empty_default() -> None:
    from fmc.training.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"prepare", "fit", "export", "evaluate", "table"} <= set(commands)
    for name, parser in commands.items():
        text = _help_of(parser)
        assert "(default: None)" not in text and "(default: [])" not in text, name
        assert "(default: ())" not in text, name
