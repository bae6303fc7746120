"""Issue 22, B and H: a spacing that explodes or collapses the 0.6 um grid, checked from shapes
before anything big is allocated."""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import inference_args

from fmc import memory_plan
from fmc.infer import main
from fmc.memory_plan import MIN_GRID_AXIS, fusion_spacing, plan_memory
from fmc.simulated_tiff import write_volume

REPO = Path(__file__).resolve().parent.parent
CASE = "image_1_nucleus_angle.tif"


def _case(folder: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    volume = np.random.default_rng(0).integers(100, 4000, size=shape, dtype=np.uint16)
    write_volume(folder / CASE, volume, spacing=spacing, channel="nucleus", study=3)
    return folder / CASE


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# ------------------------------------------------------------------ B: a grid out of proportion


@pytest.mark.parametrize(("shape", "spacing"), [((4, 4, 4), (999.0,) * 3), ((8, 8, 8), (30.0,) * 3)])
def test_a_huge_spacing_is_refused_before_allocating(tmp_path, tiny_weights, caplog, shape, spacing):
    _case(tmp_path / "in", shape, spacing)
    assert main(inference_args(tmp_path / "in", tmp_path / "out", tiny_weights)) == 1
    errors = _errors(caplog)
    named = [line for line in errors if f"spacing {spacing[0]:g}x" in line]
    assert any("grid at the method's 0.6 um" in line for line in named), caplog.text
    assert "retrying" not in caplog.text and not [r for r in caplog.records if r.exc_info]
    assert not (tmp_path / "out" / CASE).exists()


def test_a_huge_spacing_stays_small_under_a_memory_limit(tmp_path, tiny_weights):
    """The trial's case: 4x4x4 voxels at 999 um under `ulimit -v 8000000` (8 GB)."""
    _case(tmp_path / "in", (4, 4, 4), (999.0,) * 3)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (8_000_000 * 1024, resource.RLIM_INFINITY))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": tempfile.gettempdir()}
    args = inference_args(tmp_path / "in", tmp_path / "out", tiny_weights)
    done = subprocess.run(
        [sys.executable, str(REPO / "inference.py"), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "retrying" not in done.stderr, done.stderr
    assert "implies a 6660x6660x6660 grid" in done.stderr, done.stderr


def test_a_plan_larger_than_the_memory_left_is_refused(tmp_path, tiny_weights, caplog, monkeypatch):
    _case(tmp_path / "in", (12, 40, 40), (1.0, 0.39, 0.39))
    monkeypatch.setattr(memory_plan, "host_bytes_available", lambda: 1 << 16)
    assert main(inference_args(tmp_path / "in", tmp_path / "out", tiny_weights)) == 1
    assert any("GiB is available: refused before allocating" in line for line in _errors(caplog)), caplog.text


def test_a_huge_global_size_flag_is_refused_by_the_plan(tmp_path, tiny_weights, caplog):
    _case(tmp_path / "in", (12, 40, 40), (1.0, 0.39, 0.39))
    args = inference_args(tmp_path / "in", tmp_path / "out", tiny_weights, "--global-size", "8192")
    assert main(args) == 1
    assert any("refused before allocating" in line for line in _errors(caplog)), caplog.text


def test_the_plan_counts_the_big_buffers():
    sizes = {"global_size": 64, "patch": (48,) * 3, "batch": 2, "width": 16, "dw": False}
    plan = plan_memory((100, 400, 400), True, (1.2, 0.6, 0.6), 0.6, **sizes)
    assert plan.grid == (200, 400, 400)
    voxels = 200 * 400 * 400
    assert 8 * voxels <= plan.device_bytes <= 16 * voxels  # the 0.6 um volume and the output, float32
    assert plan.host_bytes == 0  # uint16 takes the output in place


# ------------------------------------------------------------------ H: a grid too small to fuse on


def test_a_tiny_spacing_is_fused_at_native_resolution_with_a_warning(tmp_path, tiny_weights, caplog):
    _case(tmp_path / "in", (16, 64, 64), (0.001, 0.001, 0.001))
    assert main(inference_args(tmp_path / "in", tmp_path / "out", tiny_weights)) == 0
    assert "fused at its native resolution" in caplog.text
    out = tifffile.imread(tmp_path / "out" / CASE)
    assert out.shape == (16, 64, 64)
    assert len(np.unique(out)) > 100, "not one constant value"
    assert len({out[z].tobytes() for z in range(out.shape[0])}) == out.shape[0], "planes differ"


def test_only_a_grid_below_the_minimum_falls_back():
    assert fusion_spacing("x", (16, 64, 64), (2.0, 0.4, 0.4), 0.6) == (2.0, 0.4, 0.4)
    assert fusion_spacing("x", (16, 64, 64), (0.0011, 0.4, 0.4), 0.6) == (0.6, 0.6, 0.6)
    assert fusion_spacing("x", (3, 64, 64), (0.6, 0.4, 0.4), 0.6) == (0.6, 0.4, 0.4)  # 3 planes stay 3
    assert MIN_GRID_AXIS >= 3
