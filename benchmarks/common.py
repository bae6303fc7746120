"""Shared helpers of the benchmark scripts: study table, synthetic case, random model, child measurement.

The benchmarks time whole processes (start to file written), so everything that must
not be timed — making the case, writing a model with random weights — happens here,
in the parent, before the child starts. The child's peak host memory comes from
``os.wait4`` (that child alone, not every child this process ever waited for), the
driver-level GPU peak from a streaming ``nvidia-smi`` while it runs, and everything else
(seconds per stage, CUDA allocator peaks, planner decisions) from the run report the child
writes itself (``inference.py --report``).

Run the scripts from the repository root as modules, e.g. ``python -m benchmarks.compare``.

Every script prints progress on stderr (stdout holds the JSON): what is being made, each child
as it starts and ends, and a line every :data:`PROGRESS_SECONDS` while a child runs. ``--device
cuda`` where there is no CUDA stops at once, in one line (:func:`require_device`). SIGTERM and
SIGINT are handled as ``inference.py`` handles them (:mod:`fmc.signals`): the running child is
stopped, every temporary is removed, one line says so, exit code 128 + N (:func:`run_benchmark`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fmc.signals import Interrupted, install_signal_handlers, restore_signal_handlers

log = logging.getLogger("benchmarks")

REPO = Path(__file__).resolve().parent.parent
INPUT_LAYOUT = Path("input/images/fluorescence-lightsheet-3D-microscopy")
OUTPUT_LAYOUT = Path("output/images/fused-fluorescence-lightsheet-3D-microscopy")
PUBLISHED_LAYOUT = Path("published/images/fused-fluorescence-lightsheet-3D-microscopy")
CASE_NAME = "image_0_nucleus_angle.tif"
GIB = 2**30
#: Seconds between two "still running" lines while a child runs.
PROGRESS_SECONDS = 30.0
#: How long a stopped child gets to remove its own temporary (SIGTERM) before SIGKILL.
CHILD_STOP_SECONDS = 10.0
#: Temporaries the children write next to their outputs: fmc's ``.<name>.partial-<pid>`` and the
#: published-style worker's ``.<name>.part``.
_PARTIAL = re.compile(r"^\..+\.(partial-\d+|part)$")


def setup_logging() -> None:
    """Progress lines on stderr, stdout being the JSON; leaves a caller's logging (gpu_check) alone."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)


def require_device(device: str, prog: str) -> None:
    """``--device cuda`` without CUDA: one line and exit 1 before anything is made.

    Why not fall back to the CPU: the paper preset on a study-5 case then runs for hours with
    nothing on the screen, which reads as a hang; a CPU run should be asked for, at a size that fits.
    """
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            f"{prog}: --device cuda, but this machine has no usable CUDA device; pass --device cpu "
            "(at full size with --preset paper that takes hours: try --preset small --scale 0.5 first)"
        )


@dataclass(frozen=True)
class Study:
    """One FuseMyCells study as docs/task.md, Data lists it (shape ZYX, spacing ZYX in um)."""

    number: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]


STUDIES: dict[int, Study] = {
    1: Study(1, (222, 731, 860), (1.0, 0.195, 0.195)),
    2: Study(2, (264, 2008, 1091), (1.0, 0.195, 0.195)),
    3: Study(3, (891, 817, 817), (1.0, 0.39, 0.39)),
    4: Study(4, (80, 1920, 1920), (3.0, 0.33, 0.33)),
    5: Study(5, (309, 1920, 1920), (1.01, 0.388, 0.388)),
}


def scaled_shape(shape: Sequence[int], scale: float) -> tuple[int, int, int]:
    """Each axis times ``scale`` (spacing unchanged), at least 4 voxels, for quick CPU runs."""
    if scale <= 0:
        raise ValueError(f"--scale must be > 0, got {scale}")
    z, y, x = (max(4, round(n * scale)) for n in shape)
    return z, y, x


def isotropic_shape(
    shape: Sequence[int], spacing: Sequence[float], target: float = 0.6
) -> tuple[int, int, int]:
    """The 0.6 um grid of a case, computed here so the benchmark reports it without trusting fmc."""
    z, y, x = (max(1, round(n * s / target)) for n, s in zip(shape, spacing, strict=True))
    return z, y, x


def synthetic_volume(shape: Sequence[int], seed: int = 0, coarse: int = 12, slab: int = 16) -> np.ndarray:
    """Smooth random blobs plus camera-like noise, uint16; fast even at 309x1920x1920 (~1.1 G voxels).

    The content does not change how long fusion takes, but constant or white-noise data
    would make percentiles and compression atypical. A coarse random grid is upsampled
    slab by slab (linear along z, bilinear in y/x via torch), cubed to make sparse bright
    blobs, and given Gaussian noise (one pool read at random offsets), so the host never
    holds a float copy of the volume.
    """
    import torch
    import torch.nn.functional as F

    z_size, y_size, x_size = (int(n) for n in shape)
    rng = np.random.default_rng(seed)
    low = rng.random(
        (math.ceil(z_size / coarse) + 2, math.ceil(y_size / coarse) + 2, math.ceil(x_size / coarse) + 2),
        dtype=np.float32,
    )
    generator = torch.Generator().manual_seed(seed)
    # One pool of noise read at random offsets: drawing fresh normals for 1 G voxels takes longer
    # than everything else together.
    pool = torch.randn(2 * slab * y_size * x_size, generator=generator).mul_(20.0)
    out = np.empty((z_size, y_size, x_size), dtype=np.uint16)
    positions = np.linspace(0, low.shape[0] - 1, z_size, dtype=np.float64)
    for z0 in range(0, z_size, slab):
        pos = positions[z0 : z0 + slab]
        below = np.minimum(np.floor(pos).astype(int), low.shape[0] - 2)
        weight = (pos - below).astype(np.float32)[:, None, None]
        blended = torch.from_numpy(low[below] * (1 - weight) + low[below + 1] * weight)
        smooth = F.interpolate(blended[:, None], size=(y_size, x_size), mode="bilinear", align_corners=True)
        values = smooth[:, 0].pow_(3).mul_(3000.0).add_(100.0)
        offset = int(torch.randint(0, pool.numel() - values.numel() + 1, (1,), generator=generator))
        values.add_(pool[offset : offset + values.numel()].view(values.shape))
        out[z0 : z0 + slab] = values.clamp_(0, 65535).round_().to(torch.int32).numpy()
    return out


def write_random_model(root: Path, preset_name: str, seed: int = 0) -> Path:
    """A two-step model with random weights in ``<root>/any/step{1,2}`` (step 2 takes 2 channels)."""
    import torch

    from fmc.network import RUNet, preset
    from fmc.normalization import CARD_NORMALIZATION
    from fmc.weights import ModelCard, save_model

    folder = root / "any"
    folder.mkdir(parents=True, exist_ok=True)
    for step, channels in ((1, 1), (2, 2)):
        torch.manual_seed(seed + step)
        config = preset(preset_name, in_channels=channels)
        card = ModelCard(
            step=step,
            preset=preset_name,
            config=config.to_dict(),
            normalization=dict(CARD_NORMALIZATION),
            training={"data": "random weights, written by benchmarks/common.py for timing only"},
        )
        save_model(folder / f"step{step}", RUNet(config), card)
    return root


@dataclass
class PreparedCase:
    """A synthetic case and a random model on disk, ready for both pipelines."""

    workdir: Path
    study: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    preset: str
    scale: float
    seed: int
    seconds_to_prepare: float = 0.0
    reused: bool = False

    # Where its files lie, all below workdir (set from it, not passed).
    input_dir: Path = field(init=False)
    case_path: Path = field(init=False)
    weights_dir: Path = field(init=False)
    output_dir: Path = field(init=False)
    published_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.input_dir = self.workdir / INPUT_LAYOUT
        self.case_path = self.input_dir / CASE_NAME
        self.weights_dir = self.workdir / "model"
        self.output_dir = self.workdir / OUTPUT_LAYOUT
        self.published_dir = self.workdir / PUBLISHED_LAYOUT

    def report(self, host: dict, **fields: object) -> dict:
        """A benchmark's JSON object: the case, the host, how the case was got, then ``fields``."""
        return {
            **self.describe(),
            "host": host,
            "case_prepared_seconds": self.seconds_to_prepare,
            "case_reused": self.reused,
            **fields,
        }

    def describe(self) -> dict:
        """The case part of every JSON report."""
        return {
            "study": self.study,
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "isotropic_shape": list(isotropic_shape(self.shape, self.spacing)),
            "voxels": math.prod(self.shape),
            "scale": self.scale,
            "preset": self.preset,
            "seed": self.seed,
        }


def case_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A benchmark's parser with the flags that pick the case and the model (the same in every
    benchmark script that times a case); the caller adds its own."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--study", type=int, choices=sorted(STUDIES), required=True, help="study shape/spacing"
    )
    parser.add_argument(
        "--preset", choices=("paper", "small", "tiny"), default="paper", help="RUNet size (random weights)"
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where the networks run")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply each axis by this (spacing kept), for quick runs"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic case and the weights")
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="work in this folder and keep it (case, model, outputs); an existing matching case is reused",
    )
    parser.add_argument(
        "--timeout", type=float, default=0, help="kill a pipeline process after this many seconds (0 = never)"
    )
    return parser


def prepare_case(workdir: Path, study: int, preset_name: str, scale: float, seed: int) -> PreparedCase:
    """Write the synthetic case and the random model into ``workdir`` unless a matching one is there."""
    info = STUDIES[study]
    prepared = PreparedCase(
        workdir=workdir,
        study=study,
        shape=scaled_shape(info.shape, scale),
        spacing=info.spacing,
        preset=preset_name,
        scale=scale,
        seed=seed,
    )
    marker = workdir / "bench_case.json"
    wanted = prepared.describe()
    if marker.exists() and prepared.case_path.exists() and json.loads(marker.read_text()) == wanted:
        prepared.reused = True
        log.info("reusing the case and model in %s", workdir)
        return prepared
    from fmc.simulated_tiff import write_volume

    start = time.perf_counter()
    gib = math.prod(prepared.shape) * 2 / GIB
    log.info(
        "making the study-%d case (%s voxels, %.2f GiB uint16) and a random %s model in %s",
        study,
        "x".join(map(str, prepared.shape)),
        gib,
        preset_name,
        workdir,
    )
    marker.unlink(missing_ok=True)  # a half-written case must never pass for a finished one
    try:
        prepared.input_dir.mkdir(parents=True, exist_ok=True)
        volume = synthetic_volume(prepared.shape, seed=seed)
        write_volume(
            prepared.case_path,
            volume,
            spacing=prepared.spacing,
            channel="nucleus",
            study=study,
            style="shaped",
        )
        del volume
        if prepared.weights_dir.exists():
            shutil.rmtree(prepared.weights_dir)
        write_random_model(prepared.weights_dir, preset_name, seed)
    except BaseException:
        prepared.case_path.unlink(missing_ok=True)  # in a --keep folder too: GiB of a half case
        raise
    marker.write_text(json.dumps(wanted))
    prepared.seconds_to_prepare = round(time.perf_counter() - start, 3)
    log.info("case and model ready in %.1f s", prepared.seconds_to_prepare)
    return prepared


def remove_partials(prepared: PreparedCase) -> None:
    """Remove the children's temporaries from a kept work folder (a killed child leaves its own)."""
    for folder in (prepared.output_dir, prepared.published_dir):
        with contextlib.suppress(OSError):
            for entry in folder.iterdir():
                if _PARTIAL.match(entry.name) and entry.is_file():
                    entry.unlink(missing_ok=True)


def run_benchmark(args: argparse.Namespace, prog: str, body: Callable[[PreparedCase, dict], int]) -> int:
    """Check the device, prepare the case, run ``body(prepared, host)``; clean up whatever happens.

    The work folder is ``--keep`` or a temporary folder (removed at the end). A stop signal anywhere
    (making the case, a child running) is :class:`fmc.signals.Interrupted`, as in inference.py: the
    child is stopped (:func:`run_child`), the temporary folder removed or, in a ``--keep`` folder,
    the children's temporaries; then one line and exit code 128 + N.
    """
    require_device(args.device, prog)
    previous = install_signal_handlers()
    holder: tempfile.TemporaryDirectory | None = None
    prepared: PreparedCase | None = None
    try:
        try:
            if args.keep is not None:
                workdir = args.keep.resolve()
                workdir.mkdir(parents=True, exist_ok=True)
            else:
                holder = tempfile.TemporaryDirectory(prefix="fmc-bench-")
                workdir = Path(holder.name)
            prepared = prepare_case(workdir, args.study, args.preset, args.scale, args.seed)
            host = host_info()  # before the runs: the load average says what else was running
            return body(prepared, host)
        finally:
            if holder is not None:
                holder.cleanup()
            elif prepared is not None:
                remove_partials(prepared)
    except Interrupted as stop:
        where = (
            "the temporary work folder removed"
            if args.keep is None
            else f"{args.keep} kept, less the half-written case and the children's temporaries"
        )
        log.error("%s: stopped by %s: %s; exit code %d", prog, stop, where, stop.exit_code)
        return stop.exit_code
    finally:
        restore_signal_handlers(previous)


class DriverMemoryPoller:
    """Peak device memory as the driver sees it (``nvidia-smi``, every 100 ms), minus the idle baseline.

    This counts the CUDA context and allocator slack the allocator peak leaves out. It is
    a whole-GPU figure, so other processes on the GPU would show up too. Inactive (all
    None) where ``nvidia-smi`` is missing.
    """

    def __init__(self, interval_ms: int = 100) -> None:
        self.interval_ms = interval_ms
        self.baseline_mib: int | None = None
        self.peak_mib: int | None = None
        self._process: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._first = threading.Event()

    @staticmethod
    def gpu_index() -> str:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        return visible or "0"

    def __enter__(self) -> DriverMemoryPoller:
        if shutil.which("nvidia-smi") is None:
            return self
        command = [
            "nvidia-smi",
            "-i",
            self.gpu_index(),
            "--query-gpu=memory.used",
            "--format=csv,noheader,nounits",
            "-lms",
            str(self.interval_ms),
        ]
        try:
            self._process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
        except OSError:
            return self
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self._first.wait(timeout=10)
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            try:
                used = int(line.strip())
            except ValueError:
                continue
            if self.baseline_mib is None:
                self.baseline_mib = used
                self._first.set()
            self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)
        self._first.set()

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            time.sleep(2 * self.interval_ms / 1000)  # one more sample after the child is gone
            self._process.terminate()
            self._process.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def peak_above_baseline_gib(self) -> float | None:
        if self.peak_mib is None or self.baseline_mib is None:
            return None
        return round((self.peak_mib - self.baseline_mib) / 1024, 3)

    @property
    def baseline_gib(self) -> float | None:
        return None if self.baseline_mib is None else round(self.baseline_mib / 1024, 3)


@dataclass
class ChildRun:
    """What one measured child process did."""

    command: list[str]
    returncode: int
    seconds_to_output: float | None  # process start -> output file last written (its mtime)
    seconds_to_exit: float  # process start -> process gone (adds interpreter shutdown)
    peak_rss_gib: float  # that child's own peak resident set (and its waited-for children)
    peak_gpu_driver_gib: float | None
    gpu_driver_baseline_gib: float | None
    timed_out: bool = False
    stdout: str = field(repr=False, default="")
    stderr: str = field(repr=False, default="")


def child_report(child: ChildRun, output: Path, head: dict, timing: dict, memory: dict) -> dict:
    """One pipeline's report on its timed child: the child's own figures around the pipeline's
    ``head`` (name, settings, device), ``timing`` and ``memory`` fields, in one order for every
    pipeline, and the log's end when it failed."""
    report = {
        **head,
        "ok": child.returncode == 0 and child.seconds_to_output is not None,
        "timed_out": child.timed_out,
        "total_seconds": child.seconds_to_output,
        "process_seconds": child.seconds_to_exit,
        **timing,
        "peak_rss_gib": child.peak_rss_gib,
        **memory,
        "peak_gpu_driver_gib": child.peak_gpu_driver_gib,
        "gpu_driver_baseline_gib": child.gpu_driver_baseline_gib,
        "output": str(output) if output.exists() else None,
        "returncode": child.returncode,
    }
    if not report["ok"]:
        report["log_tail"] = tail(child.stderr)
    return report


def _last_line(fd: int, size: int = 4096) -> str:
    """The last non-empty line a child wrote to the file behind ``fd`` so far (progress lines)."""
    end = os.fstat(fd).st_size
    text = os.pread(fd, min(size, end), max(0, end - size)).decode("utf-8", "replace")
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1][-200:] if lines else "(nothing yet)"


def _report_progress(label: str, err_fd: int, start: float, done: threading.Event) -> None:
    while not done.wait(PROGRESS_SECONDS):
        log.info(
            "%s: running for %.0f s; its last line: %s",
            label,
            time.perf_counter() - start,
            _last_line(err_fd),
        )


def _stop_child(process: subprocess.Popen) -> None:
    """SIGTERM first, so inference.py removes its temporary; SIGKILL if it has not gone in time."""
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        process.wait(timeout=CHILD_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_child(
    command: list[str],
    *,
    output: Path,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
    timeout: float | None = None,
    label: str = "child",
) -> ChildRun:
    """Run ``command`` to completion and measure it; ``output`` is the file whose mtime ends the clock.

    The output is written under a temporary name and renamed (both pipelines), and a
    rename keeps the mtime of the last write, so mtime - start is "process start to file
    written" without polling. After ``timeout`` seconds the child is killed (``timed_out``).
    ``label`` names the child in the progress lines. Any exception here (a stop signal) stops
    the child before it goes on: SIGTERM, then SIGKILL.
    """
    if output.exists():
        output.unlink()
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        with DriverMemoryPoller() as poller:
            wall_start = time.time()
            start = time.perf_counter()
            process = subprocess.Popen(
                command, cwd=cwd, env=env, stdout=out_file, stderr=err_file, stdin=subprocess.DEVNULL
            )
            log.info("%s: started (pid %d)", label, process.pid)
            killer = threading.Timer(timeout, process.kill) if timeout else None
            if killer is not None:
                killer.start()
            done = threading.Event()
            threading.Thread(
                target=_report_progress, args=(label, err_file.fileno(), start, done), daemon=True
            ).start()
            try:
                _, status, usage = os.wait4(process.pid, 0)
            except BaseException:
                _stop_child(process)  # never leave a 10-minute child behind on Ctrl-C or SIGTERM
                raise
            finally:
                done.set()
                if killer is not None:
                    killer.cancel()
            seconds_to_exit = time.perf_counter() - start
            log.info(
                "%s: exit code %d after %.1f s", label, os.waitstatus_to_exitcode(status), seconds_to_exit
            )
            process.returncode = os.waitstatus_to_exitcode(status)
        out_file.seek(0)
        err_file.seek(0)
        stdout, stderr = out_file.read(), err_file.read()
    seconds_to_output = round(output.stat().st_mtime - wall_start, 3) if output.exists() else None
    return ChildRun(
        command=command,
        returncode=process.returncode,
        seconds_to_output=seconds_to_output,
        seconds_to_exit=round(seconds_to_exit, 3),
        peak_rss_gib=round(usage.ru_maxrss * 1024 / GIB, 3),  # Linux reports kilobytes
        peak_gpu_driver_gib=poller.peak_above_baseline_gib,
        gpu_driver_baseline_gib=poller.baseline_gib,
        timed_out=bool(timeout) and seconds_to_exit >= timeout,
        stdout=stdout,
        stderr=stderr,
    )


def host_info() -> dict:
    """Where the figures were taken (the parent's view; GPU names come from the child's log)."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    torch_version = _torch_version()
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the machine skews timings
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch_version,
        "python": platform.python_version(),
    }


def _torch_version() -> str | None:
    """torch's version without importing it (3 s on 2 cores, paid by every benchmark process)."""
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        pass
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def tail(text: str, lines: int = 30) -> str:
    """The end of a child's log, for the JSON when it failed."""
    return "\n".join(text.splitlines()[-lines:])


def python() -> str:
    """The interpreter the children use: the one running the benchmark (the project's venv)."""
    return sys.executable


def print_json(report: dict) -> None:
    """One JSON object on stdout: the benchmark's whole result."""
    print(json.dumps(report, indent=2, default=_json_default))


def write_json(path: Path, data: object) -> None:
    """``data`` as strict JSON in ``path``, whole or not at all (a reader may look while a run goes on).

    NaN and inf become null: a throughput over no timed batch is NaN, which strict readers refuse.
    """
    plain = json.loads(json.dumps(data, default=_json_default))
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(_finite(plain), indent=2, allow_nan=False) + "\n")
    temporary.replace(path)


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)  # type: ignore[arg-type]
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
