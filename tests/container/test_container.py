"""Build the real images and run them the way their users do (slow: marker ``container``).

The inference image runs through ./test.sh exactly as a participant would before
uploading (--network none, read-only input, /tmp volume, non-root user); the training
image simulates data, fits a tiny model, exports it, and the export is packed by
./export.sh and served to the inference image as the platform's /opt/ml/model.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from .conftest import Docker

pytestmark = pytest.mark.container

INPUT_SLUG = Path("images/fluorescence-lightsheet-3D-microscopy")
OUTPUT_SLUG = Path("images/fused-fluorescence-lightsheet-3D-microscopy")
USER = f"{os.getuid()}:{os.getgid()}"


def tiffs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".tif", ".tiff"))


def run_test_sh(docker: Docker, image: str, root: Path, model: Path) -> tuple[str, Path, Path]:
    """./test.sh on a fresh input root (sample case simulated by test.sh itself)."""
    proc = docker.run(
        [
            "./test.sh",
            "--no-build",
            "--image",
            image,
            "--input",
            root / "input",
            "--output",
            root / "output",
            "--model",
            model,
        ],
        timeout=900,
        extra_env={"GPUS": "auto"},
    )
    assert "PASSED" in proc.stdout
    return proc.stdout, root / "input" / INPUT_SLUG, root / "output" / OUTPUT_SLUG


def assert_outputs_match(inputs: Path, outputs: Path) -> None:
    """Every input has an output of the same name and shape, uint16, owned by the caller."""
    in_files = tiffs(inputs)
    assert in_files, f"no sample case in {inputs}"
    assert sorted(p.name for p in outputs.iterdir()) == [p.name for p in in_files]
    for path in in_files:
        out = outputs / path.name
        source, result = tifffile.imread(path), tifffile.imread(out)
        assert result.shape == source.shape
        assert result.dtype == np.uint16
        assert result.max() > result.min(), "constant output"
        assert out.stat().st_uid == os.getuid(), "test.sh must hand the outputs back to the caller"


def test_images_are_built_from_the_real_dockerfiles(docker: Docker, images: tuple[str, str]) -> None:
    image, train_image = images
    config = json.loads(docker.run(["docker", "image", "inspect", image]).stdout)[0]["Config"]
    assert config["Entrypoint"] == ["python", "inference.py"]
    assert config["WorkingDir"] == "/opt/app"
    assert config["User"] not in ("", "0", "root")
    assert "PYTHONUNBUFFERED=1" in config["Env"]
    train_config = json.loads(docker.run(["docker", "image", "inspect", train_image]).stdout)[0]["Config"]
    assert train_config["Entrypoint"] == ["python", "train.py"]

    probe = (
        "import os, pwd, torch; "
        "print(pwd.getpwuid(os.getuid()).pw_name, torch.__version__, sorted(os.listdir('/opt/app')))"
    )
    offline = ["docker", "run", "--rm", "--network", "none"]
    shown = docker.run([*offline, "--entrypoint", "python", image, "-c", probe])
    base = docker.run([*offline, docker.base_image, "python", "-c", "import torch; print(torch.__version__)"])
    user, torch_version, listing = shown.stdout.split(maxsplit=2)
    assert user == "user"
    # requirements.txt must not replace the base image's torch (the CUDA build on the platform)
    assert torch_version == base.stdout.split()[-1]
    # .dockerignore keeps tests, benchmarks, the venv and git out
    assert listing.strip() == "['fmc', 'inference.py', 'resources']"


def test_test_sh_runs_the_sample_case_like_the_platform(
    docker: Docker, images: tuple[str, str], tmp_path: Path
) -> None:
    empty_model = tmp_path / "model"
    empty_model.mkdir()
    log, inputs, outputs = run_test_sh(docker, images[0], tmp_path, empty_model)
    assert "--network none" in log
    assert "using the weights baked into the image" in log
    assert_outputs_match(inputs, outputs)
    # the sample case was simulated by the image as the caller, ground truth beside the inputs
    assert all(p.stat().st_uid == os.getuid() for p in tiffs(inputs))
    assert tiffs(inputs.parent / "ground_truth")


def test_training_image_help(docker: Docker, images: tuple[str, str]) -> None:
    shown = docker.run(["docker", "run", "--rm", "--network", "none", images[1], "--help"]).stdout
    for command in ("prepare", "fit", "export", "evaluate"):
        assert command in shown


def tiny_fit(docker: Docker, train_image: str, root: Path, *extra: str) -> Path:
    """Simulate two pairs with fmc.simulate, then `fit --data /data` a tiny model; returns the runs folder.

    As the caller's uid (`--user UID:GID`, as test.sh runs the image), offline.
    """
    data, runs = root / "data", root / "runs"
    data.mkdir()
    runs.mkdir()
    docker_run = ["docker", "run", "--rm", "--network", "none", "--user", USER, "--shm-size", "1g"]
    mounts = ["--volume", f"{data}:/data", "--volume", f"{runs}:/runs"]
    simulate = "-m fmc.simulate --out /data --n 2 --channel nucleus --shape 32 64 64 --seed 3"
    docker.run([*docker_run, *mounts, "--entrypoint", "python", train_image, *simulate.split()])
    fit = (
        "fit --data /data --run-dir /runs/tiny --preset tiny --max-steps 2 --global-size 32 --patch 32"
        " --num-workers 0 --accelerator cpu --preview-cases 0"
    )
    shown = docker.run([*docker_run, *mounts, train_image, *fit.split(), *extra], timeout=900)
    assert (runs / "tiny" / "step2" / "checkpoints" / "last.ckpt").is_file(), shown.stdout[-3000:]
    return runs


def test_training_image_runs_ddp_in_two_processes(
    docker: Docker, images: tuple[str, str], tmp_path: Path
) -> None:
    """The multi-GPU form (--devices N, DDP) on CPU processes: the launcher works inside the image."""
    tiny_fit(docker, images[1], tmp_path, "--devices", "2")


def test_train_export_pack_and_serve_a_model(docker: Docker, images: tuple[str, str], tmp_path: Path) -> None:
    """fmc-train fit -> export into model/ -> ./export.sh model.tar.gz -> /opt/ml/model in the image."""
    image, train_image = images
    runs = tiny_fit(docker, train_image, tmp_path)
    docker_run = ["docker", "run", "--rm", "--network", "none", "--user", USER]
    mounts = ["--volume", f"{runs}:/runs"]
    docker.run([*docker_run, *mounts, train_image, "export", "--ckpt", "/runs/tiny", "--out", "/runs/model"])
    exported = sorted(p.relative_to(runs / "model").as_posix() for p in (runs / "model").rglob("*.*"))
    assert exported == ["any/step1.json", "any/step1.safetensors", "any/step2.json", "any/step2.safetensors"]

    docker.run(["./export.sh", "--no-image", "--model", runs / "model", "--out", tmp_path / "upload"])
    served = tmp_path / "opt_ml_model"
    with tarfile.open(tmp_path / "upload" / "model.tar.gz") as archive:
        archive.extractall(served, filter="data")
    assert sorted(p.relative_to(served).as_posix() for p in served.rglob("*.*")) == exported

    log, inputs, outputs = run_test_sh(docker, image, tmp_path / "serve", served)
    assert "mounted read-only at /opt/ml/model" in log
    assert "/opt/ml/model/any/step1.safetensors" in log, "inference.py did not load the uploaded model"
    assert_outputs_match(inputs, outputs)


def test_export_sh_saves_the_image(docker: Docker, images: tuple[str, str], tmp_path: Path) -> None:
    docker.run(["./export.sh", "--no-model", "--image", images[0], "--out", tmp_path], timeout=1200)
    archive = tmp_path / f"{images[0]}.tar.gz"
    with tarfile.open(archive) as saved:
        names = saved.getnames()
    assert "manifest.json" in names
    assert not list(tmp_path.glob("*.partial"))
