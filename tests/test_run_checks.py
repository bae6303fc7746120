"""Issue 22, what a run checks before fusing and how it stops: output in the input (I), an
unlistable input folder (K), --report and preview targets (F, G), stop signals (J)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_INFERENCE_FLAGS, inference_args

from fmc import infer
from fmc.infer import main
from fmc.preflight import preview_paths
from fmc.simulated_tiff import write_volume

REPO = Path(__file__).resolve().parent.parent
CASE = "image_1_nucleus_angle.tif"
NOBODY = 65534


def _case(folder: Path, name: str = CASE, shape: tuple[int, int, int] = (12, 40, 40)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    volume = np.random.default_rng(0).integers(100, 4000, size=shape, dtype=np.uint16)
    write_volume(folder / name, volume, spacing=(1.0, 0.39, 0.39), channel="nucleus", study=3)
    return folder / name


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], caplog.text


# ------------------------------------------------------------------ I: --output in --input


def test_output_equal_to_input_is_refused_and_the_inputs_stay(tmp_path, tiny_weights, caplog):
    source = _case(tmp_path / "in")
    before = source.read_bytes()
    assert main(inference_args(tmp_path / "in", tmp_path / "in", tiny_weights)) == 1
    assert source.read_bytes() == before
    assert any("is the input folder" in line for line in _errors(caplog)), caplog.text
    _no_traceback(caplog)


def test_output_inside_input_is_refused_unless_the_flag_allows_it(tmp_path, tiny_weights, caplog):
    _case(tmp_path / "in")
    inside = tmp_path / "in" / "fused"
    assert main(inference_args(tmp_path / "in", inside, tiny_weights)) == 1
    assert any("is inside the input folder" in line for line in _errors(caplog))
    assert not (inside / CASE).exists()
    assert main(inference_args(tmp_path / "in", inside, tiny_weights, "--allow-output-in-input")) == 0
    assert (inside / CASE).is_file()


# ------------------------------------------------------------------ K: an input folder that cannot be listed


def test_an_unlistable_input_folder_is_one_line_and_exit_1(tmp_path, tiny_weights, caplog, monkeypatch):
    _case(tmp_path / "in")
    real_iterdir = Path.iterdir

    def refuse(self: Path):
        if self == tmp_path / "in":
            raise PermissionError(13, "Permission denied")
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", refuse)
    assert main(inference_args(tmp_path / "in", tmp_path / "out", tiny_weights)) == 1
    assert f"cannot list the input folder {tmp_path / 'in'}: Permission denied" in _errors(caplog)
    _no_traceback(caplog)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_an_input_folder_of_another_user_is_one_line_in_a_real_run(tiny_weights):
    base = Path(tempfile.mkdtemp(prefix="fmc-unlistable-"))
    try:
        base.chmod(0o755)
        _case(base / "in").chmod(0o644)
        (base / "in").chmod(0o700)  # root's: nobody cannot list it
        weights = base / "weights"
        shutil.copytree(tiny_weights, weights)
        for root, dirs, files in os.walk(base / "weights"):
            for name in dirs:
                Path(root, name).chmod(0o755)
            for name in files:
                Path(root, name).chmod(0o644)
        (base / "out").mkdir(mode=0o777)
        (base / "out").chmod(0o777)
        drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        args = inference_args(base / "in", base / "out", weights)
        process = _inference(args, prefix=drop)
        _, err = process.communicate(timeout=300)
        assert process.returncode == 1, err
        assert "cannot list the input folder" in err and "Traceback" not in err, err
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------ F: --report targets


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_report_target_that_is_no_regular_file_stops_before_fusing(tmp_path, tiny_weights, caplog, kind):
    _case(tmp_path / "in")
    report = tmp_path / "report"
    report.mkdir() if kind == "folder" else os.mkfifo(report)
    code = main(inference_args(tmp_path / "in", tmp_path / "out", tiny_weights, "--report", str(report)))
    assert code == 1
    assert not (tmp_path / "out" / CASE).exists(), "nothing is fused when the report cannot be written"
    lines = [line for line in _errors(caplog) if line.startswith(f"--report {report}: cannot write it")]
    assert len(lines) == 1, caplog.text
    assert report.is_dir() if kind == "folder" else report.is_fifo()
    _no_traceback(caplog)


def test_a_report_in_a_missing_folder_is_written_there(tmp_path, tiny_weights):
    _case(tmp_path / "in")
    report = tmp_path / "missing" / "parent" / "r.json"
    assert main(inference_args(tmp_path / "in", tmp_path / "out", tiny_weights, "--report", str(report))) == 0
    assert report.is_file()


def test_a_report_that_fails_at_the_end_names_the_report_not_the_temporary(
    tmp_path, tiny_weights, caplog, monkeypatch
):
    _case(tmp_path / "in")
    report = tmp_path / "r.json"

    def disk_full(path, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(infer, "atomic_write", disk_full)
    code = main(inference_args(tmp_path / "in", tmp_path / "out", tiny_weights, "--report", str(report)))
    assert code == 1
    assert f"--report {report}: cannot write it: No space left on device" in _errors(caplog)
    assert not [line for line in caplog.text.splitlines() if ".partial-" in line]
    _no_traceback(caplog)


# ------------------------------------------------------------------ G: preview targets


def test_a_folder_in_the_way_of_a_preview_keeps_the_tiff_and_fuses_once(tmp_path, tiny_weights, caplog):
    caplog.set_level(logging.INFO, logger="fmc")
    _case(tmp_path / "in")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "image_1_nucleus_angle_preview.png").mkdir()
    assert main(inference_args(tmp_path / "in", tmp_path / "out", tiny_weights, "--preview")) == 0
    assert (tmp_path / "out" / CASE).is_file()
    assert "retrying" not in caplog.text
    assert "a folder of that name is in the way: no preview" in caplog.text
    _no_traceback(caplog)


def test_a_preview_that_fails_at_its_write_never_fails_its_case(tmp_path, tiny_weights, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="fmc")
    _case(tmp_path / "in")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(infer, "_write_preview", disk_full)
    assert main(inference_args(tmp_path / "in", tmp_path / "out", tiny_weights, "--preview")) == 0
    assert (tmp_path / "out" / CASE).is_file()
    assert "cannot write the preview (No space left on device)" in caplog.text
    assert "retrying" not in caplog.text
    _no_traceback(caplog)


def test_previews_of_a_tif_and_a_tiff_do_not_collide(tmp_path, tiny_weights):
    for name in ("a.tif", "a.tiff"):
        _case(tmp_path / "in", name)
    assert main(inference_args(tmp_path / "in", tmp_path / "out", tiny_weights, "--preview")) == 0
    previews = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert previews == ["a_tif_preview.png", "a_tiff_preview.png"]
    alone = preview_paths([tmp_path / "a.tif", tmp_path / "b.tif"], tmp_path).values()
    assert [path.name for path in alone] == ["a_preview.png", "b_preview.png"]


# ------------------------------------------------------------------ J: stop signals


def _inference(args: list[str], prefix: list[str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": tempfile.gettempdir()}
    command = [*(prefix or []), sys.executable, str(REPO / "inference.py"), *args]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen(command, cwd=REPO, env=env, **pipes)


@pytest.mark.parametrize("delay_s", [0.3, 0.6, 1.0])
def test_sigint_during_the_imports_is_one_line_not_a_traceback(tmp_path, tiny_weights, delay_s):
    """Several moments of torch's import: one of them once aborted the process (exit -6)."""
    _case(tmp_path / "in")
    process = _inference(inference_args(tmp_path / "in", tmp_path / "out", tiny_weights))
    time.sleep(delay_s)  # still importing torch
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "stopped by SIGINT" in err, err


def _slow_write(tmp_path: Path, weights: Path) -> list[str]:
    folder = tmp_path / "in"
    folder.mkdir(parents=True, exist_ok=True)
    volume = np.random.default_rng(0).integers(100, 4000, size=(100, 400, 400), dtype=np.uint16)
    write_volume(folder / CASE, volume, spacing=(0.6, 0.6, 0.6), channel="nucleus", study=3)
    return [
        "--input", str(folder), "--output", str(tmp_path / "out"), "--weights", str(weights),
        *FAST_INFERENCE_FLAGS, "--no-step2", "--no-dw",
    ]  # fmt: skip


def test_two_sigterms_during_the_write_stop_once_without_a_traceback(tmp_path, tiny_weights):
    args = _slow_write(tmp_path, tiny_weights)
    for attempt in range(3):
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        process = _inference(args)
        end = time.monotonic() + 240
        while time.monotonic() < end and process.poll() is None:
            if any(".partial-" in name for name in os.listdir(out)):
                process.send_signal(signal.SIGTERM)
                time.sleep(0.0005 * (attempt + 1))
                process.send_signal(signal.SIGTERM)
                break
            time.sleep(0.0005)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 128 + signal.SIGTERM, err
        assert "Traceback" not in err and "Exception ignored" not in err, err
        assert err.count("stopped by SIGTERM") == 1, err
        assert not [name for name in os.listdir(out) if name.startswith(".")]


def test_a_sigterm_after_the_last_case_prints_nothing(tmp_path, tiny_weights):
    _case(tmp_path / "in")
    process = _inference(inference_args(tmp_path / "in", tmp_path / "out", tiny_weights))
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if " done: " in line:
            process.send_signal(signal.SIGTERM)
            break
    rest = process.stderr.read()
    process.wait(timeout=60)
    err = "".join(lines) + rest
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert process.returncode in (0, 128 + signal.SIGTERM), err
    assert (tmp_path / "out" / CASE).is_file()


# ------------------------------------------------------------------ smaller: a symlink loop


def test_a_symlink_loop_is_named_as_a_loop(tmp_path, tiny_weights, caplog):
    _case(tmp_path / "in")
    (tmp_path / "in" / "loop.tif").symlink_to(tmp_path / "in" / "loop2.tif")
    (tmp_path / "in" / "loop2.tif").symlink_to(tmp_path / "in" / "loop.tif")
    assert main(inference_args(tmp_path / "in", tmp_path / "out", tiny_weights)) == 1
    lines = [line for line in _errors(caplog) if line.startswith("loop.tif: ")]
    assert lines and "symbolic link loop" in lines[0] and "does not exist" not in lines[0], caplog.text
    assert (tmp_path / "out" / CASE).is_file()
