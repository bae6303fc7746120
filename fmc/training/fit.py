"""``train.py fit``: train the stages of the two-step model in sequence with Lightning.

Run folder layout::

    <run_dir>/config.json            resolved FitConfig
    <run_dir>/split.csv              train / val per case
    <run_dir>/step{1,2}/checkpoints  best-*.ckpt (max val/n_ssim) and last.ckpt
    <run_dir>/step{1,2}/csv, tensorboard, previews, throughput.json
    <run_dir>/step2/step1_outputs/   cached step-1 predictions (step-2 input channel)
    <run_dir>/summary.json           per stage: best / last checkpoint, best N_SSIM, steps

Under DDP every rank runs this whole function (Lightning relaunches the script, torchrun
and SLURM start it N times); file writes that are not idempotent are rank-zero only.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only

from fmc.training.callbacks import LastCheckpoint, Throughput
from fmc.training.checkpoints import generator_init, load_checkpoint, step1_from_checkpoint, widen_inputs
from fmc.training.config import FitConfig, HardwareConfig
from fmc.training.datamodule import FusionDataModule
from fmc.training.module import FusionModule, network_config
from fmc.training.sources import data_description
from fmc.training.step1_outputs import outputs_folder, weights_fingerprint

log = logging.getLogger(__name__)

SHM_PATH = Path("/dev/shm")
PREFETCH_FACTOR = 2  # torch DataLoader's default: batches in flight per worker
CPU_RECIPE = (
    "--preset small --global-size 64 --patch 48 --batch 2 --beta 0 --num-workers 0 "
    "--max-steps 150 (step 1) / 240 (step 2) --patches-per-case 2 --val-every 2 --val-max-cases 4"
)
CPU_SLOW_STEP_SECONDS = 15.0  # above this a CPU run gets the warning (the recipe: ~2-5 s per step)

DDP_TIMEOUT = timedelta(hours=2)  # rank 0 may prepare the cache inside prepare_data while the others wait


@dataclass
class StageResult:
    stage: int
    best_checkpoint: str
    last_checkpoint: str
    best_score: float | None
    global_step: int
    throughput: dict[str, float | None]


def stage_dir(config: FitConfig, stage: int) -> Path:
    return Path(config.data.run_dir) / f"step{stage}"


def resolve_accelerator(hardware: HardwareConfig) -> tuple[str, int]:
    """('gpu' | 'cpu', device count) with ``auto`` resolved, so precision and strategy can depend on it."""
    accelerator = hardware.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator not in ("gpu", "cpu", "cuda"):
        raise ValueError(f"accelerator must be auto, cpu or gpu, got {hardware.accelerator!r}")
    accelerator = "gpu" if accelerator == "cuda" else accelerator
    if hardware.devices == "auto":
        devices = max(1, torch.cuda.device_count()) if accelerator == "gpu" else 1
    else:
        devices = int(hardware.devices)
    return accelerator, devices


def resolve_precision(hardware: HardwareConfig, accelerator: str) -> str:
    if hardware.precision != "auto":
        return hardware.precision
    return "bf16-mixed" if accelerator == "gpu" else "32-true"


def loader_batch_bytes(config: FitConfig) -> int:
    """Bytes of the largest batch a loader worker hands over (float32; input, step-1 channel, target)."""
    step1 = config.optimiser.batch_global * 2 * config.method.global_size**3 * 4
    step2 = config.optimiser.batch * 3 * config.method.patch**3 * 4
    return max(step1 if config.method.step1_enabled else 0, step2 if config.method.step2_enabled else 0)


def check_shared_memory(config: FitConfig, shm: Path | None = None) -> int:
    """The loader workers to use: ``--num-workers``, or 0 with a warning when /dev/shm is too small.

    Why: workers pass batches through shared memory, and Docker gives a container 64 MB of it
    unless ``--ipc=host`` or ``--shm-size`` is given; the first batch then dies with "unable to
    allocate shared memory(shm) ... No space left on device". Loading in the main process is
    slower but trains.
    """
    workers = config.hardware.num_workers
    shm = SHM_PATH if shm is None else shm
    if workers <= 0 or not shm.is_dir():
        return workers
    try:
        free = shutil.disk_usage(shm).free
    except OSError:
        return workers
    needed = 2 * workers * PREFETCH_FACTOR * loader_batch_bytes(config)  # x2: pinned copies, collation
    if free >= needed:
        return workers
    log.warning(
        "%s has %d MiB free, %d data-loader worker(s) need about %d MiB for their batches (Docker's "
        "default is 64 MB): loading in the main process instead (--num-workers 0, slower). To keep the "
        "workers, add --ipc=host or --shm-size=%dg to docker run",
        shm,
        free // 2**20,
        workers,
        needed // 2**20,
        max(1, -(-needed // 2**30)),
    )
    return 0


# A whole training step's rate per CPU core (forward + backward + optimiser, the adversarial term on),
# from one timed CPU run of `fit` with GPU-sized settings and the generator's counted FLOPs; it turns
# FLOPs into the estimate of warn_cpu_sized (figures: docs/performance.md, "Further measurements").
CPU_TRAIN_FLOPS_PER_CORE = 6.4e9


def _forward_flops_per_voxel(config: FitConfig, stage: int, edge: int = 32) -> float:
    """FLOPs per voxel of the stage's generator, counted (not timed) on one ``edge``^3 forward."""
    from torch.utils.flop_counter import FlopCounterMode

    from fmc.network import RUNet

    network = RUNet(network_config(config.method, stage))
    sample = torch.zeros(1, network.config.in_channels, edge, edge, edge)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network(sample)
    return counter.get_total_flops() / edge**3


def cpu_step_estimates(config: FitConfig) -> dict[int, float]:
    """Estimated seconds per training step of each stage on this CPU.

    Forward + backward = 3 forwards, at the whole-step rate measured on a CPU
    (:data:`CPU_TRAIN_FLOPS_PER_CORE`) times the threads torch uses. An estimate: CPUs differ.
    """
    cores = max(1, torch.get_num_threads())
    estimates = {}
    for stage in config.method.stages():
        voxels = (
            config.optimiser.batch_global * config.method.global_size**3
            if stage == 1
            else config.optimiser.batch * config.method.patch**3
        )
        flops = 3 * _forward_flops_per_voxel(config, stage) * voxels
        estimates[stage] = flops / (CPU_TRAIN_FLOPS_PER_CORE * cores)
    return estimates


def warn_cpu_sized(config: FitConfig) -> dict[int, float]:
    """On a CPU, warn when the settings are GPU-sized: the estimated time per step and the CPU recipe."""
    if resolve_accelerator(config.hardware)[0] != "cpu":
        return {}
    try:
        estimates = cpu_step_estimates(config)
    except Exception as error:  # an estimate that cannot be made must not stop the training it advises on
        log.debug("no CPU step-time estimate: %s", error)
        return {}
    slow = {stage: seconds for stage, seconds in estimates.items() if seconds > CPU_SLOW_STEP_SECONDS}
    if slow:
        steps = config.optimiser.max_steps if config.optimiser.max_steps > 0 else None
        detail = "; ".join(
            f"step {stage}: about {seconds:.0f} s per step"
            + (f" ({seconds * steps / 3600:.0f} h for {steps} steps)" if steps else "")
            for stage, seconds in slow.items()
        )
        log.warning(
            "training on the CPU with GPU-sized settings (global %d^3 x %d, patches %d^3 x %d, %s preset): "
            "%s (estimated from this network's FLOPs and a measured CPU rate). For a CPU run see "
            "docs/training.md 'Training on a CPU': %s",
            config.method.global_size,
            config.optimiser.batch_global,
            config.method.patch,
            config.optimiser.batch,
            config.method.preset,
            detail,
            CPU_RECIPE,
        )
    return estimates


def build_strategy(config: FitConfig, devices: int) -> Any:
    """DDP when more than one process (or ``--strategy ddp``); a GAN needs ``find_unused_parameters``
    (D idles in G's backward). Any other ``--strategy`` goes to Lightning as given."""
    strategy = config.hardware.strategy
    several = devices * config.hardware.num_nodes > 1
    if strategy == "ddp" or (strategy == "auto" and several):
        return DDPStrategy(find_unused_parameters=config.loss.beta > 0, timeout=DDP_TIMEOUT)
    return strategy


def build_loggers(config: FitConfig, stage: int) -> list[Logger]:
    """CSV always; TensorBoard when the package is importable (it is in requirements-train.txt).

    Each launch (first run, every resume) gets its own ``version_N`` folder: a resume never
    overwrites the logs of the run it continues.
    """
    folder = stage_dir(config, stage)
    loggers: list[Logger] = [CSVLogger(save_dir=str(folder), name="csv")]
    try:
        import tensorboard  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(folder), name="tensorboard", default_hp_metric=False))
    except ImportError:
        log.info("tensorboard is not installed: logging to CSV only")
    return loggers


def build_trainer(config: FitConfig, stage: int) -> tuple[L.Trainer, ModelCheckpoint, Throughput]:
    accelerator, devices = resolve_accelerator(config.hardware)
    folder = stage_dir(config, stage)
    checkpoint = ModelCheckpoint(
        dirpath=str(folder / "checkpoints"),
        filename="best-epoch{epoch:04d}-step{step:07d}",
        auto_insert_metric_name=False,
        monitor="val/n_ssim",
        mode="max",
        save_top_k=1,
        save_last=False,  # LastCheckpoint writes last.ckpt at every validation
        enable_version_counter=False,
    )
    last = LastCheckpoint(folder / "checkpoints" / "last.ckpt")
    throughput = Throughput(folder / "throughput.json")
    trainer = L.Trainer(
        default_root_dir=str(folder),
        accelerator=accelerator,
        devices=devices,
        num_nodes=config.hardware.num_nodes,
        strategy=build_strategy(config, devices),
        precision=resolve_precision(config.hardware, accelerator),  # type: ignore[arg-type]
        max_steps=config.optimiser.max_steps,
        max_epochs=config.optimiser.max_epochs,
        check_val_every_n_epoch=config.validation.val_every,
        num_sanity_val_steps=0,
        logger=build_loggers(config, stage),
        callbacks=[checkpoint, last, throughput],
        log_every_n_steps=config.hardware.log_every_n_steps,
        benchmark=accelerator == "gpu",
    )
    return trainer, checkpoint, throughput


def find_checkpoint(config: FitConfig, stage: int, which: str) -> Path | None:
    """``best``: the best-*.ckpt of the stage (newest if several), ``last``: last.ckpt."""
    folder = stage_dir(config, stage) / "checkpoints"
    if which == "last":
        path = folder / "last.ckpt"
        return path if path.is_file() else None
    best = sorted(folder.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    return best[-1] if best else None


def resume_plan(config: FitConfig) -> dict[int, Path | None]:
    """Which checkpoint each stage of this run resumes from (``None``: starts fresh)."""
    plan: dict[int, Path | None] = dict.fromkeys(config.method.stages())
    if not config.hardware.resume:
        return plan
    if config.hardware.resume == "last":
        for stage in plan:
            plan[stage] = find_checkpoint(config, stage, "last")
            if plan[stage] is not None:
                load_checkpoint(plan[stage])  # a clear error naming the file, never a pickle load
        return plan
    path = Path(config.hardware.resume)
    stage = int(load_checkpoint(path)["hyper_parameters"]["stage"])
    if stage not in plan:
        raise ValueError(f"{path} is a stage-{stage} checkpoint, but this run trains stages {list(plan)}")
    for earlier in [s for s in plan if s < stage]:
        plan.pop(earlier)  # finished before the checkpoint was written
    plan[stage] = path
    return plan


def check_resume_matches(path: Path, module: FusionModule) -> None:
    """Refuse to resume a checkpoint whose networks differ from what this run builds.

    Why: Lightning would load the tensors into a network of another shape (an error deep in
    load_state_dict) or, worse, of the same shape but another meaning (e.g. step 2's residual
    channel), and train on silently.
    """
    saved = load_checkpoint(path)["hyper_parameters"]
    for key in ("stage", "network", "step1_network"):
        if saved.get(key) != module.hparams.get(key):
            wanted, found = module.hparams.get(key), saved.get(key)
            if isinstance(wanted, dict) and isinstance(found, dict):
                names = sorted(n for n in wanted.keys() | found.keys() if wanted.get(n) != found.get(n))
                detail = ", ".join(
                    f"{n}: checkpoint {found.get(n)!r}, this run {wanted.get(n)!r}" for n in names
                )
            else:
                detail = f"checkpoint {found!r}, this run {wanted!r}"
            raise ValueError(f"{path}: cannot resume, its {key} differs from this run's ({detail})")


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _step1_source(config: FitConfig, resume_from: Path | None, previous: StageResult | None) -> Path:
    """Where the step-1 weights for stage 2 come from, in order of preference."""
    if resume_from is not None:
        return resume_from  # a stage-2 checkpoint carries its frozen step-1 network
    if previous is not None:
        return Path(previous.best_checkpoint or previous.last_checkpoint)
    if config.method.step1_ckpt:
        return Path(config.method.step1_ckpt)
    found = find_checkpoint(config, 1, "best") or find_checkpoint(config, 1, "last")
    if found is None:
        raise FileNotFoundError(
            f"stage 2 needs a trained step 1: none in {stage_dir(config, 1)}; train it (--step 1 or both) "
            "or pass --step1-ckpt"
        )
    return found


def run_stage(
    config: FitConfig,
    stage: int,
    resume_from: Path | None,
    previous: StageResult | None,
    prepare_workers: int = 1,
) -> StageResult:
    """Train one stage; returns its checkpoints and best validation N_SSIM."""
    step1_state = step1_config = None
    if stage == 2 and config.method.joint:
        # Joint: step 1 trains here too; it may start from a trained one (--step1-ckpt).
        step1_config = network_config(config.method, 1).to_dict()
        if config.method.step1_ckpt:
            step1_state, step1_config = step1_from_checkpoint(Path(config.method.step1_ckpt))
            log.info("joint training: step-1 network initialized from %s", config.method.step1_ckpt)
    elif stage == 2 and config.method.step1_enabled:
        source = _step1_source(config, resume_from, previous)
        step1_state, step1_config = step1_from_checkpoint(source)
        log.info("stage 2: step-1 network from %s", source)
    module = FusionModule(config.to_dict(), stage, step1_config)
    if resume_from is not None:
        check_resume_matches(resume_from, module)
    elif config.method.init_weights:
        origin = Path(config.method.init_weights)
        start = widen_inputs(generator_init(origin, stage), module.generator.state_dict(), origin)
        module.generator.load_state_dict(start)
        log.info("stage %d: generator initialized from %s", stage, origin)
    step1_dir = None
    if module.step1_net is not None and step1_state is not None:
        module.step1_net.load_state_dict(step1_state)
    if module.step1_net is not None and not config.method.joint:
        step1_dir = outputs_folder(
            Path(config.data.run_dir),
            weights_fingerprint(module.step1_net),
            config.method.global_size,
            config.method.step1_mode,
        )
    datamodule = FusionDataModule(
        config,
        stage,
        step1_network=module.step1_net,
        step1_network_config=step1_config,
        step1_dir=step1_dir,
        prepare_workers=prepare_workers,
    )
    trainer, checkpoint, throughput = build_trainer(config, stage)
    log.info(
        "stage %d: %s preset, %.2f M generator parameters, %s",
        stage,
        config.method.preset,
        sum(p.numel() for p in module.generator.parameters()) / 1e6,
        f"resuming from {resume_from}"
        if resume_from
        else f"starting from {config.method.init_weights}"
        if config.method.init_weights
        else "from scratch",
    )
    with warnings.catch_warnings():
        # The frozen step-1 network is in eval mode on purpose.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        trainer.fit(
            module,
            datamodule=datamodule,
            ckpt_path=str(resume_from) if resume_from else None,
            weights_only=True,
        )
    _barrier()
    best = checkpoint.best_model_path or str(find_checkpoint(config, stage, "best") or "")
    last = str(find_checkpoint(config, stage, "last") or "")
    score = checkpoint.best_model_score
    return StageResult(
        stage=stage,
        best_checkpoint=best,
        last_checkpoint=last,
        best_score=float(score) if score is not None else None,
        global_step=int(trainer.global_step),
        throughput=throughput.summary(),
    )


@rank_zero_only
def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


@rank_zero_only
def _write_config(config: FitConfig) -> None:
    config.write(Path(config.data.run_dir) / "config.json")


def run_fit(config: FitConfig, *, prepare_workers: int = 1) -> list[StageResult]:
    """Train every stage the config asks for; returns one result per stage trained."""
    config.validate()
    config.data.run_dir = str(Path(config.data.run_dir).resolve())
    config.data.cache = str(config.data.cache_dir().resolve())
    if config.data.raw_folder:
        config.data.raw_folder = str(Path(config.data.raw_folder).resolve())
    if config.method.step1_ckpt:
        config.method.step1_ckpt = str(Path(config.method.step1_ckpt).resolve())
    config.hardware.num_workers = check_shared_memory(config)
    if rank_zero_only.rank == 0:
        warn_cpu_sized(config)  # before seeding: its FLOP count initializes a network (random numbers)
    L.seed_everything(config.optimiser.seed, workers=True)
    plan = resume_plan(config)
    _write_config(config)
    results: list[StageResult] = []
    previous: StageResult | None = None
    for stage, resume_from in plan.items():
        result = run_stage(config, stage, resume_from, previous, prepare_workers)
        log.info(
            "stage %d done: step %d, best val/n_ssim %s, best %s",
            stage,
            result.global_step,
            "n/a" if result.best_score is None else f"{result.best_score:.4f}",
            result.best_checkpoint or "(none)",
        )
        results.append(result)
        previous = result
        _write_json(Path(config.data.run_dir) / "data.json", data_description(config.data))
    _write_json(Path(config.data.run_dir) / "summary.json", {"stages": [asdict(r) for r in results]})
    return results
