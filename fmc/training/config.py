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
from typing import Any, Literal

from fmc.method import (
    CHANNELS,
    DEFAULT_GLOBAL_SIZE,
    DEFAULT_PATCH,
    Channel,
    DWForm,
    MethodSettings,
    Step1Mode,
    TrainableDWForm,
)
from fmc.network import PRESETS

# A choice setting's allowed values are its field's Literal type (the CLI's choices and validate's
# check read them there, FitConfig.flags); a tuple another module needs is derived from it.
TRAINABLE_DW_FORMS: tuple[str, ...] = typing.get_args(TrainableDWForm)  # --no-dw is "none"
#: MethodSettings fields whose check refuses a fit setting, by that setting's flag name.
SETTING_FLAGS = {"max_filter": "dw_max_filter", "global_size": "global_size", "patch": "patch"}


def knob(default: Any, help: str, choices: tuple[str, ...] | None = None, *, flag: str | None = None) -> Any:
    """A setting with its ``--flag`` help text, kept beside it: the CLI builds its flags from these,
    and :meth:`FitConfig.validate` checks the choices. The choices of a ``Literal`` field are its
    values (:func:`choices_of`); ``choices`` is for a field whose values some other table owns (the
    ablations, the presets). ``flag`` names it on the command line and in stored dicts when the
    field's own name would read badly in its group."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if flag is not None:
        metadata["flag"] = flag
    return field(default=default, metadata=metadata)


def choices_of(hint: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal`` type hint, or of each item of ``tuple[Literal, ...]``; None
    for any other hint."""
    if typing.get_origin(hint) is tuple:
        items = [arg for arg in typing.get_args(hint) if arg is not Ellipsis]
        return choices_of(items[0]) if items else None
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


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
    sim_channels: tuple[Channel, ...] = knob(CHANNELS, "channels to simulate")
    sim_shape: tuple[int, int, int] = knob((48, 128, 128), "voxels (Z Y X) of each simulated pair")
    sim_seed: int = knob(1000, "base seed of the simulated pairs (channel k uses seed + k)")
    channels: tuple[Channel, ...] = knob((), "train on these channels only (default: all in the cache)")
    flips: bool = knob(True, "random flips on all axes")
    patches_per_case: int = knob(16, "step-2 epoch = this many crops per training case")

    def cache_dir(self) -> Path:
        """Where the prepared cache lives."""
        return Path(self.cache) if self.cache else Path(self.run_dir) / "cache"


@dataclass(frozen=True)
class DifferenceWeightingConfig:
    """Difference weighting, eq. (2): whether this run's model has it, in which form, and its max filters."""

    enabled: bool = knob(
        False, "difference weighting, eq. (2), on the final stage's output before the loss", flag="dw"
    )
    form: TrainableDWForm = knob(  # noqa: RUF009 (knob returns a dataclasses.Field, as field() does)
        "paper",
        "DW form with --dw: paper (eq. 2, also before the loss) or released (the authors' code; "
        "inference only)",
        flag="dw_form",
    )
    train_max_filter: int = knob(
        0, "max-filter size on O' during training (0 = off)", flag="dw_train_max_filter"
    )
    max_filter: int = knob(
        3, "max-filter size on O' in the inference pipeline (validation, model card)", flag="dw_max_filter"
    )

    def inference_form(self) -> DWForm:
        """The form the inference pipeline applies to this run's model: ``none`` when it has no DW."""
        return self.form if self.enabled else "none"


@dataclass
class MethodConfig:
    """What is trained: the Table 1 preset, the steps, the networks' size and inputs, and DW."""

    ablation: str = knob(
        DEFAULT_ABLATION, "Table 1 preset: " + ", ".join(ABLATIONS), choices=tuple(ABLATIONS)
    )
    step: Literal["1", "2", "both", "joint"] = knob(
        "both", "what to train: 1 (global), 2 (patches), both (1 then 2) or joint (both nets, one loss)"
    )
    step1_enabled: bool = knob(True, "the model has the global step (off: patch-only)")
    step2_enabled: bool = knob(True, "the model has the patch step (off: step1-only)")
    step1_ckpt: str | None = knob(
        None, "step-1 checkpoint for --step 2 (default: this run's step1/), or to start --step joint"
    )
    preset: str = knob("small", "RUNet size preset: " + " | ".join(PRESETS), choices=tuple(PRESETS))
    global_size: int = knob(DEFAULT_GLOBAL_SIZE, "edge of the step-1 global volume (the paper: 224)")
    patch: int = knob(DEFAULT_PATCH, "edge of the step-2 training crops and inference patches")
    step1_mode: Step1Mode = knob(  # noqa: RUF009 (knob returns a dataclasses.Field, as field() does)
        "correction",
        "correction: step 1 predicts a change added to the 0.6 um input and untrained networks give the "
        "input back exactly; output: step 1's output is the prediction (the paper)",
    )
    step2_residual: Literal["input", "step1"] = knob(
        "input",
        "what step 2 corrects: input (untrained: no change; step 1 is context) or step1 (the "
        "step-1 prediction)",
    )
    target_frame: Literal["target", "input"] = knob(
        "input",
        "step-2 targets as normalized (target) or affinely fitted per case to the input (input; the "
        "metric ignores a global scale and offset)",
    )
    distance_channel: bool = knob(
        False, "step 2 also sees the signed distance to the specimen's hull surface (fmc.distance)"
    )
    init_weights: str | None = knob(
        None,
        "start the generator from these weights: an exported step-N .safetensors (or its stem) or a fit "
        "checkpoint; new input channels start at zero",
    )
    difference_weighting: DifferenceWeightingConfig = field(default_factory=DifferenceWeightingConfig)

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
            difference_weighting=self.difference_weighting.inference_form(),
            max_filter=self.difference_weighting.max_filter,
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
    gan_mode: Literal["bce", "lsgan"] = knob("bce", "adversarial loss: bce (non-saturating) or lsgan")
    disc_base: int = knob(16, "discriminator base channels")
    disc_levels: int = knob(4, "discriminator levels")
    disc_conditional: bool = knob(True, "discriminator also sees the input view")


@dataclass
class OptimiserConfig:
    """AdamW, its schedule, batch sizes and how long each stage trains."""

    lr: float = knob(3e-4, "generator AdamW learning rate")
    d_lr: float = knob(1e-4, "discriminator AdamW learning rate")
    weight_decay: float = knob(1e-4, "AdamW weight decay")
    lr_schedule: Literal["cosine", "constant"] = knob("cosine", "cosine (over --max-steps) or constant")
    grad_clip: float = knob(1.0, "gradient norm clip (0 = off)")
    batch: int = knob(2, "step-2 patches per batch (per process)")
    batch_global: int = knob(1, "step-1 global volumes per batch (per process)")
    max_steps: int = knob(20000, "generator steps per stage (-1: no limit)")
    max_epochs: int = knob(-1, "epochs per stage (-1: no limit)")
    seed: int = knob(0, "seed of initialization and augmentation, and of the split unless --split-seed")


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
    split_seed: int | None = knob(None, "seed of the random split (default: --seed)")
    split_csv: str | None = knob(None, "reuse this split.csv")
    val_every: int = knob(1, "validate every K epochs")
    val_max_cases: int = knob(0, "validate on at most this many cases (0: all)")
    val_mode: Literal["iso", "full"] = knob(
        "iso", "iso: cached 0.6 um volumes, pipeline core; full: source TIFFs through FusionPipeline.run"
    )
    val_overlap: float = knob(0.25, "patch overlap of the validation pipeline")
    val_batch: int = knob(2, "patches per forward in the validation pipeline")
    preview_cases: int = knob(3, "validation cases that get a MIP PNG (input | prediction | target)")


@dataclass
class HardwareConfig:
    """Where and how the run executes: devices, processes, precision, loader workers, resume, logging."""

    accelerator: Literal["auto", "cpu", "gpu"] = knob("auto", "auto | cpu | gpu")
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
    # the attributes from the group down to the dataclass holding the field (a nested one, e.g.
    # ("difference_weighting",)), and that dataclass; () and the group's type for a group's own field
    within: tuple[str, ...] = ()
    owner_type: type | None = None

    @property
    def choices(self) -> tuple[Any, ...] | None:
        """The allowed values: the knob's own, else the field's Literal type's; None: any."""
        return self.field.metadata.get("choices") or choices_of(self.hint)


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
        found: list[Flag] = []

        def walk(group: str, group_type: type, within: tuple[str, ...], owner: type) -> None:
            hints = typing.get_type_hints(owner)
            for item in dataclasses.fields(owner):
                if dataclasses.is_dataclass(hints[item.name]):  # a nested group: its fields, flat
                    walk(group, group_type, (*within, item.name), hints[item.name])
                    continue
                name = item.metadata.get("flag", item.name)
                found.append(Flag(name, group, group_type, item, hints[item.name], within, owner))

        for group in dataclasses.fields(cls):
            if group.name != "extra":
                walk(group.name, groups[group.name], (), groups[group.name])
        return tuple(found)

    @classmethod
    def group_description(cls, group: str) -> str:
        """The group's one-line docstring (the heading text of its flags in ``fit --help``)."""
        group_type = next(flag.group_type for flag in cls.flags() if flag.group == group)
        return inspect.getdoc(group_type) or ""

    def seed_of_split(self) -> int:
        """The random split's seed: ``--split-seed``, else ``--seed`` (so runs that predate the split's
        own seed, and runs that leave it out, split as they did)."""
        own = self.validation.split_seed
        return self.optimiser.seed if own is None else own

    def value(self, flag: Flag) -> Any:
        """The current value of one setting."""
        owner = getattr(self, flag.group)
        for name in flag.within:
            owner = getattr(owner, name)
        return getattr(owner, flag.field.name)

    def validate(self) -> None:
        """Refuse combinations that cannot train, with a message that says what to change."""
        for flag in self.flags():
            allowed = flag.choices
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
        try:  # the limits the inference pipeline sets (max filter odd, sizes): MethodSettings' checks
            method.inference_settings()
        except ValueError as error:
            text = str(error)
            name = next((n for n in SETTING_FLAGS if text.startswith(n + " ")), None)
            if name is None:
                raise
            raise ValueError("--" + SETTING_FLAGS[name].replace("_", "-") + text[len(name) :]) from None
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
        owned: dict[tuple[str, ...], dict[str, Any]] = {}  # (group, *within) -> that dataclass's values
        extra = dict(data.get("extra", {}))
        for key, value in data.items():
            if key == "extra":
                continue
            if key not in by_name:
                extra[key] = value
                continue
            flag = by_name[key]
            owned.setdefault((flag.group, *flag.within), {})[flag.field.name] = (
                tuple(value) if isinstance(value, list) else value
            )
        types = {(flag.group, *flag.within): flag.owner_type for flag in cls.flags()}
        for path in sorted(owned, key=len, reverse=True):  # nested dataclasses first, into their parents
            if len(path) > 1:
                owned.setdefault(path[:-1], {})[path[-1]] = types[path](**owned.pop(path))
        groups = {path[0]: types[path](**values) for path, values in owned.items()}
        return cls(**groups, extra=extra)

    def write(self, path: Path) -> None:
        """Write the resolved config as indented JSON."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


#: The step-2 target frames (fmc.training.data checks its argument against them).
TARGET_FRAMES: tuple[str, ...] = typing.get_args(typing.get_type_hints(MethodConfig)["target_frame"])


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
