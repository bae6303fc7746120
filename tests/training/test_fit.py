"""A tiny two-stage fit on CPU (GAN + DW): checkpoints, logs, previews, safe loading, resume."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
from pathlib import Path

import torch

from fmc.training.cli import main

from .conftest import tiny_fit_args


def _metrics(folder: Path, version: int = 0) -> list[dict[str, str]]:
    with open(folder / "csv" / f"version_{version}" / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_fit_writes_checkpoints_and_logs(fit_run: Path) -> None:
    config = json.loads((fit_run / "config.json").read_text())
    assert config["preset"] == "tiny" and config["beta"] > 0 and config["dw"] is True
    assert (fit_run / "split.csv").is_file()
    for stage in (1, 2):
        folder = fit_run / f"step{stage}"
        assert (folder / "checkpoints" / "last.ckpt").is_file()
        assert len(list((folder / "checkpoints").glob("best-*.ckpt"))) == 1
        rows = _metrics(folder)
        assert any(r.get("train/mae") for r in rows) and any(r.get("val/n_ssim") for r in rows)
        assert any(r.get("train/d_loss") for r in rows) and any(r.get("train/adv") for r in rows)
        assert list((folder / "previews").glob("*.png"))
        assert list((folder / "tensorboard").rglob("events.out.tfevents.*"))
        assert json.loads((folder / "throughput.json").read_text())["samples"] > 0
    assert list((fit_run / "step2" / "step1_outputs").rglob("image_0_*.npy"))
    summary = json.loads((fit_run / "summary.json").read_text())
    assert [s["global_step"] for s in summary["stages"]] == [2, 2]


def test_checkpoints_load_without_pickle(fit_run: Path) -> None:
    for stage in (1, 2):
        checkpoint = torch.load(fit_run / f"step{stage}/checkpoints/last.ckpt", weights_only=True)
        assert checkpoint["hyper_parameters"]["stage"] == stage
        assert checkpoint["global_step"] == 2
        keys = checkpoint["state_dict"].keys()
        assert any(k.startswith("generator.") for k in keys) and any(
            k.startswith("discriminator.") for k in keys
        )
        assert any(k.startswith("step1_net.") for k in keys) == (stage == 2)


def test_stage2_uses_the_trained_step1_network(fit_run: Path) -> None:
    stage1 = torch.load(fit_run / "step1/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    stage2 = torch.load(fit_run / "step2/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    best1 = next((fit_run / "step1/checkpoints").glob("best-*.ckpt"))
    best1_state = torch.load(best1, weights_only=True)["state_dict"]
    for key, value in stage2.items():
        if key.startswith("step1_net."):
            torch.testing.assert_close(value, best1_state["generator." + key[len("step1_net.") :]])
    assert any(k.startswith("generator.") for k in stage1)


def test_stage2_corrects_the_input_with_step1_as_context(fit_run: Path) -> None:
    """By default (--step2-residual input) its residual is channel 0, the input, with a zero head;
    --step2-residual step1 refines channel 1, the step-1 output."""
    from fmc.training.config import MethodConfig
    from fmc.training.module import network_config

    checkpoint = torch.load(fit_run / "step2/checkpoints/last.ckpt", weights_only=True)
    network = checkpoint["hyper_parameters"]["network"]
    assert network["in_channels"] == 2 and network["residual_channel"] == 0 and network["zero_head"]
    assert network_config(MethodConfig(step2_residual="step1"), 2).residual_channel == 1


def test_resume_continues_from_the_saved_step(sim_cache: Path, split_csv: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = tiny_fit_args(run, sim_cache, "--split-csv", str(split_csv), "--step", "1", "--beta", "0")
    assert main(args) == 0
    saved = torch.load(run / "step1/checkpoints/last.ckpt", weights_only=True)
    assert saved["global_step"] == 2
    resumed_args = [*args, "--resume", "last", "--max-steps", "4"]
    assert main(resumed_args) == 0
    after = torch.load(run / "step1/checkpoints/last.ckpt", weights_only=True)
    assert after["global_step"] == 4 > saved["global_step"]
    # Each launch logs to its own version folder; the resumed one logs 2 more steps, all after the first's.
    first = [int(r["step"]) for r in _metrics(run / "step1", 0) if r.get("train/mae")]
    second = [int(r["step"]) for r in _metrics(run / "step1", 1) if r.get("train/mae")]
    assert len(first) == len(second) == 2 and max(first) < min(second)


def test_resume_from_a_stage2_checkpoint_skips_stage1(
    fit_run: Path, sim_cache: Path, split_csv: Path, tmp_path: Path
) -> None:
    run = tmp_path / "copy"
    shutil.copytree(fit_run, run)
    ckpt = run / "step2/checkpoints/last.ckpt"
    before = (run / "step1/checkpoints/last.ckpt").stat().st_mtime_ns
    args = tiny_fit_args(
        run, sim_cache, "--split-csv", str(split_csv), "--resume", str(ckpt), "--max-steps", "3"
    )
    assert main(args) == 0
    assert (run / "step1/checkpoints/last.ckpt").stat().st_mtime_ns == before
    assert torch.load(run / "step2/checkpoints/last.ckpt", weights_only=True)["global_step"] == 3


def test_patch_only_ablation_trains_one_channel_step2(
    sim_cache: Path, split_csv: Path, tmp_path: Path
) -> None:
    run = tmp_path / "patch"
    args = tiny_fit_args(
        run, sim_cache, "--split-csv", str(split_csv), "--ablation", "patch-only", "--max-steps", "1"
    )
    assert main(args) == 0
    assert not (run / "step1").exists()
    checkpoint = torch.load(run / "step2/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["network"]["in_channels"] == 1
    assert checkpoint["hyper_parameters"]["network"]["residual_channel"] == 0
    assert not any(k.startswith("discriminator.") for k in checkpoint["state_dict"])


def test_joint_training_updates_both_networks(
    fit_run: Path, sim_cache: Path, split_csv: Path, tmp_path: Path
) -> None:
    run = tmp_path / "joint"
    start = fit_run / "step1/checkpoints/last.ckpt"
    args = tiny_fit_args(
        run, sim_cache, "--split-csv", str(split_csv), "--step", "joint", "--step1-ckpt", str(start)
    )
    assert main([*args, "--val-max-cases", "0", "--val-fraction", "0", "--split-csv", str(split_csv)]) == 0
    assert not (run / "step1").exists() and not (run / "step2" / "step1_outputs").exists()
    joint = torch.load(run / "step2/checkpoints/last.ckpt", weights_only=True)
    initial = torch.load(start, weights_only=True)["state_dict"]
    assert joint["global_step"] == 2
    changed = [
        not torch.equal(value, initial["generator." + key[len("step1_net.") :]])
        for key, value in joint["state_dict"].items()
        if key.startswith("step1_net.")
    ]
    assert changed and any(changed)  # step 1 started from the checkpoint and was trained further


def test_resume_refuses_a_checkpoint_whose_network_differs(
    fit_run: Path, sim_cache: Path, split_csv: Path, tmp_path: Path, capsys
) -> None:
    """A step-2 checkpoint whose residual channel differs from the run's (an older design) must not load."""
    run = tmp_path / "copy"
    shutil.copytree(fit_run, run)
    ckpt = run / "step2/checkpoints/last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["network"]["residual_channel"] = 1
    torch.save(checkpoint, ckpt)
    before = ckpt.read_bytes()
    args = tiny_fit_args(
        run, sim_cache, "--split-csv", str(split_csv), "--resume", str(ckpt), "--max-steps", "3"
    )
    assert main(args) == 2
    errors = capsys.readouterr().err  # the CLI installs its own log handler
    assert "cannot resume, its network differs" in errors
    assert "residual_channel: checkpoint 1, this run 0" in errors
    assert ckpt.read_bytes() == before  # nothing trained, nothing overwritten


def test_resume_last_refuses_a_pickled_checkpoint(
    sim_cache: Path, split_csv: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    (run / "step1/checkpoints").mkdir(parents=True)
    bad = run / "step1/checkpoints/last.ckpt"
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):  # unpickling this creates the marker file
            return (Path.touch, (marker,))

    bad.write_bytes(pickle.dumps({"state_dict": {}, "hyper_parameters": Payload()}))
    args = tiny_fit_args(run, sim_cache, "--split-csv", str(split_csv), "--step", "1", "--resume", "last")
    assert main(args) == 2
    errors = capsys.readouterr().err  # the CLI installs its own log handler
    assert "refusing pickle" in errors and str(bad) in errors
    assert not marker.exists()
    pickle.loads(bad.read_bytes())  # the payload is live: a pickle load would have run it
    assert marker.exists()


def test_an_explicit_ddp_strategy_still_finds_the_discriminator_unused() -> None:
    """``--strategy ddp`` with a GAN needs find_unused_parameters as much as the automatic choice;
    another named strategy goes to Lightning unchanged."""
    from lightning.pytorch.strategies import DDPStrategy

    from fmc.training.config import FitConfig
    from fmc.training.fit import build_strategy

    for strategy, devices in (("ddp", 1), ("auto", 2)):
        for beta in (0.01, 0.0):
            chosen = build_strategy(FitConfig.from_dict({"strategy": strategy, "beta": beta}), devices)
            assert isinstance(chosen, DDPStrategy)
            assert chosen._ddp_kwargs.get("find_unused_parameters") is (beta > 0)
    assert build_strategy(FitConfig.from_dict({"strategy": "ddp_spawn"}), 2) == "ddp_spawn"
    assert build_strategy(FitConfig.from_dict({}), 1) == "auto"
