"""inference.py under hostile conditions (issue 13): odd intensities, odd spacing, outputs that
cannot be written, inputs that are not files, signals during the write, unusable --weights.

Permission tests run the real ``inference.py`` as an unprivileged user (uid 65534 via
``setpriv`` when the suite runs as root), because root bypasses the permissions under test.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import FAST_INFERENCE_FLAGS, inference_args

from fmc.infer import build_parser, explicit_weights_problem, main
from fmc.io import fit_uint16_range, read_case
from fmc.pipeline import FusionPipeline
from fmc.projections import mip_projections, preview_image
from fmc.simulated_tiff import write_volume

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534


def _run(input_dir: Path, output_dir: Path, weights: Path, *extra: str) -> int:
    return main(inference_args(input_dir, output_dir, weights, *extra))


def _case(folder: Path, name: str = "image_1_nucleus_angle.tif", shape=(12, 40, 40), **kwargs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    volume = kwargs.pop("volume", None)
    if volume is None:
        volume = np.random.default_rng(0).integers(100, 4000, size=shape, dtype=np.uint16)
    kwargs.setdefault("spacing", (1.0, 0.39, 0.39))
    kwargs.setdefault("channel", "nucleus")
    kwargs.setdefault("study", 3)
    write_volume(folder / name, volume, **kwargs)
    return folder / name


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _tracebacks(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info]


# ------------------------------------------------------------------ running as another user


def _unprivileged() -> list[str]:
    """The command prefix that drops root, or [] when not root (permissions apply already)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("the suite runs as root and setpriv is missing: root would bypass the permission tested")
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder every user can enter (pytest's own tmp_path is 0700 under root)."""
    path = Path(tempfile.mkdtemp(prefix="fmc-faults-"))
    path.chmod(0o755)
    yield path
    for root, dirs, _ in os.walk(path):  # read-only folders made by a test must not block the cleanup
        for name in dirs:
            Path(root, name).chmod(0o755)
    shutil.rmtree(path, ignore_errors=True)


def _readable_copy(weights: Path, where: Path) -> Path:
    copy = where / "weights"
    shutil.copytree(weights, copy)
    copy.chmod(0o755)
    for root, dirs, files in os.walk(copy):
        for name in dirs:
            Path(root, name).chmod(0o755)
        for name in files:
            Path(root, name).chmod(0o644)
    return copy


def _inference(args: list[str], prefix: list[str] | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": tempfile.gettempdir()}
    command = [*(prefix or []), sys.executable, str(REPO / "inference.py"), *args]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def _finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


# ------------------------------------------------------------------ 1. signed and wide integers


@pytest.fixture
def identity_model(monkeypatch) -> None:
    """The networks return their input, so the output shows what the uint16 mapping keeps."""
    monkeypatch.setattr(FusionPipeline, "predict_isotropic", lambda self, iso, timings, budget=None: iso)


def _score_input(tmp_path: Path, volume: np.ndarray) -> Path:
    # spacing 0.6 isotropic: no resampling, so the output's values come straight from the mapping
    return _case(tmp_path / "in", volume=volume, spacing=(0.6, 0.6, 0.6))


def test_int16_with_negatives_keeps_its_range_instead_of_zeros(
    tmp_path, tiny_weights, identity_model, caplog
):
    rng = np.random.default_rng(1)
    volume = rng.integers(-1500, 1800, size=(16, 40, 40)).astype(np.int16)  # ~45% negative
    _score_input(tmp_path, volume)
    assert _run(tmp_path / "in", tmp_path / "out", tiny_weights) == 0
    out = tmp_path / "out" / "image_1_nucleus_angle.tif"
    fused = tifffile.imread(out)
    assert fused.dtype == np.uint16
    assert np.mean(fused == 0) < 0.01, f"{np.mean(fused == 0):.0%} of the output is 0 (clipped negatives)"
    shifted = volume.astype(np.int64) - volume.min()
    assert np.abs(fused.astype(np.int64) - shifted).max() <= 1  # output = input + offset
    with tifffile.TiffFile(out) as tif:
        meta = tif.shaped_metadata[0]
    assert meta["fmc_intensity_low"] == volume.min() and meta["fmc_intensity_scale"] == 1.0
    warning = next(m for m in (r.getMessage() for r in caplog.records) if "would be clipped" in m)
    negative = 100 * np.mean(volume < 0)
    assert f"int16 data with {negative:.1f}% of voxels below 0" in warning
    assert f"shifted by {-int(volume.min()):+d}" in warning


def test_int32_above_65535_is_scaled_not_clipped(tmp_path, tiny_weights, identity_model, caplog):
    volume = np.random.default_rng(2).integers(0, 200_000, size=(16, 40, 40)).astype(np.int32)
    _score_input(tmp_path, volume)
    assert _run(tmp_path / "in", tmp_path / "out", tiny_weights) == 0
    fused = tifffile.imread(tmp_path / "out" / "image_1_nucleus_angle.tif")
    assert np.mean(fused == 65535) < 0.01, f"{np.mean(fused == 65535):.0%} of the output is clipped at 65535"
    assert np.corrcoef(fused.ravel(), volume.ravel())[0, 1] > 0.999
    messages = [r.getMessage() for r in caplog.records]
    above = 100 * np.mean(volume > 65535)
    assert any(f"int32 data with {above:.1f}% above 65535" in m for m in messages), messages


def test_the_map_is_exact_for_integers_and_left_out_where_data_fits(tmp_path, caplog):
    int8 = np.random.default_rng(3).integers(-100, 100, size=(4, 8, 8)).astype(np.int8)
    case = read_case(_case(tmp_path, "a.tif", volume=int8))
    mapping = fit_uint16_range(case)
    assert mapping is not None and mapping.low == int8.min() and mapping.scale == 1.0
    assert case.volume.dtype == np.uint16
    np.testing.assert_array_equal(case.volume.astype(np.int64), int8.astype(np.int64) - int8.min())
    floats = np.linspace(-0.2, 1.0, 12 * 40 * 40, dtype=np.float32).reshape(12, 40, 40)
    case = read_case(_case(tmp_path, "f.tif", volume=floats))
    mapping = fit_uint16_range(case)
    assert mapping is not None and mapping.scale == pytest.approx(65535 / 1.2)  # not 2 levels after rounding
    assert case.volume.min() == 0 and case.volume.max() == 65535
    fits = read_case(_case(tmp_path, "b.tif", volume=np.arange(256, dtype=np.int16).reshape(4, 8, 8)))
    assert fit_uint16_range(fits) is None and fits.volume.dtype == np.int16


# ------------------------------------------------------------------ 2. invalid Z-only spacing


@pytest.mark.parametrize(("z", "shown"), [(0, "0"), (-2, "-2"), (1e6, "1000000.0")])
def test_an_invalid_z_spacing_is_named_and_never_replaced_by_a_guess(
    tmp_path, tiny_weights, caplog, z, shown
):
    path = tmp_path / "in" / "image_1_nucleus_angle.tif"
    path.parent.mkdir()
    metadata = {"PhysicalSizeX": 0.39, "PhysicalSizeY": 0.39, "PhysicalSizeZ": z, "unit": "um"}
    tifffile.imwrite(
        path, np.random.default_rng(0).integers(100, 4000, (12, 40, 40), dtype=np.uint16), metadata=metadata
    )
    case = read_case(path)
    assert not case.meta.spacing_valid and case.meta.spacing == (0.6, 0.6, 0.6)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        f"PhysicalSizeZ={shown} is not a valid spacing" in m and "no resampling" in m for m in messages
    )
    assert not any("assumed" in m for m in messages), messages

    assert _run(tmp_path / "in", tmp_path / "out", tiny_weights) == 0
    with tifffile.TiffFile(tmp_path / "out" / path.name) as tif:
        written = tif.shaped_metadata[0]
        assert "XResolution" not in tif.pages.first.tags or tif.pages.first.tags["XResolution"].value == (
            1,
            1,
        )
    assert written["PhysicalSizeZ"] == z  # the input's own value, not an invented 0.39
    assert (written["PhysicalSizeX"], written["PhysicalSizeY"]) == (0.39, 0.39)


def test_a_missing_z_is_not_written_back_as_if_it_were_measured(tmp_path, tiny_weights):
    path = tmp_path / "in" / "image_1_nucleus_angle.tif"
    path.parent.mkdir()
    volume = np.random.default_rng(0).integers(100, 4000, (12, 40, 40), dtype=np.uint16)
    tifffile.imwrite(path, volume, metadata={"PhysicalSizeX": 0.39, "PhysicalSizeY": 0.39, "unit": "um"})
    assert read_case(path).meta.sources["spacing_z"].startswith("assumed")
    assert _run(tmp_path / "in", tmp_path / "out", tiny_weights) == 0
    with tifffile.TiffFile(tmp_path / "out" / path.name) as tif:
        written = tif.shaped_metadata[0]
    assert "PhysicalSizeZ" not in written and written["PhysicalSizeX"] == 0.39


# ------------------------------------------------------------------ 3. an output that cannot be written


def test_a_read_only_output_folder_stops_before_fusing_with_one_line(shared_dir, tiny_weights):
    prefix = _unprivileged()
    _case(shared_dir / "in")
    for folder in (shared_dir / "in", shared_dir / "in" / "image_1_nucleus_angle.tif"):
        folder.chmod(0o755 if folder.is_dir() else 0o644)
    out = shared_dir / "out"
    out.mkdir(mode=0o555)
    out.chmod(0o555)
    weights = _readable_copy(tiny_weights, shared_dir)
    args = inference_args(shared_dir / "in", out, weights)
    code, err = _finish(_inference(args, prefix))
    assert code == 1, err
    assert f"cannot write {out}: the folder is not writable (Permission denied)" in err, err
    assert "Traceback" not in err and "partial" not in err, err
    assert "step1=" not in err and "retrying" not in err, err  # nothing was fused, nothing retried
    assert os.listdir(out) == []


def test_a_folder_in_the_way_of_one_output_fails_that_case_only_without_retries(
    tmp_path, tiny_weights, caplog
):
    _case(tmp_path / "in", "image_1_nucleus_angle.tif")
    _case(tmp_path / "in", "image_2_nucleus_angle.tif")
    (tmp_path / "out" / "image_1_nucleus_angle.tif").mkdir(parents=True)
    assert _run(tmp_path / "in", tmp_path / "out", tiny_weights) == 1
    target = tmp_path / "out" / "image_1_nucleus_angle.tif"
    assert f"cannot write {target}: a folder of that name is in the way" in _errors(caplog)
    assert not _tracebacks(caplog) and not any("retrying" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "out" / "image_2_nucleus_angle.tif").is_file()
    assert sorted(os.listdir(tmp_path / "out")) == ["image_1_nucleus_angle.tif", "image_2_nucleus_angle.tif"]


def test_a_write_error_is_not_retried_and_names_the_output_not_the_temporary(
    tmp_path, tiny_weights, monkeypatch, caplog
):
    _case(tmp_path / "in")

    def disk_full(path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(tifffile, "imwrite", disk_full)
    assert _run(tmp_path / "in", tmp_path / "out", tiny_weights) == 1
    target = tmp_path / "out" / "image_1_nucleus_angle.tif"
    assert f"cannot write {target}: No space left on device" in _errors(caplog)
    assert not any("partial" in m for m in _errors(caplog))
    assert not _tracebacks(caplog) and not any("retrying" in r.getMessage() for r in caplog.records)
    assert os.listdir(tmp_path / "out") == []


# ------------------------------------------------------------------ 4. an output folder that cannot be made


def test_an_output_path_that_is_a_file_gives_one_line_and_exit_1(tmp_path, tiny_weights, caplog):
    _case(tmp_path / "in")
    (tmp_path / "out").write_text("not a folder")
    assert _run(tmp_path / "in", tmp_path / "out", tiny_weights) == 1
    assert f"cannot write {tmp_path / 'out'}: it exists and is not a folder" in _errors(caplog)


def test_an_output_folder_under_a_read_only_parent_gives_one_line(shared_dir, tiny_weights):
    prefix = _unprivileged()
    _case(shared_dir / "in")
    (shared_dir / "in").chmod(0o755)
    (shared_dir / "in" / "image_1_nucleus_angle.tif").chmod(0o644)
    parent = shared_dir / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    out = parent / "out"
    weights = _readable_copy(tiny_weights, shared_dir)
    args = inference_args(shared_dir / "in", out, weights)
    code, err = _finish(_inference(args, prefix))
    assert code == 1, err
    assert f"cannot write {out}: cannot create the folder (Permission denied)" in err, err
    assert "Traceback" not in err, err


# ------------------------------------------------------------------ 5. TIFF names that are not files


def test_a_dangling_symlink_and_a_folder_named_tif_are_errors(tmp_path, tiny_weights, caplog):
    _case(tmp_path / "in")
    (tmp_path / "in" / "gone.tif").symlink_to(tmp_path / "nowhere.tif")
    (tmp_path / "in" / "folder.tif").mkdir()
    assert _run(tmp_path / "in", tmp_path / "out", tiny_weights) == 1
    errors = _errors(caplog)
    assert f"gone.tif: broken symbolic link (its target {tmp_path / 'nowhere.tif'} does not exist)" in errors
    assert "folder.tif: is a folder, not a TIFF file" in errors
    assert (tmp_path / "out" / "image_1_nucleus_angle.tif").is_file()


# ------------------------------------------------------------------ 6. signals during the write


def _big_case(folder: Path) -> None:
    # big enough that the write takes a while (spacing 0.6: no resampling; step 1 only, no DW: fast)
    volume = np.random.default_rng(0).integers(100, 4000, size=(96, 768, 768), dtype=np.uint16)
    _case(folder, volume=volume, spacing=(0.6, 0.6, 0.6))


def _kill_while_writing(out: Path, process: subprocess.Popen, sig: int, timeout: float = 240) -> None:
    """Send ``sig`` as soon as the hidden temporary appears in ``out``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and process.poll() is None:
        try:
            if any(".partial-" in name for name in os.listdir(out)):
                process.send_signal(sig)
                return
        except FileNotFoundError:
            pass
        time.sleep(0.0005)
    process.kill()
    pytest.fail("inference.py never reached the write (or finished before it was seen)")


def _slow_write_args(tmp_path: Path, weights: Path) -> list[str]:
    return [
        "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--weights", str(weights),
        *FAST_INFERENCE_FLAGS, "--no-step2", "--no-dw",
    ]  # fmt: skip


def test_sigterm_while_writing_removes_the_temporary_and_exits_nonzero(tmp_path, tiny_weights):
    _big_case(tmp_path / "in")
    (tmp_path / "out").mkdir()
    process = _inference(_slow_write_args(tmp_path, tiny_weights))
    _kill_while_writing(tmp_path / "out", process, signal.SIGTERM)
    code, err = _finish(process)
    assert code == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err, err
    left = os.listdir(tmp_path / "out")
    assert not [name for name in left if name.startswith(".")], left


def test_a_temporary_left_by_sigkill_is_removed_by_the_next_run(tmp_path, tiny_weights, caplog):
    _big_case(tmp_path / "in")
    (tmp_path / "out").mkdir()
    process = _inference(_slow_write_args(tmp_path, tiny_weights))
    _kill_while_writing(tmp_path / "out", process, signal.SIGKILL)
    process.wait(timeout=60)
    stale = [name for name in os.listdir(tmp_path / "out") if ".partial-" in name]
    assert stale, "SIGKILL during the write should leave the temporary this test is about"
    (tmp_path / "in" / "image_1_nucleus_angle.tif").unlink()
    _case(tmp_path / "in")  # a small case: the rerun is quick
    assert _run(tmp_path / "in", tmp_path / "out", tiny_weights) == 0
    assert os.listdir(tmp_path / "out") == ["image_1_nucleus_angle.tif"]
    assert any(stale[0] in r.getMessage() and "is gone" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ 7. an explicit --weights without a model


@pytest.mark.parametrize(
    ("files", "found"),
    [
        ((), "found: nothing, the folder is empty"),
        (("model.pt",), "found: model.pt"),
        (("any/",), "found: any/"),
    ],
)
def test_an_explicit_weights_folder_without_a_model_is_an_error(tmp_path, caplog, files, found):
    _case(tmp_path / "in")
    weights = tmp_path / "w"
    weights.mkdir()
    for name in files:
        (weights / name).mkdir() if name.endswith("/") else (weights / name).write_bytes(b"x")
    assert _run(tmp_path / "in", tmp_path / "out", weights) == 1
    assert any(f"--weights {weights}: no usable model there ({found})" in m for m in _errors(caplog))
    assert not (tmp_path / "out" / "image_1_nucleus_angle.tif").exists()


def test_an_explicit_weights_folder_without_the_cases_channel_does_not_fall_back(
    tmp_path, tiny_weights, caplog
):
    _case(tmp_path / "in", "image_1_membrane_angle.tif", channel="membrane")
    weights = tmp_path / "w"
    shutil.copytree(tiny_weights / "any", weights / "nucleus")
    assert explicit_weights_problem(weights) is None
    assert _run(tmp_path / "in", tmp_path / "out", weights) == 1
    assert any(f"--weights {weights}: no model for channel 'membrane'" in m for m in _errors(caplog))


# ------------------------------------------------------------------ 13. smaller things


def test_help_shows_each_default_once():
    text = build_parser().format_help()
    assert "(default: None)" not in text
    assert "else 128)" in text and "else 128) (default" not in text


def test_fused_files_among_the_inputs_are_named(tmp_path, tiny_weights, caplog):
    _case(tmp_path / "in", "image_1_nucleus_angle.tif")
    _case(tmp_path / "in", "image_1_nucleus_fused.tif")
    assert _run(tmp_path / "in", tmp_path / "out", tiny_weights) == 0
    assert any("image_1_nucleus_fused.tif" in r.getMessage() and "ground truth" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)  # fmt: skip


def test_the_preview_has_labels_and_an_xz_view(tmp_path, tiny_weights):
    volume = np.zeros((10, 30, 40), dtype=np.uint16)
    volume[5, 15, 20] = 1000
    image = preview_image(mip_projections(volume), volume, spacing=(2.0, 0.5, 0.5))
    label = 14
    xy_height, xz_height = 30 + label, 10 * 4 + label  # z stretched to the physical aspect (2.0 / 0.5)
    assert image.shape == (xy_height + 4 + xz_height, 2 * 40 + 4)
    assert image[:label, :40].max() > 200 and image[:label, 44:].max() > 200  # "input" / "fused" text
    assert image[xy_height + 4 : xy_height + 4 + label].max() > 200  # the XZ row is labelled too
    xz = image[xy_height + 4 + label :, :40]
    assert xz[:, 20].max() == 255 and 16 <= int(np.argmax(xz[:, 20])) <= 24  # the spot, at z 5 of 10

    _case(tmp_path / "in")
    assert _run(tmp_path / "in", tmp_path / "out", tiny_weights, "--preview") == 0
    png = tmp_path / "out" / "image_1_nucleus_angle_preview.png"
    from PIL import Image

    with Image.open(png) as opened:
        assert opened.size[0] == 2 * 40 + 4 and opened.size[1] > 40 + 12 + 2 * label


def test_outputs_stay_readable_by_others(tmp_path, tiny_weights):
    """The platform reads the outputs as another user: no 0600 files."""
    _case(tmp_path / "in")
    assert _run(tmp_path / "in", tmp_path / "out", tiny_weights, "--preview") == 0
    for path in (tmp_path / "out").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path
