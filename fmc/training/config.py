"""One typed configuration for ``train.py fit``, with the paper's Table 1 ablations as presets.

:class:`FitConfig` holds six groups (data, method, loss, optimiser, validation, hardware);
each setting is a :func:`knob` with its help text, so the ``fit`` flags and their checks are
generated from here. Flags, presets and stored records name a setting flat (``--beta``,
``"beta"``); code reads it from its group (``config.loss.beta``).

Resolution order (later wins): dataclass defaults -> ``--ablation`` preset -> flags given
on the command line. The resolved config is written to the run folder as JSON and kept
in every checkpoint as one flat plain dict (so checkpoints load with ``weights_only=True``,
and runs from any version load by key).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmc.method import CHANNELS, DEFAULT_GLOBAL_SIZE, DEFAULT_PATCH, DW_FORMS, STEP1_MODES, MethodSettings
from fmc.network import PRESETS

STAGES = ("1", "2", "both", "joint")
STEP2_RESIDUALS = ("input", "step1")
TARGET_FRAMES = ("target", "input")
GAN_MODES = ("bce", "lsgan")
LR_SCHEDULES = ("cosine", "constant")
VAL_MODES = ("iso", "full")
ACCELERATORS = ("auto", "cpu", "gpu")
TRAINABLE_DW_FORMS = tuple(form for form in DW_FORMS if form != "none")  # --no-dw is "none"


def knob(default: Any, help: str, choices: tuple[str, ...] | None = None, *, flag: str | None = None) -> Any:
    """A setting with its ``--flag`` help text and allowed values, kept beside it: the CLI builds its
    flags from these, and :meth:`FitConfig.validate` checks the choices. ``flag`` names it on the
    command line and in stored dicts when the field's own name would read badly in its group."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if flag is not None:
        metadata["flag"] = flag
    return field(default=default, metadata=metadata)


# Table 1 of Wodzinski & Mueller (ISBI 2025): which parts of the method are switched on.
ABLATIONS: dict[str, dict[str, Any]] = {
    "step1-only": {"step1_enabled": True, "step2_enabled": False, "beta": 0.0, "dw": False},
    "patch-only": {"step1_enabled": False, "step2_enabled": True, "beta": 0.0, "dw": False},
    "two-step": {"step1_enabled": True, "step2_enabled": True, "beta": 0.0, "dw": False},
    "adversarial": {"step1_enabled": True, "step2_enabled": True, "beta": 0.01, "dw": False},
    "adversarial-dw": {"step1_enabled": True, "step2_enabled": True, "beta": 0.01, "dw": True},
}
#: The recipe of the shipped weights (resources/weights/MODEL_CARD.md): two steps, no adversarial
#: term, no DW; the GAN and DW forms lost on the held-out families.
DEFAULT_ABLATION = "two-step"


@dataclass
class DataConfig:
    """Where the run lives and what it trains on: folders, simulated pairs, channels, augmentation."""

    run_dir: str = knob(
        "runs/fmc", "run folder (alias --out): config.json, split.csv, checkpoints, logs, previews"
    )
    cache: str = knob(
        "", "prepared cache folder (default: <run-dir>/cache when --data or --simulate is given)"
    )
    raw_folder: str | None = knob(
        None,
        "raw folder of image_{N}_{channel}_{angle|fused}.tif pairs: prepared into the cache first",
        flag="data",
    )
    simulate: int = knob(
        0, "simulate N pairs per channel with fmc.simulate (domain randomization) and train on them"
    )
    sim_channels: tuple[str, ...] = knob(CHANNELS, "channels to simulate", choices=CHANNELS)
    sim_shape: tuple[int, int, int] = knob((48, 128, 128), "voxels (Z Y X) of each simulated pair")
    sim_seed: int = knob(1000, "base seed of the simulated pairs (channel k uses seed + k)")
    channels: tuple[str, ...] = knob(
        (), "train on these channels only (default: all in the cache)", choices=CHANNELS
    )
    flips: bool = knob(True, "random flips on all axes")
    patches_per_case: int = knob(16, "step-2 epoch = this many crops per training case")

    def cache_dir(self) -> Path:
        """Where the prepared cache lives."""
        return Path(self.cache) if self.cache else Path(self.run_dir) / "cache"


@dataclass
class MethodConfig:
    """What is trained: the Table 1 preset, the steps, the networks' size and inputs, and DW."""

    ablation: str = knob(
        DEFAULT_ABLATION, "Table 1 preset: " + ", ".join(ABLATIONS), choices=tuple(ABLATIONS)
    )
    step: str = knob(
        "both",
        "what to train: 1 (global), 2 (patches), both (1 then 2) or joint (both nets, one loss)",
        choices=STAGES,
    )
    step1_enabled: bool = knob(True, "the model has the global step (off: patch-only)")
    step2_enabled: bool = knob(True, "the model has the patch step (off: step1-only)")
    step1_ckpt: str | None = knob(
        None, "step-1 checkpoint for --step 2 (default: this run's step1/), or to start --step joint"
    )
    preset: str = knob("small", "RUNet size preset: " + " | ".join(PRESETS), choices=tuple(PRESETS))
    global_size: int = knob(DEFAULT_GLOBAL_SIZE, "edge of the step-1 global volume (the paper: 224)")
    patch: int = knob(DEFAULT_PATCH, "edge of the step-2 training crops and inference patches")
    step1_mode: str = knob(
        "correction",
        "correction: step 1 predicts a change added to the 0.6 um input and untrained networks give the "
        "input back exactly; output: step 1's output is the prediction (the paper)",
        choices=STEP1_MODES,
    )
    step2_residual: str = knob(
        "input",
        "what step 2 corrects: input (untrained: no change; step 1 is context) or step1 (the "
        "step-1 prediction)",
        choices=STEP2_RESIDUALS,
    )
    target_frame: str = knob(
        "input",
        "step-2 targets as normalized (target) or affinely fitted per case to the input (input; the "
        "metric ignores a global scale and offset)",
        choices=TARGET_FRAMES,
    )
    distance_channel: bool = knob(
        False, "step 2 also sees the signed distance to the specimen's hull surface (fmc.distance)"
    )
    init_weights: str | None = knob(
        None,
        "start the generator from these weights: an exported step-N .safetensors (or its stem) or a fit "
        "checkpoint; new input channels start at zero",
    )
    dw: bool = knob(False, "difference weighting, eq. (2), on the final stage's output before the loss")
    dw_form: str = knob(
        "paper",
        "DW form with --dw: paper (eq. 2, also before the loss) or released (the authors' code; "
        "inference only)",
        choices=TRAINABLE_DW_FORMS,
    )
    dw_train_max_filter: int = knob(0, "max-filter size on O' during training (0 = off)")
    dw_max_filter: int = knob(3, "max-filter size on O' in the inference pipeline (validation, model card)")

    @property
    def joint(self) -> bool:
        """Both networks trained together: step 2's loss flows back into step 1 (one stage, "2")."""
        return self.step == "joint"

    def stages(self) -> list[int]:
        """The stages this run trains, in order, limited to those the model has (joint: stage 2 only)."""
        wanted = {"1": [1], "2": [2], "both": [1, 2], "joint": [2]}[self.step]
        enabled = {1: self.step1_enabled, 2: self.step2_enabled}
        return [s for s in wanted if enabled[s]]

    def final_stage(self) -> int:
        """The stage whose output the pipeline returns (DW is applied to it)."""
        return 2 if self.step2_enabled else 1

    def step2_inputs(self) -> tuple[str, ...]:
        """Step 2's input channels by name (fmc.method.STEP2_INPUTS), in the network's order."""
        names = ("image", "step1") if self.step1_enabled else ("image",)
        return (*names, "distance") if self.distance_channel else names

    def inference_settings(self) -> MethodSettings:
        """The method as the inference pipeline runs this run's model (validation, export card)."""
        return MethodSettings(
            difference_weighting=self.dw_form if self.dw else "none",
            max_filter=self.dw_max_filter,
            global_size=self.global_size,
            patch=self.patch,
            step1_mode=self.step1_mode,
            step2_inputs=self.step2_inputs(),
        )


@dataclass
class LossConfig:
    """The generator's loss terms and the discriminator behind the adversarial one."""

    alpha: float = knob(1.0, "weight of the MAE term")
    beta: float = knob(0.0, "weight of the adversarial term (0: no discriminator; the paper: 0.01)")
    w_ssim: float = knob(0.5, "weight of a 1-SSIM term")
    w_pearson: float = knob(0.0, "weight of a 1-Pearson term")
    w_cosine: float = knob(0.0, "weight of a 1-cosine term")
    w_step1: float = knob(1.0, "joint training: weight of step 1's own loss on the global volume")
    gan_warmup_steps: int = knob(500, "generator steps with beta=0 before the adversarial term starts")
    gan_mode: str = knob("bce", "adversarial loss: bce (non-saturating) or lsgan", choices=GAN_MODES)
    disc_base: int = knob(16, "discriminator base channels")
    disc_levels: int = knob(4, "discriminator levels")
    disc_conditional: bool = knob(True, "discriminator also sees the input view")


@dataclass
class OptimiserConfig:
    """AdamW, its schedule, batch sizes and how long each stage trains."""

    lr: float = knob(3e-4, "generator AdamW learning rate")
    d_lr: float = knob(1e-4, "discriminator AdamW learning rate")
    weight_decay: float = knob(1e-4, "AdamW weight decay")
    lr_schedule: str = knob("cosine", "cosine (over --max-steps) or constant", choices=LR_SCHEDULES)
    grad_clip: float = knob(1.0, "gradient norm clip (0 = off)")
    batch: int = knob(2, "step-2 patches per batch (per process)")
    batch_global: int = knob(1, "step-1 global volumes per batch (per process)")
    max_steps: int = knob(20000, "generator steps per stage (-1: no limit)")
    max_epochs: int = knob(-1, "epochs per stage (-1: no limit)")
    seed: int = knob(0, "seed of the split, initialization and augmentation")


@dataclass
class ValidationConfig:
    """The split, and the inference-pipeline validation that picks the checkpoint."""

    val_fraction: float = knob(0.2, "fraction of image ids per (study, channel) held out for validation")
    val_studies: tuple[int, ...] = knob(
        (), "hold out these whole studies for validation instead of a random split"
    )
    val_min_id: int = knob(
        0,
        "image ids >= N validate and pick the checkpoint, the rest train (e.g. held-out-family pairs "
        "written with fmc.simulate_heldout --first-id N beside the training pairs); 0: off",
    )
    split_csv: str | None = knob(None, "reuse this split.csv")
    val_every: int = knob(1, "validate every K epochs")
    val_max_cases: int = knob(0, "validate on at most this many cases (0: all)")
    val_mode: str = knob(
        "iso",
        "iso: cached 0.6 um volumes, pipeline core; full: source TIFFs through FusionPipeline.run",
        choices=VAL_MODES,
    )
    val_overlap: float = knob(0.25, "patch overlap of the validation pipeline")
    val_batch: int = knob(2, "patches per forward in the validation pipeline")
    preview_cases: int = knob(3, "validation cases that get a MIP PNG (input | prediction | target)")


@dataclass
class HardwareConfig:
    """Where and how the run executes: devices, processes, precision, loader workers, resume, logging."""

    accelerator: str = knob("auto", "auto | cpu | gpu", choices=ACCELERATORS)
    devices: str = knob("auto", "processes per node (auto: all GPUs, or 1 on CPU); >1 uses DDP")
    num_nodes: int = knob(1, "nodes (DDP; works under torchrun and SLURM)")
    strategy: str = knob("auto", "Lightning strategy (auto: ddp when more than one process)")
    precision: str = knob("auto", "auto (bf16-mixed on GPU, 32-true on CPU) or any Lightning precision")
    num_workers: int = knob(2, "data loader workers per process")
    resume: str | None = knob(None, "checkpoint to resume from, or 'last' (each stage from its last.ckpt)")
    log_every_n_steps: int = knob(10, "logging interval in steps")


@dataclass(frozen=True)
class Flag:
    """One setting as the command line and the stored dicts name it: ``--{name}``, key ``name``."""

    name: str  # the flat name: CLI dest, config.json / checkpoint key
    group: str  # the FitConfig attribute holding it
    group_type: type  # that group's dataclass
    field: dataclasses.Field
    hint: Any  # its resolved type


@dataclass
class FitConfig:
    """Everything one ``fit`` run needs, in typed groups.

    Stored (config.json, checkpoints, cards) as one flat dict whose keys are the flags'
    names, so runs written before the grouping load unchanged.
    """

    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimiser: OptimiserConfig = field(default_factory=OptimiserConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a stored dict this version does not know

    @classmethod
    @functools.cache
    def flags(cls) -> tuple[Flag, ...]:
        """Every setting as a flag, group by group, in the order ``fit --help`` and stored dicts list
        them (resolved once: every to_dict / from_dict / validate reads it)."""
        groups = typing.get_type_hints(cls)
        found = []
        for group in dataclasses.fields(cls):
            if group.name == "extra":
                continue
            group_type = groups[group.name]
            hints = typing.get_type_hints(group_type)
            for item in dataclasses.fields(group_type):
                name = item.metadata.get("flag", item.name)
                found.append(Flag(name, group.name, group_type, item, hints[item.name]))
        return tuple(found)

    @classmethod
    def group_description(cls, group: str) -> str:
        """The group's one-line docstring (the heading text of its flags in ``fit --help``)."""
        group_type = next(flag.group_type for flag in cls.flags() if flag.group == group)
        return inspect.getdoc(group_type) or ""

    def value(self, flag: Flag) -> Any:
        """The current value of one setting."""
        return getattr(getattr(self, flag.group), flag.field.name)

    def validate(self) -> None:
        """Refuse combinations that cannot train, with a message that says what to change."""
        for flag in self.flags():
            allowed = flag.field.metadata.get("choices")
            value = self.value(flag)
            for item in value if isinstance(value, tuple) else (value,):
                if allowed is not None and item not in allowed:
                    raise ValueError(f"{flag.name} must be one of {allowed}, got {item!r}")
        method, loss = self.method, self.loss
        if not (method.step1_enabled or method.step2_enabled):
            raise ValueError("the model needs step 1, step 2 or both")
        if method.joint and not (method.step1_enabled and method.step2_enabled):
            raise ValueError(f"--step joint needs a two-step model; the {method.ablation} model has one step")
        if not method.stages():
            raise ValueError(
                f"--step {method.step} trains nothing: the {method.ablation} model has no such stage"
            )
        if method.patch < 8 or method.global_size < 8:
            raise ValueError("--patch and --global-size must be >= 8")
        smallest = min(method.patch, method.global_size)
        if loss.beta > 0 and smallest < 2**loss.disc_levels:
            raise ValueError(
                f"the discriminator's {loss.disc_levels} levels need inputs >= {2**loss.disc_levels} voxels; "
                f"--patch/--global-size is {smallest}: lower --disc-levels"
            )
        if not 0 <= self.validation.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.validation.val_fraction}")
        if self.optimiser.max_steps < 0 and self.optimiser.max_epochs < 0:
            raise ValueError("set --max-steps or --max-epochs: training would never stop")
        if method.init_weights and method.step not in ("1", "2"):
            raise ValueError("--init-weights starts one stage: give --step 1 or --step 2")
        if method.distance_channel and method.joint:
            raise ValueError("--distance-channel is not built for --step joint; train --step 2 after step 1")
        if method.dw_max_filter < 1 or method.dw_max_filter % 2 == 0:
            raise ValueError(f"dw_max_filter must be odd and >= 1, got {method.dw_max_filter}")

    def to_dict(self) -> dict[str, Any]:
        """One flat dict of plain JSON types (tuples become lists), so checkpoints stay
        weights_only-loadable and keep the keys of every earlier run."""
        flat = {flag.name: self.value(flag) for flag in self.flags()}
        return json.loads(json.dumps({**flat, "extra": self.extra}))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FitConfig:
        """Inverse of :meth:`to_dict` (any subset of the keys); unknown keys are kept in ``extra``
        rather than failing old runs."""
        by_name = {flag.name: flag for flag in cls.flags()}
        grouped: dict[str, dict[str, Any]] = {}
        extra = dict(data.get("extra", {}))
        for key, value in data.items():
            if key == "extra":
                continue
            if key not in by_name:
                extra[key] = value
                continue
            flag = by_name[key]
            grouped.setdefault(flag.group, {})[flag.field.name] = (
                tuple(value) if isinstance(value, list) else value
            )
        group_types = {flag.group: flag.group_type for flag in cls.flags()}
        groups = {name: group_types[name](**values) for name, values in grouped.items()}
        return cls(**groups, extra=extra)

    def write(self, path: Path) -> None:
        """Write the resolved config as indented JSON."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def resolve_config(explicit: dict[str, Any], ablation: str | None = None) -> FitConfig:
    """Defaults, then the ablation preset, then ``explicit`` (only the flags the user gave)."""
    name = ablation or explicit.get("ablation") or DEFAULT_ABLATION
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}: use one of {sorted(ABLATIONS)}")
    values: dict[str, Any] = {"ablation": name, **ABLATIONS[name]}
    values.update({k: v for k, v in explicit.items() if v is not None})
    values["ablation"] = name
    config = FitConfig.from_dict(values)
    config.validate()
    return config
