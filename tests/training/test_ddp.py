"""Two CPU processes with DDP (gloo), as Lightning launches them for `--devices 2`, for a few steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from .conftest import tiny_fit_args

REPO = Path(__file__).resolve().parents[2]


def test_two_process_ddp_fit_on_cpu(sim_cache: Path, split_csv: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    args = tiny_fit_args(run, sim_cache, "--split-csv", str(split_csv), "--devices", "2")
    result = subprocess.run(
        [sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "MEMBER: 2/2" in result.stderr  # Lightning started the second rank
    for stage in (1, 2):
        checkpoint = torch.load(run / f"step{stage}/checkpoints/last.ckpt", weights_only=True)
        assert checkpoint["global_step"] == 2
        throughput = json.loads((run / f"step{stage}" / "throughput.json").read_text())
        assert throughput["world_size"] == 2
    summary = json.loads((run / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == [1, 2]
