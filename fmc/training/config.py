"""One typed configuration for ``train.py fit``, with the paper's Table 1 ablations as presets.

Resolution order (later wins): dataclass defaults -> ``--ablation`` preset -> flags given
on the command line. The resolved config is written to the run folder as JSON and kept
in every checkpoint as a plain dict (so checkpoints load with ``weights_only=True``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmc.method import CHANNELS, DEFAULT_GLOBAL_SIZE, DEFAULT_PATCH, DW_FORMS, STEP1_MODES, MethodSettings

STAGES = ("1", "2", "both", "joint")
STEP2_RESIDUALS = ("input", "step1")

# Table 1 of Wodzinski & Mueller (ISBI 2025): which parts of the method are switched on.
ABLATIONS: dict[str, dict[str, Any]] = {
    "step1-only": {"step1_enabled": True, "step2_enabled": False, "beta": 0.0, "dw": False},
    "patch-only": {"step1_enabled": False, "step2_enabled": True, "beta": 0.0, "dw": False},
    "two-step": {"step1_enabled": True, "step2_enabled": True, "beta": 0.0, "dw": False},
    "adversarial": {"step1_enabled": True, "step2_enabled": True, "beta": 0.01, "dw": False},
    "adversarial-dw": {"step1_enabled": True, "step2_enabled": True, "beta": 0.01, "dw": True},
}
DEFAULT_ABLATION = "adversarial-dw"


@dataclass
class FitConfig:
    """Everything one ``fit`` run needs; every field has a ``--flag`` of the same name (dashes)."""

    # where things are
    run_dir: str = "runs/fmc"
    cache: str = ""  # prepared cache (default: <run_dir>/cache when --data or --simulate is given)
    data: str | None = None  # raw image_{N}_{channel}_{angle|fused}.tif folder: prepared into the cache first
    simulate: int = 0  # >0: simulate this many pairs per channel with fmc.simulate, then prepare them
    sim_channels: tuple[str, ...] = CHANNELS
    sim_shape: tuple[int, int, int] = (48, 128, 128)
    sim_seed: int = 1000
    channels: tuple[str, ...] = ()  # train on these channels only (empty: all)

    # what is trained
    ablation: str = DEFAULT_ABLATION
    step: str = "both"  # "1", "2", "both" (1 then 2) or "joint" (both networks in one loss)
    step1_enabled: bool = True  # the model has a global 224^3 step (False: patch-only ablation)
    step2_enabled: bool = True  # the model has a patch step (False: step1-only ablation)
    step1_ckpt: str | None = None  # step-1 checkpoint for a "--step 2" run (default: this run's step1/)
    preset: str = "small"
    global_size: int = DEFAULT_GLOBAL_SIZE
    patch: int = DEFAULT_PATCH
    flips: bool = True
    # "correction": step 1 predicts a change added to the 0.6 um input, and every network starts as
    # the identity, so the untrained pipeline is the resampled input (fmc.method); "output": the paper
    step1_mode: str = "correction"
    # the prediction step 2 corrects: "input" (channel 0: untrained = the resampled input, step 1 is
    # context) or "step1" (channel 1, the step-1 prediction)
    step2_residual: str = "input"
    # step-2 targets in their own intensity frame ("target") or affinely fitted to the input
    # ("input", fmc.training.data.PatchDataset): the metric is blind to a global affine map
    target_frame: str = "input"
    # step 2 also sees the signed distance to the specimen's hull surface (fmc.distance; RWTH-GE)
    distance_channel: bool = False
    # start the generator from these weights (an exported step-N .safetensors stem or a fit
    # checkpoint) instead of at random; extra input channels start at zero, so the start is unchanged
    init_weights: str | None = None

    # loss
    alpha: float = 1.0  # MAE weight
    beta: float = 0.01  # adversarial weight (0: no discriminator)
    w_ssim: float = 0.0
    w_pearson: float = 0.0
    w_cosine: float = 0.0
    w_step1: float = 1.0  # joint training: weight of step 1's own loss on the global volume
    gan_warmup_steps: int = 500  # generator steps with beta=0 while the discriminator learns
    gan_mode: str = "bce"  # "bce" (non-saturating) or "lsgan"
    disc_base: int = 16
    disc_levels: int = 4
    disc_conditional: bool = True  # the discriminator also sees the input view
    dw: bool = True  # difference weighting, eq. (2), on the final stage's output before the loss
    dw_form: str = "paper"  # with dw: "paper" (also before the loss) or "released" (inference only)
    dw_train_max_filter: int = 0  # max filter on O' during training (0 = off; the paper smooths at inference)
    dw_max_filter: int = 3  # max filter used by the inference pipeline (validation, export card)

    # optimisation
    lr: float = 3e-4
    d_lr: float = 1e-4
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"  # "cosine" (over max_steps) or "constant"
    grad_clip: float = 1.0
    batch: int = 2  # step-2 patches per batch
    batch_global: int = 1  # step-1 global volumes per batch
    patches_per_case: int = 16  # step-2 epoch length = patches_per_case * training cases
    max_steps: int = 20000  # generator steps per stage (-1: no limit)
    max_epochs: int = -1  # per stage (-1: no limit)
    seed: int = 0
    num_workers: int = 2
    precision: str = "auto"  # "auto": bf16-mixed on GPU, 32-true on CPU

    # validation
    val_fraction: float = 0.2
    val_studies: tuple[int, ...] = ()
    val_min_id: int = 0  # >0: image ids >= this validate (held-out-family pairs beside the training ones)
    split_csv: str | None = None  # reuse a split.csv instead of making one
    val_every: int = 1  # epochs between validations
    val_max_cases: int = 0  # 0: every validation case
    val_mode: str = "iso"  # "iso": cached 0.6 um volumes; "full": source TIFFs through FusionPipeline.run
    val_overlap: float = 0.25
    val_batch: int = 2
    preview_cases: int = 3

    # hardware and bookkeeping
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: str = "auto"  # "auto" or a count
    num_nodes: int = 1
    strategy: str = "auto"  # "auto": ddp when more than one process
    resume: str | None = None  # checkpoint path or "last"
    log_every_n_steps: int = 10
    extra: dict[str, Any] = field(default_factory=dict)

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

    def validate(self) -> None:
        """Refuse combinations that cannot train, with a message that says what to change."""
        if self.step not in STAGES:
            raise ValueError(f"step must be one of {STAGES}, got {self.step!r}")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {sorted(ABLATIONS)}, got {self.ablation!r}")
        if not (self.step1_enabled or self.step2_enabled):
            raise ValueError("the model needs step 1, step 2 or both")
        if self.joint and not (self.step1_enabled and self.step2_enabled):
            raise ValueError(f"--step joint needs a two-step model; the {self.ablation} model has one step")
        if not self.stages():
            raise ValueError(
                f"--step {self.step} trains nothing: the {self.ablation} model has no such stage"
            )
        if self.patch < 8 or self.global_size < 8:
            raise ValueError("--patch and --global-size must be >= 8")
        smallest = min(self.patch, self.global_size)
        if self.beta > 0 and smallest < 2**self.disc_levels:
            raise ValueError(
                f"the discriminator's {self.disc_levels} levels need inputs >= {2**self.disc_levels} voxels; "
                f"--patch/--global-size is {smallest}: lower --disc-levels"
            )
        if self.gan_mode not in ("bce", "lsgan"):
            raise ValueError(f"gan_mode must be bce or lsgan, got {self.gan_mode!r}")
        if self.val_mode not in ("iso", "full"):
            raise ValueError(f"val_mode must be iso or full, got {self.val_mode!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be cosine or constant, got {self.lr_schedule!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_steps < 0 and self.max_epochs < 0:
            raise ValueError("set --max-steps or --max-epochs: training would never stop")
        if self.init_weights and self.step not in ("1", "2"):
            raise ValueError("--init-weights starts one stage: give --step 1 or --step 2")
        if self.distance_channel and self.joint:
            raise ValueError("--distance-channel is not built for --step joint; train --step 2 after step 1")
        if self.target_frame not in ("target", "input"):
            raise ValueError(f"target_frame must be target or input, got {self.target_frame!r}")
        if self.step2_residual not in STEP2_RESIDUALS:
            raise ValueError(f"step2_residual must be one of {STEP2_RESIDUALS}, got {self.step2_residual!r}")
        if self.step1_mode not in STEP1_MODES:
            raise ValueError(f"step1_mode must be one of {STEP1_MODES}, got {self.step1_mode!r}")
        if self.dw_form not in DW_FORMS or self.dw_form == "none":
            raise ValueError(f"dw_form must be paper or released (--no-dw: none), got {self.dw_form!r}")
        if self.dw_max_filter < 1 or self.dw_max_filter % 2 == 0:
            raise ValueError(f"dw_max_filter must be odd and >= 1, got {self.dw_max_filter}")
        for channel in (*self.channels, *self.sim_channels):
            if channel not in CHANNELS:
                raise ValueError(f"unknown channel {channel!r}: use {CHANNELS}")

    def method_settings(self) -> MethodSettings:
        """The method as the inference pipeline runs this run's model (validation, export card)."""
        return MethodSettings(
            difference_weighting=self.dw_form if self.dw else "none",
            max_filter=self.dw_max_filter,
            global_size=self.global_size,
            patch=self.patch,
            step1_mode=self.step1_mode,
            step2_inputs=self.step2_inputs(),
        )

    def step2_inputs(self) -> tuple[str, ...]:
        """Step 2's input channels by name (fmc.method.STEP2_INPUTS), in the network's order."""
        names = ("image", "step1") if self.step1_enabled else ("image",)
        return (*names, "distance") if self.distance_channel else names

    def cache_dir(self) -> Path:
        """Where the prepared cache lives."""
        return Path(self.cache) if self.cache else Path(self.run_dir) / "cache"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (tuples become lists), so checkpoints stay weights_only-loadable."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FitConfig:
        """Inverse of :meth:`to_dict`; unknown keys are kept in ``extra`` rather than failing old runs."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        extra = dict(data.get("extra", {}))
        for key, value in data.items():
            if key == "extra":
                continue
            if key not in known:
                extra[key] = value
                continue
            if isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs, extra=extra)

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
