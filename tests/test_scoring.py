"""python -m fmc.scoring on a tiny folder written with fmc.simulated_tiff.write_volume."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi

from fmc import scoring
from fmc.io import read_case
from fmc.metrics import gaussian_baseline, iou_proxy_scores, n_iou_proxy, n_ssim, ssim_scores
from fmc.simulated_tiff import write_volume

SHAPE = (14, 20, 24)
CASES = {1: "nucleus", 2: "nucleus", 3: "membrane"}


def _u16(v: np.ndarray) -> np.ndarray:
    return np.clip(v * 30000 + 200, 0, 65535).astype(np.uint16)


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    """input/, gt/, pred/ with three cases (two nucleus, one membrane) in two metadata styles."""
    dirs = {k: tmp_path / k for k in ("input", "gt", "pred")}
    for d in dirs.values():
        d.mkdir()
    for n, channel in CASES.items():
        rng = np.random.default_rng(n)
        gt = ndi.gaussian_filter(rng.standard_normal(SHAPE), 1.5)
        gt = (gt - gt.min()) / (gt.max() - gt.min())
        noise = ndi.gaussian_filter(rng.standard_normal(SHAPE), 0.6)
        volumes = {"gt": gt, "input": gt + 0.6 * noise, "pred": gt + 0.2 * noise}
        style = "shaped" if n % 2 else "imagej"
        for kind, vol in volumes.items():
            name = f"image_{n}_{channel}_{'fused' if kind == 'gt' else 'angle'}.tif"
            write_volume(
                dirs[kind] / name,
                _u16(vol),
                spacing=(1.0, 0.195, 0.195),
                channel=channel,
                study=1,
                style=style,
            )
    return dirs


def _read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def _volumes(folders: dict[str, Path], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    channel = CASES[n]
    inp = read_case(folders["input"] / f"image_{n}_{channel}_angle.tif").volume
    gt = read_case(folders["gt"] / f"image_{n}_{channel}_fused.tif").volume
    pred = read_case(folders["pred"] / f"image_{n}_{channel}_angle.tif").volume
    return pred, gt, inp


def test_cli_prints_table_and_writes_csv_with_computed_scores(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_csv = tmp_path / "scores" / "eval.csv"
    argv = ["--input", str(folders["input"]), "--pred", str(folders["pred"]), "--gt", str(folders["gt"])]
    code = scoring.main([*argv, "--csv", str(out_csv), "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "N_IoU (proxy)" in printed and "N_SSIM" in printed
    assert "mean (n=2)" in printed and "mean (n=1)" in printed

    rows = _read_csv(out_csv)
    assert list(rows) == [f"image_{n}_{c}_angle.tif" for n, c in CASES.items()]
    for n, channel in CASES.items():
        row = rows[f"image_{n}_{channel}_angle.tif"]
        pred, gt, inp = _volumes(folders, n)
        expected = ssim_scores(pred, gt, inp, device="scipy")
        assert row["channel"] == channel
        assert float(row["n_ssim"]) == pytest.approx(n_ssim(pred, gt, inp, device="scipy"), abs=1e-9)
        assert float(row["ssim_pred"]) == pytest.approx(expected.ssim_pred, abs=1e-9)
        assert float(row["ssim_input"]) == pytest.approx(expected.ssim_input, abs=1e-9)
        assert float(row["n_iou_proxy"]) == pytest.approx(n_iou_proxy(pred, gt, inp), abs=1e-9)
        assert float(row["iou_pred_proxy"]) == pytest.approx(iou_proxy_scores(pred, gt, inp).iou_pred_proxy)
        assert f"{float(row['n_ssim']):.4f}" in printed
        assert float(row["n_ssim"]) > 0  # the prediction is closer to gt than the input


def test_channel_means_average_per_channel(folders: dict[str, Path]) -> None:
    rows = scoring.evaluate_folder(folders["input"], folders["gt"], folders["pred"], device="cpu")
    means = scoring.channel_means(rows)
    assert set(means) == {"nucleus", "membrane"}
    nucleus = [r["n_ssim"] for r in rows if r["channel"] == "nucleus"]
    assert means["nucleus"]["n"] == 2
    assert means["nucleus"]["n_ssim"] == pytest.approx(np.mean(nucleus))


def test_baselines_need_no_predictions(folders: dict[str, Path]) -> None:
    identity = scoring.evaluate_folder(folders["input"], folders["gt"], baseline="identity", device="cpu")
    assert [r["n_ssim"] for r in identity] == [0.0, 0.0, 0.0]
    gauss = scoring.evaluate_folder(folders["input"], folders["gt"], baseline="gaussian", device="cpu")
    for row, (n, channel) in zip(gauss, CASES.items(), strict=True):
        _, gt, inp = _volumes(folders, n)
        expected = n_ssim(gaussian_baseline(inp, channel), gt, inp, device="scipy")
        assert row["n_ssim"] == pytest.approx(expected, abs=1e-12)


def test_resample_and_tuned_baselines(folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from fmc.baselines import gaussian_tuned, resample_baseline

    resample = scoring.evaluate_folder(folders["input"], folders["gt"], baseline="resample", device="cpu")
    tuned = scoring.run_evaluation(
        folders["input"], folders["gt"], baseline="gaussian-tuned", device="cpu", sigmas={"nucleus": 1.2}
    )
    assert tuned.problems == [
        "image_3_membrane_angle.tif: no tuned sigma for the membrane channel: give --sigma or --weights"
    ]
    for n in (1, 2):
        _, gt, inp = _volumes(folders, n)
        row = next(r for r in resample if r["case"].startswith(f"image_{n}_"))
        expected = n_ssim(resample_baseline(inp, (1.0, 0.195, 0.195)), gt, inp, device="scipy")
        assert row["n_ssim"] == pytest.approx(expected, abs=1e-12)
        row = next(r for r in tuned.rows if r["case"].startswith(f"image_{n}_"))
        assert row["n_ssim"] == pytest.approx(
            n_ssim(gaussian_tuned(inp, 1.2), gt, inp, device="scipy"), abs=1e-12
        )
    argv = ["--input", str(folders["input"]), "--gt", str(folders["gt"]), "--baseline", "gaussian-tuned"]
    assert scoring.main([*argv, "--sigma", "0.8", "--device", "cpu"]) == 0
    assert "baseline: gaussian-tuned" in capsys.readouterr().out


def test_missing_pairs_are_reported_by_name(
    folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (folders["pred"] / "image_2_nucleus_angle.tif").unlink()
    (folders["gt"] / "image_3_membrane_fused.tif").unlink()
    argv = ["--input", str(folders["input"]), "--pred", str(folders["pred"]), "--gt", str(folders["gt"])]
    assert scoring.main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 case(s) not scored" in printed
    assert "image_2_nucleus_angle.tif: no prediction image_2_nucleus_angle.tif" in printed
    assert "image_3_membrane_angle.tif: no ground truth image_3_membrane_fused.tif" in printed
    assert "mean (n=1)" in printed


def test_nothing_scored_exits_non_zero(tmp_path: Path, folders: dict[str, Path]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert scoring.main(["--input", str(empty), "--gt", str(folders["gt"]), "--baseline", "identity"]) == 1
    assert scoring.main(["--input", str(folders["input"]), "--gt", str(empty), "--baseline", "gaussian"]) == 1


def test_pred_or_baseline_is_required(folders: dict[str, Path]) -> None:
    with pytest.raises(SystemExit) as exc:
        scoring.main(["--input", str(folders["input"]), "--gt", str(folders["gt"])])
    assert exc.value.code == 2


def test_every_flag_has_help() -> None:
    for action in scoring.build_parser()._actions:
        assert action.help, action.dest


def test_ground_truth_name() -> None:
    assert scoring.ground_truth_name("image_7_membrane_angle.tif") == "image_7_membrane_fused.tif"


def test_bad_files_and_shape_mismatch_are_reported_and_others_scored(folders: dict[str, Path]) -> None:
    (folders["input"] / "image_9_nucleus_angle.tif").write_bytes(b"not a tiff at all")
    (folders["gt"] / "image_9_nucleus_fused.tif").write_bytes(b"not a tiff at all")
    write_volume(
        folders["pred"] / "image_2_nucleus_angle.tif",
        np.zeros((SHAPE[0], SHAPE[1], SHAPE[2] + 1), np.uint16),
        spacing=(1.0, 0.195, 0.195),
        channel="nucleus",
        study=1,
    )
    result = scoring.run_evaluation(folders["input"], folders["gt"], folders["pred"], device="cpu")
    assert [r["case"] for r in result.rows] == ["image_1_nucleus_angle.tif", "image_3_membrane_angle.tif"]
    assert len(result.problems) == 2
    assert any(p.startswith("image_2_nucleus_angle.tif: shape mismatch") for p in result.problems)
    assert any(p.startswith("image_9_nucleus_angle.tif: ") for p in result.problems)


def test_fused_files_in_the_input_folder_are_not_scored_as_inputs(tmp_path):
    from fmc.scoring import evaluate_folder
    from fmc.simulated_tiff import write_volume

    rng = np.random.default_rng(3)
    truth = rng.integers(0, 1000, size=(16, 24, 24)).astype(np.uint16)
    view = (truth // 2 + rng.integers(0, 50, size=truth.shape)).astype(np.uint16)
    for name, volume in (("image_1_nucleus_angle.tif", view), ("image_1_nucleus_fused.tif", truth)):
        write_volume(tmp_path / name, volume, spacing=(1.0, 0.5, 0.5), channel="nucleus", study=1)
    rows = evaluate_folder(tmp_path, tmp_path, baseline="identity")
    assert [row["case"] for row in rows] == ["image_1_nucleus_angle.tif"]
