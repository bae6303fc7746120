"""What a first run meets on the command line (issue 26): help that tells what the model card
decides, and every fault of the contract table (docs/inference.md) as exactly one line."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import inference_args

from fmc.infer import main
from fmc.simulated_tiff import write_volume
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


# ------------------------------------------------------------------ every fault is one line

CASE = "image_1_nucleus_angle.tif"


def _volume(shape: tuple[int, ...] = (12, 40, 40), dtype: type = np.uint16) -> np.ndarray:
    return np.random.default_rng(0).integers(100, 4000, size=shape).astype(dtype)


def _good(folder: Path, name: str = CASE, volume: np.ndarray | None = None, **metadata) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"spacing": (1.0, 0.39, 0.39), "channel": "nucleus", "study": 3, **metadata}
    write_volume(folder / name, _volume() if volume is None else volume, **metadata)


def _plain(folder: Path, name: str, volume: np.ndarray) -> None:
    """A TIFF without any spacing metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / name, volume, photometric="minisblack")


def _truncated(folder: Path) -> None:
    _good(folder, "truncated.tif", _volume((8, 64, 64)))
    data = (folder / "truncated.tif").read_bytes()
    (folder / "truncated.tif").write_bytes(data[: len(data) // 3])


def _nan(folder: Path) -> None:
    volume = _volume(dtype=np.float32)
    volume[0, 0, :5] = np.nan
    _good(folder, "has_nan.tif", volume)


def _symlink(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "dangling.tif").symlink_to(folder / "gone.tif")


def _negatives(folder: Path) -> None:
    _good(folder, "signed.tif", (_volume() - 1500).astype(np.int16))


def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(path, *args, **kwargs) -> None:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(tifffile, "imwrite", disk_full)


# fault -> (how to make the input folder, words of its line (one line per phrase), exit code):
# the rows of the contract table in docs/inference.md.
INPUT_FAULTS = {
    "not a TIFF": (lambda d: (d.mkdir(), (d / "x.tif").write_bytes(b"no tiff" * 20)), "not a TIFF", 1),
    "truncated": (_truncated, "truncated", 1),
    "2-D": (lambda d: _plain(d, "flat.tif", _volume((40, 40))), "2-D", 1),
    "4-D": (lambda d: _plain(d, "four_d.tif", np.zeros((2, 4, 8, 8), np.uint16)), "4-D", 1),
    "complex": (lambda d: _plain(d, "complex.tif", np.zeros((4, 8, 8), np.complex64)), "complex", 1),
    "bool": (lambda d: _plain(d, "bool.tif", np.zeros((4, 8, 8), bool)), "bool", 1),
    "dangling symlink": (_symlink, "broken symbolic link", 1),
    "folder named *.tif": (lambda d: (d / "x.tif").mkdir(parents=True), "is a folder, not a TIFF file", 1),
    "NaN voxels": (_nan, ("float32 data", "NaN/Inf voxel(s)"), 0),  # NaN needs float: two faults
    "float data": (lambda d: _good(d, volume=_volume(dtype=np.float32)), "float32 data", 0),
    "8-bit data": (lambda d: _good(d, volume=_volume(dtype=np.uint8)), "8-bit data", 0),
    "constant image": (lambda d: _good(d, volume=np.full((12, 20, 20), 7, np.uint16)), "constant", 0),
    "*_fused* input": (lambda d: _good(d, "image_1_nucleus_fused.tif"), "_fused", 0),
    "zero spacing": (lambda d: _good(d, spacing=(0.0, 0.39, 0.39)), "PhysicalSizeZ=0", 0),
    "no spacing": (lambda d: _plain(d, CASE, _volume()), "spacing", 0),
    "values outside uint16": (_negatives, "would be clipped", 0),
}


def _fault_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What a user reads as faults: every warning or error line (a multi-line message counts each)."""
    lines = []
    for record in caplog.records:
        if record.levelno >= logging.WARNING:
            assert not record.exc_info, f"a traceback: {record.getMessage()}"
            lines.extend(record.getMessage().splitlines())
    return lines


@pytest.mark.parametrize("fault", INPUT_FAULTS)
def test_each_input_fault_of_the_contract_table_is_one_line(fault, tmp_path, tiny_weights, caplog):
    make, words, code = INPUT_FAULTS[fault]
    make(tmp_path / "in")
    assert main(inference_args(tmp_path / "in", tmp_path / "out", tiny_weights)) == code
    phrases = (words,) if isinstance(words, str) else words
    lines = _fault_lines(caplog)
    assert len(lines) == len(phrases), lines
    assert all(phrase in line for phrase, line in zip(phrases, lines, strict=True)), lines


OUTPUT_FAULTS = {
    "--output is a file": (lambda out, mp: out.write_text("a file"), "it exists and is not a folder"),
    "a folder in the output's way": (lambda out, mp: (out / CASE).mkdir(parents=True), "in the way"),
    "disk full": (lambda out, mp: _disk_full(mp), "No space left on device"),
}


@pytest.mark.parametrize("fault", OUTPUT_FAULTS)
def test_each_output_fault_of_the_contract_table_is_one_line(
    fault, tmp_path, tiny_weights, monkeypatch, caplog
):
    make, words = OUTPUT_FAULTS[fault]
    _good(tmp_path / "in")
    _good(tmp_path / "in", "image_2_nucleus_angle.tif")  # a fault of the folder is still told once
    make(tmp_path / "out", monkeypatch)
    assert main(inference_args(tmp_path / "in", tmp_path / "out", tiny_weights)) == 1
    lines = _fault_lines(caplog)
    if fault == "disk full":  # a fault of each output: one line per case, each naming it
        names = [CASE, "image_2_nucleus_angle.tif"]
        assert len(lines) == 2 and all(words in line for line in lines), lines
        assert [name for name in names if any(name in line for line in lines)] == names, lines
    else:
        assert len(lines) == 1 and words in lines[0], lines


RUN_FAULTS = {
    "missing --input": (lambda t: ["--input", str(t / "nowhere")], "--input {t}/nowhere: no such folder"),
    "--input is a file": (
        lambda t: ["--input", str(t / "in" / CASE)],
        "--input {t}/in/" + CASE + ": not a folder",
    ),
    "empty --input": (
        lambda t: ["--input", str((t / "empty").mkdir() or t / "empty")],
        "no .tif/.tiff files",
    ),
    "missing --weights": (
        lambda t: ["--weights", str(t / "no_model")],
        "--weights {t}/no_model: no such folder",
    ),
    "--weights without a model": (
        lambda t: ["--weights", str((t / "bare").mkdir() or t / "bare")],
        "no usable model there",
    ),
}


@pytest.mark.parametrize("fault", RUN_FAULTS)
def test_each_fault_of_the_command_line_is_one_line(fault, tmp_path, tiny_weights, caplog):
    extra, words = RUN_FAULTS[fault]
    _good(tmp_path / "in")
    _good(tmp_path / "in", "image_2_nucleus_angle.tif")
    args = inference_args(tmp_path / "in", tmp_path / "out", tiny_weights, *extra(tmp_path))
    assert main(args) == 1
    lines = _fault_lines(caplog)
    assert len(lines) == 1 and words.format(t=tmp_path) in lines[0], lines


@pytest.mark.parametrize(
    ("flags", "words", "code"),
    [
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'", 2),
        (["--overlap", "x"], "argument --overlap: invalid float value: 'x'", 2),
        (["--bogus"], "unrecognized arguments: --bogus", 2),
        (["--overlap", "1.5"], "--overlap must be in [0, 1), got 1.5", 1),
        (["--max-filter", "4"], "--max-filter must be odd and >= 1, got 4", 1),
        (["--patch", "4"], "--patch must be >= 8, got 4", 1),
        (["--global-size", "4"], "--global-size must be >= 8, got 4", 1),
        (["--batch", "0"], "--batch must be >= 1, got 0", 1),
        (["--change-strength", "2"], "--change-strength must be a number in [0, 1], got 2.0", 1),
        (["--detail-sigma", "-1"], "--detail-sigma must be a number in [0, 3], got -1.0", 1),
    ],
)
def test_a_bad_flag_is_one_line(flags, words, code, tmp_path, tiny_weights, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(inference_args(tmp_path / "in", tmp_path / "out", tiny_weights, *flags))
    status = stopped.value.code  # SystemExit("text"): Python prints the text, exit status 1
    shown = capsys.readouterr().err if isinstance(status, int) else str(status)
    assert (status if isinstance(status, int) else 1) == code
    assert shown.strip().count("\n") == 0 and words in shown, shown


def _stderr(*args: str) -> tuple[int, list[str]]:
    proc = subprocess.run(
        [sys.executable, "inference.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    return proc.returncode, proc.stderr.splitlines()


def test_a_missing_input_folder_is_one_line_that_says_so(tmp_path):
    code, lines = _stderr("--input", "/nonexistent", "--output", str(tmp_path / "O"))
    assert code == 1
    assert len(lines) == 1 and lines[0].endswith("ERROR fmc: --input /nonexistent: no such folder"), lines


def test_an_output_that_is_a_file_is_named_once(tmp_path, tiny_weights):
    _good(tmp_path / "in")
    (tmp_path / "O").write_text("a file")
    code, lines = _stderr(*inference_args(tmp_path / "in", tmp_path / "O", tiny_weights))
    assert code == 1
    assert sum(str(tmp_path / "O") in line for line in lines) == 1, lines
    assert [line for line in lines if " WARNING " in line or " ERROR " in line] == [
        line for line in lines if "cannot write" in line
    ], lines
