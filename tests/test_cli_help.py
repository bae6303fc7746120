"""fmc.cli_help: a default is shown once, and never as "None" or after a required flag; parsed
flags become the dataclass they configure, field by field of the same name."""

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from fmc.cli_help import DefaultsHelpFormatter, from_flags

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


@dataclasses.dataclass(frozen=True)
class _Knobs:
    size: int = 1
    name: str = "a"
    kept: float = 0.5
    derived: tuple[int, ...] = dataclasses.field(default=(), init=False)


def test_from_flags_takes_same_named_flags_and_keeps_defaults_for_the_rest() -> None:
    args = argparse.Namespace(size=7, name="b", unrelated="x", derived=(9,))
    assert from_flags(_Knobs, args) == _Knobs(size=7, name="b", kept=0.5)


def test_from_flags_given_values_win_over_the_flags() -> None:
    args = argparse.Namespace(size=7, name="b", kept=0.1)
    assert from_flags(_Knobs, args, size=3) == _Knobs(size=3, name="b", kept=0.1)
