"""What a first run meets on the command line (issue 26): help that tells what the model card
decides, and every fault of the README's contract table as exactly one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fmc.weights import REPO_WEIGHTS

REPO = Path(__file__).resolve().parent.parent


def _help() -> str:
    return subprocess.run(
        [sys.executable, "inference.py", "--help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout


def test_help_says_the_card_decides_and_what_the_default_weights_do():
    text = " ".join(_help().split())
    assert "224^3" not in text and "then difference weighting)" not in text
    assert "come from the model card" in text
    record = json.loads((REPO_WEIGHTS / "any" / "step2.json").read_text())["training"]["pipeline"]
    expected = f"a {record['global_size']}^3 cube, difference_weighting {record['difference_weighting']}"
    assert expected in text
    assert "--no-step1 skip step 1, the global pass" in text
