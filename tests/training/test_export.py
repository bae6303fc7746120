"""Export -> safetensors + cards that fmc.weights loads, fmc.pipeline runs and inference.py uses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fmc.io import read_case
from fmc.pipeline import FusionPipeline
from fmc.training.cli import main
from fmc.training.evaluate import pipeline_config_for
from fmc.weights import discover_models, load_model

from .conftest import GLOBAL_SIZE, PATCH

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def exported(fit_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model")
    assert main(["export", "--ckpt", str(fit_run), "--out", str(out), "--channel", "nucleus"]) == 0
    return out


def test_export_writes_both_steps_with_cards(exported: Path) -> None:
    for step in (1, 2):
        loaded = load_model(exported / "nucleus" / f"step{step}")
        card = loaded.card
        assert card.step == step and card.preset == "tiny"
        assert card.normalization["method"] == "percentile"
        assert card.training["pipeline"]["global_size"] == GLOBAL_SIZE
        assert card.training["split"]["val_cases"] == ["image_1_membrane", "image_1_nucleus"]
        assert card.training["data"]["cases"] == 4
        assert "val_n_ssim" in card.metrics and card.created
    card = json.loads((exported / "nucleus" / "step2.json").read_text())
    assert card["config"]["in_channels"] == 2


def test_card_paths_inside_the_working_folder_become_relative(
    fit_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(fit_run.parent)
    out = tmp_path / "portable"
    assert main(["export", "--ckpt", str(fit_run), "--out", str(out), "--channel", "any"]) == 0
    text = (out / "any" / "step2.json").read_text()
    card = json.loads(text)
    assert card["training"]["fit_config"]["run_dir"] == fit_run.name
    assert str(fit_run.parent.resolve()) not in text  # no absolute path of the working folder left


def test_paths_outside_the_working_folder_are_kept(tmp_path: Path) -> None:
    from fmc.training.export import _portable

    record = {"a": str(tmp_path / "runs" / "x"), "b": ["/elsewhere/data", 3], "c": "not/a/path"}
    assert _portable(record, tmp_path) == {"a": "runs/x", "b": ["/elsewhere/data", 3], "c": "not/a/path"}


def test_exported_model_runs_in_the_pipeline(exported: Path, sim_data: Path) -> None:
    models = discover_models(exported, "nucleus", None)
    assert models.step1 is not None and models.step2 is not None
    config = pipeline_config_for(models, overlap=0.0, batch=2, tta=False, device=torch.device("cpu"))
    assert config.tiling.patch == (PATCH,) * 3
    case = read_case(sim_data / "image_1_nucleus_angle.tif")
    pipeline = FusionPipeline(models, config, "cpu")
    assert pipeline.settings.global_size == GLOBAL_SIZE  # from the card
    assert pipeline.settings_sources["global_size"] == "card"
    fused, timings = pipeline.run(case.volume, case.meta.spacing)
    assert fused.shape == case.volume.shape and fused.dtype == np.uint16
    assert "step1" in timings and "step2" in timings


def test_inference_py_runs_on_exported_weights(exported: Path, sim_data: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "input"
    inputs.mkdir()
    (inputs / "image_1_nucleus_angle.tif").write_bytes((sim_data / "image_1_nucleus_angle.tif").read_bytes())
    output = tmp_path / "output"
    command = [sys.executable, "inference.py", "--input", str(inputs), "--output", str(output)]
    command += ["--weights", str(exported), "--device", "cpu", "--patch", str(PATCH), "--overlap", "0"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    written = read_case(output / "image_1_nucleus_angle.tif")
    assert written.volume.shape == read_case(inputs / "image_1_nucleus_angle.tif").volume.shape


def test_evaluate_tables_put_the_model_beside_the_baselines(
    exported: Path, sim_data: Path, fit_run: Path, tmp_path: Path
) -> None:
    import shutil

    from fmc.baselines import store_sigmas

    weights = tmp_path / "weights"
    shutil.copytree(exported, weights)
    store_sigmas(weights, {"nucleus": 1.25}, {"data": "test"})
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "--weights",
        str(weights),
        "--data",
        str(sim_data),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    args += ["--channels", "nucleus", "--overlap", "0", "--split", "val", "--run", str(fit_run)]
    assert main(args) == 0
    summary = (out / "summary.md").read_text()
    assert "| nucleus | 1 |" in summary  # only the validation id of the run's split.csv
    assert "image_1_nucleus" in (out / "cases.csv").read_text()
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0] == "channel,method,cases,n_ssim_mean,n_ssim_std,n_ssim_worst"
    methods = {line.split(",")[1]: float(line.split(",")[3]) for line in rows[1:]}
    assert set(methods) == {"identity", "gaussian", "gaussian-tuned", "resample", "model"}
    assert abs(methods["identity"]) < 1e-6
    assert all(np.isfinite(v) for v in methods.values())  # the sigma stored in the cards was used


def test_export_refuses_a_pickled_checkpoint(tmp_path: Path) -> None:
    import pickle

    bad = tmp_path / "evil.ckpt"

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    bad.write_bytes(pickle.dumps({"state_dict": {}, "hyper_parameters": Payload()}))
    assert main(["export", "--ckpt", str(bad), "--out", str(tmp_path / "out")]) == 2


def test_quality_table_puts_every_variant_beside_the_baselines(
    exported: Path, sim_data: Path, tmp_path: Path
) -> None:
    import csv
    import shutil

    from fmc.baselines import store_sigmas

    weights = tmp_path / "weights"
    shutil.copytree(exported, weights)
    store_sigmas(weights, {"nucleus": 1.0}, {"data": "test"})
    family = tmp_path / "family"
    family.mkdir()
    for kind in ("angle", "fused"):
        name = f"image_1_nucleus_{kind}.tif"
        (family / name).write_bytes((sim_data / name).read_bytes())
    out = tmp_path / "table"
    assert (
        main(
            [
                "table",
                "--weights",
                str(weights),
                "--data",
                f"held-out={family}",
                "--out",
                str(out),
                "--device",
                "cpu",
                "--overlap",
                "0",
                "--extra",
                f"again={weights}",
                "--preview",
                "image_1_nucleus",
            ]
        )
        == 0
    )
    table = (out / "table.md").read_text()
    assert "| method | nucleus held-out (n=1) |" in table
    with open(out / "cases.csv") as handle:
        rows = list(csv.DictReader(handle))
    methods = {r["method"]: float(r["value"]) for r in rows}
    assert set(methods) == {
        "SSIM(input, fused)",
        "identity",
        "gaussian",
        "gaussian-tuned",
        "resample",
        "step 1",
        "step 1 + DW (paper)",
        "two steps",
        "two steps, safeguard off (the whole change in every case)",
        "two steps, every case counted close (the close strength only)",
        "two steps, networks' change off (native detail only)",
        "two steps, all native detail kept",
        "two steps, through the 0.6 um round trip",
        "two steps + DW (paper)",
        "two steps + DW (released)",
        "again: two steps",
        "again: two steps + DW (paper)",
        "again: two steps + DW (released)",
    }
    for name in ("two steps", "two steps + DW (paper)", "two steps + DW (released)"):
        assert methods[f"again: {name}"] == methods[name]  # the same weights as extra rows
    assert "| again: two steps |" in table
    from PIL import Image

    preview = Image.open(out / "preview_held-out_image_1_nucleus.png")
    width = read_case(family / "image_1_nucleus_angle.tif").volume.shape[2]
    assert preview.width == 4 * width + 3 * 4  # input | two steps | again: two steps | target
    assert abs(methods["identity"]) < 1e-9
    assert methods["two steps"] != methods["two steps + DW (paper)"]  # the variants really differ


def test_fine_tuning_with_the_distance_channel_starts_from_exported_weights(
    exported: Path, sim_cache: Path, split_csv: Path, sim_data: Path, tmp_path: Path
) -> None:
    """--step1-ckpt and --init-weights take exported networks; --distance-channel widens step 2 by a
    zero-weighted channel, so (at lr 0) the fine-tuned network computes what the exported one did."""
    from fmc.distance import coarse_distance_channel

    from .conftest import tiny_fit_args

    step1, step2 = exported / "nucleus" / "step1.safetensors", exported / "nucleus" / "step2.safetensors"
    run = tmp_path / "ft"
    flags = ["--split-csv", str(split_csv), "--step", "2", "--beta", "0", "--lr", "0", "--weight-decay", "0"]
    flags += ["--step1-ckpt", str(step1), "--init-weights", str(step2), "--distance-channel"]
    assert main(tiny_fit_args(run, sim_cache, *flags)) == 0
    out = tmp_path / "weights"
    assert main(["export", "--ckpt", str(run), "--out", str(out), "--channel", "any"]) == 0
    widened, original = load_model(out / "any" / "step2"), load_model(step2)
    assert widened.card.config["in_channels"] == 3
    assert widened.card.training["pipeline"]["step2_inputs"] == ["image", "step1", "distance"]
    torch.testing.assert_close(
        load_model(out / "any" / "step1").network.state_dict(), load_model(step1).network.state_dict()
    )
    iso = torch.rand(PATCH, PATCH, PATCH, generator=torch.Generator().manual_seed(0))
    distance = torch.nn.functional.interpolate(coarse_distance_channel(iso, 0.6)[None, None], size=iso.shape)[
        0, 0
    ]
    two = torch.stack([iso, iso])[None]
    with torch.no_grad():
        torch.testing.assert_close(
            widened.network(torch.cat([two, distance[None, None]], dim=1)), original.network(two)
        )
    models = discover_models(out, "nucleus", None, device="cpu")
    pipeline = FusionPipeline(models, pipeline_config_for(models, 0.0, 2, False, torch.device("cpu")), "cpu")
    angle = read_case(sim_data / "image_1_nucleus_angle.tif")
    prediction, _ = pipeline.run(angle.volume, angle.meta.spacing)
    assert prediction.shape == angle.volume.shape
