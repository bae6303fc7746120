"""inference.py end to end on CPU with tiny random weights: plumbing, bad inputs, determinism.

These test the platform contract only, never quality.
"""

import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import FAST_INFERENCE_FLAGS, inference_args

from benchmarks.cuda_agreement import TOLERANCES, differences
from fmc import infer
from fmc.acceleration import KernelOptions
from fmc.infer import build_parser, main, options_from_args
from fmc.io import read_case
from fmc.pipeline import FusionPipeline
from fmc.safeguards import SAFE_KERNELS
from fmc.simulated_tiff import write_volume

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def weights(tiny_weights: Path) -> Path:
    return tiny_weights


def _good_volume(shape=(12, 40, 40), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(100, 4000, size=shape, dtype=np.uint16)


def _write_good_cases(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (style, channel) in enumerate([("shaped", "nucleus"), ("imagej", "membrane"), ("ome", "nucleus")]):
        name = f"image_{i}_{channel}_angle.tif"
        write_volume(
            folder / name,
            _good_volume(seed=i),
            spacing=(1.0, 0.39, 0.39),
            channel=channel,
            study=3,
            style=style,
        )
        names.append(name)
    return names


def _run(input_dir: Path, output_dir: Path, weights: Path, *extra: str) -> int:
    return main(inference_args(input_dir, output_dir, weights, *extra))


def test_the_run_report_carries_stages_memory_planner_device_and_kernels(tmp_path, weights):
    names = _write_good_cases(tmp_path / "in")
    (tmp_path / "in" / "broken_nucleus_angle.tif").write_bytes(b"not a tiff")
    report_file = tmp_path / "report.json"
    # a budget (the last FAST_INFERENCE_FLAGS flag wins) so the planner runs and says what it chose
    assert (
        _run(
            tmp_path / "in",
            tmp_path / "out",
            weights,
            "--report",
            str(report_file),
            "--budget-seconds",
            "500",
        )
        == 1
    )
    report = json.loads(report_file.read_text())
    assert report["format_version"] == 1 and report["device"] == "cpu"
    cases = {case["name"]: case for case in report["cases"]}
    assert set(cases) == {*names, "broken_nucleus_angle.tif"}
    assert not cases["broken_nucleus_angle.tif"]["ok"] and cases["broken_nucleus_angle.tif"]["figures"] == {}
    figures = cases[names[0]]["figures"]
    assert {"read", "resample_in", "step1", "step2", "resample_out", "write"} <= set(figures["stages"])
    assert figures["total_seconds"] == pytest.approx(sum(figures["stages"].values()), abs=0.01)
    assert list(figures["memory_high_water_gib"]) == [
        k for k in figures["stages"] if k not in ("read", "write")
    ]
    assert figures["memory_counter"] == "process RSS"
    assert len(figures["step2_decisions"]) == 1 and "fits" in figures["step2_decisions"][0]
    assert figures["attempt"] == {"device": "cpu", "kernels": dataclasses.asdict(KernelOptions())}
    step2 = figures["step2"]  # the planner's choice as data: the configured setting fits 500 s
    assert step2["predicted_seconds"] > 0
    assert step2 == {**step2, "ran": True, "planned": True, "overlap": 0.25, "tta": False, "stand_ins": 0}


def test_the_run_report_says_what_step_2_did_as_data(tmp_path, weights):
    """``step2`` in the report: the setting that ran, with the planner off, with flips, skipped, absent."""
    tmp_path.joinpath("in").mkdir()
    case = tmp_path / "in" / "image_0_nucleus_angle.tif"
    write_volume(case, _good_volume(), spacing=(1.0, 0.39, 0.39), channel="nucleus", study=3)

    def step2(*extra: str) -> dict | None:
        report_file = tmp_path / "report.json"
        assert _run(tmp_path / "in", tmp_path / "out", weights, "--report", str(report_file), *extra) == 0
        return json.loads(report_file.read_text())["cases"][0]["figures"]["step2"]

    # FAST_INFERENCE_FLAGS: planner off, patch 16, overlap 0.25 (a step of 12), batch 2 (the default);
    # the 12x40x40 case at 1 x 0.39 um is 20x26x26 at 0.6 um: 2 starts per axis, 8 patches, 4 batches
    assert step2() == {
        "ran": True,
        "planned": False,
        "grid": [20, 26, 26],
        "patch": [16, 16, 16],
        "batch": 2,
        "overlap": 0.25,
        "tta": False,
        "patches": 8,
        "forward_passes": 4,
        "predicted_seconds": None,
        "stand_ins": None,
    }
    flips = step2("--tta", "--overlap", "0.5")  # a step of 8: 2, 3, 3 starts
    assert (flips["tta"], flips["overlap"], flips["patches"], flips["forward_passes"]) == (True, 0.5, 18, 36)
    # a budget the process has spent on its imports already: the planner skips step 2
    skipped = step2("--budget-seconds", "1")
    assert (skipped["ran"], skipped["planned"], skipped["patches"]) == (False, True, 0)
    assert skipped["forward_passes"] == 0 and skipped["predicted_seconds"] is None
    assert step2("--no-step2") is None


def test_the_run_report_says_what_the_safeguard_chose(tmp_path, weights):
    """``safeguard`` in the report: the case's closeness when the gate is on, and the share added."""
    tmp_path.joinpath("in").mkdir()
    case = tmp_path / "in" / "image_0_nucleus_angle.tif"
    write_volume(case, _good_volume(), spacing=(1.0, 0.39, 0.39), channel="nucleus", study=3)

    def safeguard(*extra: str) -> dict:
        report_file = tmp_path / "report.json"
        assert _run(tmp_path / "in", tmp_path / "out", weights, "--report", str(report_file), *extra) == 0
        return json.loads(report_file.read_text())["cases"][0]["figures"]["safeguard"]

    assert safeguard("--closeness-threshold", "1", "--change-strength", "0.5") == {
        "closeness": None,
        "change_strength": 0.5,
    }
    gated = safeguard("--closeness-threshold", "0", "--close-change-strength", "0.25")
    assert 0.0 < gated["closeness"] <= 1.0 and gated["change_strength"] == 0.25


def test_every_input_gets_a_matching_output_and_nothing_else(tmp_path, weights):
    names = _write_good_cases(tmp_path / "in")
    assert _run(tmp_path / "in", tmp_path / "out", weights) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(names)
    for name in names:
        source, fused = read_case(tmp_path / "in" / name), read_case(tmp_path / "out" / name)
        assert fused.volume.shape == source.volume.shape
        assert fused.volume.dtype == np.uint16
        assert fused.meta.spacing == pytest.approx(source.meta.spacing)
        assert (fused.meta.channel, fused.meta.study) == (source.meta.channel, source.meta.study)
        with tifffile.TiffFile(tmp_path / "out" / name) as tif:
            assert tif.is_bigtiff


def test_two_runs_give_identical_bytes(tmp_path, weights):
    _write_good_cases(tmp_path / "in")
    assert _run(tmp_path / "in", tmp_path / "a", weights) == 0
    assert _run(tmp_path / "in", tmp_path / "b", weights) == 0
    for fused in sorted((tmp_path / "a").iterdir()):
        assert fused.read_bytes() == (tmp_path / "b" / fused.name).read_bytes()


def _write_bad_cases(folder: Path) -> dict[str, str]:
    """A file per fault (docs/task.md, Reliability) that must fail; values: words its error must hold."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "not_a_tiff.tif").write_bytes(b"this is not a tiff at all" * 10)
    tifffile.imwrite(folder / "truncated.tif", _good_volume((8, 64, 64)))
    data = (folder / "truncated.tif").read_bytes()
    (folder / "truncated.tif").write_bytes(data[: len(data) // 3])
    tifffile.imwrite(folder / "flat_2d.tif", _good_volume((1, 40, 40))[0])
    tifffile.imwrite(folder / "five_d.tif", np.zeros((2, 2, 4, 8, 8), np.uint16), photometric="minisblack")
    tifffile.imwrite(folder / "complex.tif", np.zeros((4, 8, 8), np.complex64), photometric="minisblack")
    return {
        "not_a_tiff.tif": "not a TIFF",
        "truncated.tif": "truncated",
        "flat_2d.tif": "2-D",
        "five_d.tif": "5-D",
        "complex.tif": "complex",
    }


def test_bad_inputs_are_reported_by_name_and_good_ones_still_run(tmp_path, weights, caplog):
    good = _write_good_cases(tmp_path / "in")
    bad = _write_bad_cases(tmp_path / "in")
    # Recoverable faults: fused with a warning.
    nan_volume = _good_volume(seed=7).astype(np.float32)
    nan_volume[0, 0, :5] = np.nan
    tifffile.imwrite(tmp_path / "in" / "has_nan.tif", nan_volume, photometric="minisblack")
    tifffile.imwrite(tmp_path / "in" / "constant.tif", np.full((12, 20, 20), 7, np.uint16))
    tifffile.imwrite(
        tmp_path / "in" / "no_spacing_tiny.tif", _good_volume((3, 9, 9)), photometric="minisblack"
    )
    code = _run(tmp_path / "in", tmp_path / "out", weights)
    assert code != 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted([*good, "has_nan.tif", "constant.tif", "no_spacing_tiny.tif"])
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    for name, words in bad.items():
        assert any(name in m and words in m for m in errors), f"{name} not reported with {words!r}: {errors}"
    assert not any(r.exc_info for r in caplog.records if any(n in r.getMessage() for n in bad))
    assert "retrying" not in caplog.text  # bad input is not a kernel fault: no setting would fix it


def test_empty_input_folder_fails_clearly(tmp_path, weights, caplog):
    (tmp_path / "in").mkdir()
    assert _run(tmp_path / "in", tmp_path / "out", weights) != 0
    assert "no .tif/.tiff files" in caplog.text


def test_missing_weights_fail_with_instructions_and_no_output(tmp_path, monkeypatch, caplog):
    _write_good_cases(tmp_path / "in")
    monkeypatch.setenv("FMC_MODEL_DIR", str(tmp_path / "nothing_here"))
    monkeypatch.setattr("fmc.weights.weight_roots", lambda explicit: [tmp_path / "nothing_here"])
    code = main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *FAST_INFERENCE_FLAGS])
    assert code != 0
    assert "train.py" in caplog.text
    assert not any((tmp_path / "out").iterdir())


def test_help_documents_every_flag():
    result = subprocess.run(
        [sys.executable, "inference.py", "--help"], cwd=REPO, capture_output=True, text=True, check=True
    )
    for flag in ("--input", "--output", "--weights", "--device", "--overlap", "--patch", "--batch", "--tta"):
        assert flag in result.stdout
    for flag in ("--preview", "--log-level", "--budget-seconds", "--gpu-memory-gib"):
        assert flag in result.stdout
    for flag in ("--precision", "--channels-last", "--cudnn-benchmark", "--compile"):
        assert flag in result.stdout


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], KernelOptions()),
        (["--autocast", "bf16"], KernelOptions(precision="bf16")),
        (["--channels-last", "off"], KernelOptions(channels_last=False)),
        (
            ["--precision", "fp16-weights", "--channels-last", "on"],
            KernelOptions("fp16-weights", channels_last=True),
        ),
        (
            ["--cudnn-benchmark", "--compile", "default"],
            KernelOptions(cudnn_benchmark=True, compile="default"),
        ),
    ],
)
def test_kernel_flags_become_kernel_options(flags, expected):
    options = options_from_args(build_parser().parse_args(flags))
    assert options.pipeline.kernels == expected


def test_contradicting_precision_flags_are_refused():
    with pytest.raises(SystemExit, match="contradicts"):
        options_from_args(build_parser().parse_args(["--autocast", "bf16", "--precision", "fp16"]))


def test_kernel_options_reach_the_log_line(tmp_path, weights, caplog):
    _write_good_cases(tmp_path / "in")
    with caplog.at_level(logging.INFO, logger="fmc"):
        assert (
            _run(tmp_path / "in", tmp_path / "out", weights, "--channels-last", "on", "--precision", "bf16")
            == 0
        )
    assert "bf16+channels_last" in caplog.text


def _break_fast_kernels(monkeypatch) -> list[KernelOptions]:
    """Make every pipeline not on SAFE_KERNELS scribble into its output array and then fail."""
    calls: list[KernelOptions] = []
    real_run = FusionPipeline.run

    def run(self, volume, spacing, deadline=None, out=None):
        calls.append(self.config.kernels)
        if self.config.kernels != SAFE_KERNELS:
            if out is not None:
                out[...] = 12345  # a failure half way through the write-back
            raise RuntimeError("CUDNN_STATUS_EXECUTION_FAILED (simulated)")
        return real_run(self, volume, spacing, deadline=deadline, out=out)

    monkeypatch.setattr(FusionPipeline, "run", run)
    return calls


def test_a_kernel_failure_is_retried_with_safe_kernels_and_later_cases_start_there(
    tmp_path, weights, monkeypatch, caplog
):
    names = _write_good_cases(tmp_path / "in")
    # The same settings on the safe kernels from the start: the retry must give exactly this.
    assert _run(tmp_path / "in", tmp_path / "reference", weights, "--channels-last", "off") == 0
    calls = _break_fast_kernels(monkeypatch)
    with caplog.at_level(logging.INFO, logger="fmc"):
        assert _run(tmp_path / "in", tmp_path / "out", weights) == 0
    # The first case tries the requested kernels, then the safe ones; the others go straight there.
    assert calls == [KernelOptions(), SAFE_KERNELS, SAFE_KERNELS, SAFE_KERNELS]
    assert caplog.text.count("retrying with cpu precision=fp32 channels_last=False") == 1
    assert "CUDNN_STATUS_EXECUTION_FAILED" in caplog.text
    assert "later cases run with cpu precision=fp32" in caplog.text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(names)
    for name in names:  # the retry re-read the input that the failed run scribbled on
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()


def test_a_case_that_fails_every_attempt_is_reported_and_leaves_no_file(
    tmp_path, weights, monkeypatch, caplog
):
    _write_good_cases(tmp_path / "in")

    def run(self, volume, spacing, deadline=None, out=None):
        raise RuntimeError("illegal memory access (simulated)")

    monkeypatch.setattr(FusionPipeline, "run", run)
    assert _run(tmp_path / "in", tmp_path / "out", weights) == 1
    assert list((tmp_path / "out").iterdir()) == []
    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("FAILED")]
    assert len(failed) == 3
    assert all("RuntimeError: illegal memory access (simulated)" in m for m in failed)


def test_freeing_memory_after_a_sticky_cuda_error_does_not_raise(monkeypatch, caplog):
    def broken_empty_cache():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(infer.torch.cuda, "empty_cache", broken_empty_cache)
    infer._release_memory(torch.device("cuda"))
    assert "could not free CUDA memory" in caplog.text


@pytest.mark.cuda  # compares the GPU path with the CPU path; skipped without CUDA (conftest)
@pytest.mark.parametrize("precision", sorted(TOLERANCES))
def test_cpu_and_gpu_paths_agree(tmp_path, weights, precision):
    _write_good_cases(tmp_path / "in")
    base = ["--input", str(tmp_path / "in"), "--weights", str(weights), *FAST_INFERENCE_FLAGS[2:]]
    assert main([*base, "--output", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    assert main([*base, "--output", str(tmp_path / "gpu"), "--device", "cuda", "--precision", precision]) == 0
    for fused in (tmp_path / "cpu").iterdir():
        found = differences(read_case(fused).volume, read_case(tmp_path / "gpu" / fused.name).volume)
        assert TOLERANCES[precision].admits(found), (fused.name, found)


def test_the_tiling_flags_defaults_are_tiling_configs():
    from fmc.infer import TILING_FLAG_HELP, build_parser, options_from_args
    from fmc.tiling import TilingConfig

    args = build_parser().parse_args([])
    tiling = options_from_args(args).pipeline.tiling
    for name in TILING_FLAG_HELP:
        assert getattr(args, name) == getattr(TilingConfig(), name) == getattr(tiling, name), name
    given = options_from_args(build_parser().parse_args(["--overlap", "0.125", "--batch", "3"]))
    assert (given.pipeline.tiling.overlap, given.pipeline.tiling.batch) == (0.125, 3)
