"""The two-step fusion method of Wodzinski & Mueller (ISBI 2025), as one pipeline.

Reads like the paper's Figure 1: normalize -> resample to 0.6 um -> step 1 (global
224^3 context) -> step 2 (Hann-blended high-resolution patches over [input, step-1])
-> difference weighting, eq. (2) -> back to the original grid -> uint16. What goes back to the
original grid is the change the networks made at 0.6 um, added to the native input (so the
input's own detail finer than 0.6 um is kept, and networks that change nothing return the input
to the last bit).
Every step can be switched off (paper ablations, time planner). Heavy arrays stay on
``device`` from the first transfer to the final uint16 copy. Which DW form runs, and how
step 1 reaches the output, are the model card's settings (:mod:`fmc.method`); flags override.

The mechanics live where they belong: a network's output as a change (:mod:`fmc.step1_mode`),
the patch loop (:mod:`fmc.tiling`), step 2's planner, out-of-memory ladder and deadline
(:func:`fmc.safeguards.run_step_two`), the change gate (:mod:`fmc.change_gate`) and the native
detail (:mod:`fmc.native_detail`).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from fmc.acceleration import Forward, KernelOptions, build_forward
from fmc.change_gate import GateDecision, closeness, decide, strength_for
from fmc.difference_weighting import difference_weighting_, released_difference_weighting_
from fmc.distance import coarse_distance_channel
from fmc.host_to_device import upload
from fmc.memory import high_water_gib
from fmc.method import OUTPUT_SETTING_LIMITS, TARGET_SPACING_UM, MethodSettings, check_step2_inputs
from fmc.native_detail import NativeDetail, normalized_planes, plan_native_detail, smooth_in_plane
from fmc.normalization import to_input_range_uint16
from fmc.resample import RegionResampler, isotropic_shape, resample_slabs, resample_to_shape
from fmc.safeguards import (
    Budget,
    StepTwoPatches,
    StepTwoPlan,
    StepTwoRecord,
    post_step2_reserve_seconds,
    run_step_two,
    take_input_where_non_finite_,
)
from fmc.step1_mode import OUTPUT, Step1ModeRule
from fmc.tiling import TilingConfig
from fmc.weights import LoadedModel, ModelSet, WeightsError

log = logging.getLogger(__name__)

#: The native input as it came: no smoothing, all of its detail kept.
UNTOUCHED = NativeDetail()


@dataclass
class PipelineConfig:
    """Switches and sizes of one run. The method settings left at None come from the model card
    (:class:`fmc.method.MethodSettings`, its defaults when the card has none)."""

    step1: bool = True
    step2: bool = True
    difference_weighting: str | None = None  # "paper" | "released" | "none"; None: the card's
    max_filter: int | None = None  # the paper form's max filter; None: the card's
    step1_mode: str | None = None  # "output" | "correction"; None: the card's
    native_detail: float | None = None  # share of the input's sub-0.6 um detail kept; None: the card's
    detail_noise_weight: float | None = None  # how much that share drops with its noise; None: the card's
    detail_sigma: float | None = None  # in-plane smoothing of the native input (voxels); None: the card's
    change_strength: float | None = None  # the safeguard's scale of the change; None: the card's
    close_change_strength: float | None = None  # the scale in a close case (fmc.change_gate); None: card's
    closeness_threshold: float | None = None  # closeness from which a case is close; None: the card's
    tta: bool = False
    global_size: int | None = None  # None: what the step-1 model was trained at (card)
    target_spacing: float = TARGET_SPACING_UM
    tiling: TilingConfig = field(default_factory=TilingConfig)
    kernels: KernelOptions = field(default_factory=KernelOptions)


def _stored_settings(models: ModelSet) -> dict:
    """The ``card.training["pipeline"]`` records of both cards, step 2's winning."""
    stored: dict = {}
    for loaded in (models.step1, models.step2):
        if loaded is not None:
            stored.update(loaded.card.training.get("pipeline", {}))
    return stored


def card_settings(models: ModelSet) -> MethodSettings:
    """The method settings the models were trained and validated with (``card.training["pipeline"]``)."""
    return _read_settings(models, _stored_settings(models))


def _read_settings(models: ModelSet, stored: dict) -> MethodSettings:
    """``stored`` as settings; a card this pipeline cannot follow is a WeightsError naming its file."""
    try:
        settings = MethodSettings.from_card(stored)
        if models.step2 is not None:
            settings.step2_channels(int(models.step2.card.config.get("in_channels", 2)))
    except ValueError as error:
        cards = [
            str(m.path.with_suffix(".json")) for m in (models.step1, models.step2) if m is not None and m.path
        ]
        raise WeightsError(f"{' / '.join(cards) or 'model card'}: {error}") from error
    return settings


def resolve_settings(models: ModelSet, config: PipelineConfig) -> tuple[MethodSettings, dict[str, str]]:
    """The card's settings with the config's non-None values in their place, and where each came from."""
    flags = {
        "difference_weighting": config.difference_weighting,
        "max_filter": config.max_filter,
        "global_size": config.global_size,
        "step1_mode": config.step1_mode,
        **{name: getattr(config, name) for name in OUTPUT_SETTING_LIMITS},
    }
    stored = _stored_settings(models)
    sources = {
        name: ("flag" if flags.get(name) is not None else "card" if name in stored else "default")
        for name in MethodSettings.__dataclass_fields__
    }
    return _read_settings(models, stored).override(**flags), sources


class StepTwo(enum.Enum):
    """Why step 2 gave no prediction: the step-1 output (or the input) stands in for it."""

    OFF = "step 2 is off (no model, or the step-1-only ablation)"
    SKIPPED = "the time planner skipped step 2: it would not fit the budget"


class StepTwoInputs:
    """Step 2's input channels (named as in :data:`fmc.method.STEP2_INPUTS`), served one patch at a time.

    The step-1 output and the distance channel stay at their coarse sizes and each patch of them is
    upsampled on demand, so step 2 holds one full-size volume (the input) instead of one per
    channel plus their stacked copy: 9 GiB less for study 5 with two channels.
    """

    def __init__(
        self,
        iso: torch.Tensor,
        step1_small: torch.Tensor | None,
        inputs: tuple[str, ...],
        mode: Step1ModeRule = OUTPUT,
        distance_small: torch.Tensor | None = None,
    ) -> None:
        check_step2_inputs(inputs)
        if "distance" in inputs and distance_small is None:
            raise ValueError("the step-2 model takes the distance channel: pass distance_small")
        self.iso = iso
        self.inputs = inputs
        self.mode = mode  # how the small step-1 volume becomes the step-1 channel (fmc.step1_mode)
        self.step1_small = step1_small
        # Without step 1 (ablation) the input itself stands in for its output, as in the paper's table.
        use_step1 = "step1" in inputs and step1_small is not None
        self.upsampler = RegionResampler(step1_small, tuple(iso.shape)) if use_step1 else None
        self.distance = RegionResampler(distance_small, tuple(iso.shape)) if "distance" in inputs else None
        z, y, x = iso.shape
        self.shape = (int(z), int(y), int(x))
        self.device = iso.device

    def patch(self, start: tuple[int, int, int], size: tuple[int, int, int]) -> torch.Tensor:
        (z, y, x), (pz, py, px) = start, size
        image = self.iso[z : z + pz, y : y + py, x : x + px]
        channels = []
        for name in self.inputs:
            if name == "image":
                channels.append(image)
            elif name == "step1":
                if self.upsampler is None:
                    channels.append(image)
                else:
                    second = self.upsampler.region(start, size)
                    channels.append(self.mode.apply(second, image))
            else:
                assert self.distance is not None
                channels.append(self.distance.region(start, size))
        return torch.stack(channels) if len(channels) > 1 else image[None]

    def step_one_channel(self, batch: torch.Tensor) -> torch.Tensor:
        """The step-1 output of a (B, C, ...) batch of these patches: what a patch predicts when step 2
        has no time left for it (without step 1 it is the input, as in the ablation above)."""
        index = self.inputs.index("step1") if "step1" in self.inputs else 0
        return batch[:, index : index + 1]

    def add_residual_(self, change: torch.Tensor, channel: int) -> torch.Tensor:
        """Step 2's blended ``change`` applied at its network's residual ``channel`` (in place).

        In correction mode that channel is the input, or the input plus step 1's upsampled change; the
        latter is added slab by slab, so no full-size copy of the step-1 channel is made.
        """
        if not self.mode.correction:
            return change
        self.mode.apply_(change, self.iso)
        if self.step1_small is not None and channel == 1:
            for z0, slab in resample_slabs(self.step1_small, self.shape):
                self.mode.apply_(change[z0 : z0 + slab.shape[0]], slab)
        return change


class StageClock:
    """Seconds per stage and the memory high-water mark after each, for one run (a :data:`StageTimer`)."""

    def __init__(self) -> None:
        self.high_water_gib: dict[str, float] = {}  # per stage (GiB, see fmc.memory)

    @contextmanager
    def __call__(self, timings: dict[str, float], name: str, device: torch.device) -> Iterator[None]:
        """Record wall seconds of a stage into ``timings`` (synchronizing CUDA so the figure is the
        stage's own) and the memory high-water mark after it."""
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings[name] = round(time.perf_counter() - start, 3)
        peak = high_water_gib(device)
        if peak is not None:
            self.high_water_gib[name] = round(peak, 3)


class FusionPipeline:
    """Predict the fused volume from one view with a step-1 and/or step-2 RUNet."""

    def __init__(self, models: ModelSet, config: PipelineConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.step1_model = models.step1 if config.step1 else None
        self.step2_model = models.step2 if config.step2 else None
        self.settings, self.settings_sources = resolve_settings(models, config)
        self.mode = Step1ModeRule(self.settings.step1_mode)  # how step 1 and 2 reach the output
        log.info("method settings: %s", self.settings.describe(self.settings_sources))
        self._timed = StageClock()  # seconds and memory per stage of the last run()
        self.step2_record = StepTwoRecord()  # what step 2's safeguards decided in the last run()
        self.native_detail = UNTOUCHED  # how the last run() took the native input
        self.gate = GateDecision(None, 1.0)  # the safeguard's choice in the last run()
        self.closeness_by_dw: dict[str, float] = {}  # per DW form, in the last run_each_setting()
        if self.step1_model is None and self.step2_model is None:
            raise ValueError(
                "the pipeline has no model to run: enable step 1 or step 2 and provide its weights"
            )
        # Built once: with torch.compile, a new forward would compile again.
        self._forwards: dict[int, Forward] = {
            id(loaded): build_forward(loaded.network, config.kernels, self.device)
            for loaded in (self.step1_model, self.step2_model)
            if loaded is not None
        }

    @property
    def global_size(self) -> int:
        """Step-1 cube edge: the configured one, else the size the step-1 model was trained at."""
        return self.settings.global_size

    @property
    def memory_high_water_gib(self) -> dict[str, float]:
        """The memory high-water mark after each stage of the last run() (GiB)."""
        return self._timed.high_water_gib

    @property
    def step2_decisions(self) -> list[str]:
        """The planner's choice and the deadline's stand-ins in the last run(), in words."""
        return self.step2_record.decisions

    @property
    def step2_plan(self) -> StepTwoPlan | None:
        """The planner's choice in the last run(); None: no deadline."""
        return self.step2_record.plan

    @property
    def step2_stand_ins(self) -> int | None:
        """Patches the deadline gave the stand-in in the last run(); None: no deadline."""
        return self.step2_record.stand_ins

    @property
    def correction(self) -> bool:
        """Step 1 predicts a change of the input (fmc.method's "correction" mode) rather than the output."""
        return self.mode.correction

    def describe(self) -> str:
        """One phrase naming the steps and presets that will run, for the per-case log line."""
        parts = []
        if self.step1_model is not None:
            parts.append(f"step1={self.step1_model.card.preset}@{self.global_size}")
        if self.step2_model is not None:
            parts.append(f"step2={self.step2_model.card.preset}")
        form = self.settings.difference_weighting
        if form == "paper":
            parts.append(f"dw-paper(max{self.settings.max_filter})")
        elif form == "released":
            parts.append("dw-released")
        if self.config.tta:
            parts.append("tta")
        if self.config.kernels != KernelOptions():
            parts.append(self.config.kernels.describe())
        return "+".join(parts)

    def run(
        self,
        volume: np.ndarray,
        spacing: tuple[float, float, float],
        deadline: float | None = None,
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Fuse one ZYX volume; returns the uint16 prediction on the input grid and seconds per stage.

        ``deadline`` (a ``time.perf_counter()`` value) turns on the time planner for step 2.
        ``out``: a writeable uint16 array of the volume's shape to write the prediction into
        and return; it may be ``volume`` itself, which is not read after its copy to the
        device, so the host holds one volume-sized array instead of two (2.1 GiB for study 5).
        """
        check_output_array(out, volume.shape)
        timings: dict[str, float] = {}
        self._timed, self.step2_record = StageClock(), StepTwoRecord()
        with torch.inference_mode():
            # normalize, resample to 0.6 um
            iso, bounds = to_isotropic(
                volume, spacing, self.device, self.config.target_spacing, self._timed, timings
            )
            # step 1, step 2, difference weighting (the time still needed after step 2 kept in reserve)
            dw = self.settings.difference_weighting != "none"
            reserve = post_step2_reserve_seconds(timings["resample_in"], volume.nbytes, dw)
            budget = None if deadline is None else Budget(deadline, reserve)
            prediction = self.predict_isotropic(iso, timings, budget)
            # the change gate, then the change added back onto the native input, uint16
            with self._timed(timings, "resample_out", self.device):
                self.gate = decide(self.settings, iso, prediction)
                detail = self._plan_native_detail(volume, iso, bounds, spacing, self.settings)
                result = add_change_on_native_grid(
                    volume, iso, prediction, bounds, detail, self.gate.strength, out
                )
        return result, timings

    def _plan_native_detail(
        self,
        volume: np.ndarray,
        iso: torch.Tensor,
        bounds: tuple[float, float],
        spacing: tuple[float, float, float],
        settings: MethodSettings,
    ) -> NativeDetail:
        """How this case's native input enters its output (:mod:`fmc.native_detail`)."""
        detail = plan_native_detail(
            volume,
            iso,
            bounds,
            spacing,
            self.config.target_spacing,
            settings.native_detail,
            settings.detail_noise_weight,
            settings.detail_sigma,
        )
        self.native_detail = detail
        if settings.detail_noise_weight > 0:
            log.info(
                "native detail kept: %.2f of the input's detail finer than the 0.6 um grid "
                "(in-plane smoothing sigma %g voxels)",
                detail.gain,
                detail.sigma,
            )
        return detail

    def run_each_dw(
        self, volume: np.ndarray, spacing: tuple[float, float, float], forms: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        """One uint16 prediction per DW form from a single pass of the networks; each is the bytes
        ``run`` gives with that form (no deadline). Why: the quality table scores every form, and
        the networks, not DW, cost the time."""
        variants = [replace(self.settings, difference_weighting=form) for form in forms]
        return dict(zip(forms, self.run_each_setting(volume, spacing, variants), strict=True))

    def run_each_setting(
        self, volume: np.ndarray, spacing: tuple[float, float, float], variants: list[MethodSettings]
    ) -> list[np.ndarray]:
        """One uint16 prediction per settings in ``variants`` from a single pass of the networks.

        The variants may differ in what acts after the networks (the DW form, the native detail,
        the safeguard); each result is the bytes ``run`` gives with those settings (no deadline).
        The closeness of each DW form's prediction (:mod:`fmc.change_gate`) is kept in
        ``closeness_by_dw``. For the quality table and for fitting the safeguard on validation pairs.
        """
        timings: dict[str, float] = {}
        results: list[np.ndarray] = []
        self.closeness_by_dw = {}
        with torch.inference_mode():
            iso, bounds = to_isotropic(
                volume, spacing, self.device, self.config.target_spacing, self._timed, timings
            )
            before = self.predict_before_dw(iso, timings)
            plans: dict[tuple[float, float, float], NativeDetail] = {}
            for settings in variants:
                key = (settings.native_detail, settings.detail_noise_weight, settings.detail_sigma)
                if key not in plans:
                    plans[key] = self._plan_native_detail(volume, iso, bounds, spacing, settings)
                prediction = weigh_differences(iso, before.clone(), settings)
                form = settings.difference_weighting
                if form not in self.closeness_by_dw:
                    self.closeness_by_dw[form] = closeness(iso, prediction)
                strength = strength_for(settings, self.closeness_by_dw[form])
                output = add_change_on_native_grid(volume, iso, prediction, bounds, plans[key], strength)
                results.append(output)
        return results

    @torch.inference_mode()  # also when training's validation calls it under no_grad only
    def predict_isotropic(
        self, iso: torch.Tensor, timings: dict[str, float] | None = None, budget: Budget | None = None
    ) -> torch.Tensor:
        """Steps 1, 2 and DW on a normalized (Z,Y,X) volume at 0.6 um; returns the same shape.
        With a ``budget`` the planner may shorten or skip step 2 (:func:`fmc.safeguards.run_step_two`)."""
        timings = {} if timings is None else timings
        prediction = self.predict_before_dw(iso, timings, budget)
        if self.settings.difference_weighting != "none":
            with self._timed(timings, "dw", iso.device):
                prediction = weigh_differences(iso, prediction, self.settings)
        return prediction

    @torch.inference_mode()
    def predict_before_dw(
        self, iso: torch.Tensor, timings: dict[str, float] | None = None, budget: Budget | None = None
    ) -> torch.Tensor:
        """Steps 1 and 2 (the networks' part): what difference weighting then acts on."""
        timings = {} if timings is None else timings
        dev = iso.device
        step1_small = None
        if self.step1_model is not None:
            with self._timed(timings, "step1", dev):
                step1_small = self._global_step(iso)
        prediction: torch.Tensor | StepTwo = StepTwo.OFF
        if self.step2_model is not None:
            with self._timed(timings, "step2", dev):
                prediction = self._patch_step(iso, step1_small, budget)
        if not isinstance(prediction, torch.Tensor):  # step 2 off or skipped: step 1 at full resolution
            with self._timed(timings, "step1_upsample", dev):
                prediction = self._step_one_on_the_grid(iso, step1_small)
        del step1_small
        return prediction

    def _global_step(self, iso: torch.Tensor) -> torch.Tensor:
        """Step 1: the whole volume at ``global_size``^3 through RUNet_1; returns that small output
        (in "correction" mode: the output minus the network's input, the change to add).

        It is brought back to the 0.6 um grid later: patch by patch for step 2, or whole when
        step 2 does not run.
        """
        assert self.step1_model is not None
        size = (self.global_size,) * 3
        small = resample_to_shape(iso, size)
        out = self._predictor(self.step1_model)(small[None, None])[0, 0].float()
        return self.mode.change(out, small)

    def _step_one_on_the_grid(self, iso: torch.Tensor, step1_small: torch.Tensor | None) -> torch.Tensor:
        """Step 1's prediction at 0.6 um, whole: the prediction when step 2 gives none (without step 1,
        the input stands in, as in the paper's ablation)."""
        prediction = resample_to_shape(iso if step1_small is None else step1_small, iso.shape)
        if step1_small is not None:
            self.mode.apply_(prediction, iso)
        take_input_where_non_finite_(prediction, iso)
        return prediction

    def _patch_step(
        self, iso: torch.Tensor, step1_small: torch.Tensor | None, budget: Budget | None
    ) -> torch.Tensor | StepTwo:
        """Step 2: RUNet_2 on overlapping patches of [input, step-1 output], Hann-blended, under its
        safeguards (:func:`fmc.safeguards.run_step_two`: with a budget the planner may skip it)."""
        assert self.step2_model is not None
        step2 = self.step2_model
        source = self._step_two_inputs(iso, step1_small)
        channel = int(step2.card.config.get("residual_channel", 0))
        patches = StepTwoPatches(
            source,
            network=lambda tta: self._predictor(step2, tta),
            blended=lambda forward: self.mode.patch_change(forward, channel),
            stand_in=self.mode.patch_stand_in(source.step_one_channel),
            warm_up=self.config.kernels.compile is not None,
        )
        out = run_step_two(patches, self.config.tiling, self.config.tta, budget, self.step2_record)
        if out is None:
            return StepTwo.SKIPPED
        prediction = source.add_residual_(out, channel)
        take_input_where_non_finite_(prediction, iso)
        return prediction

    def _step_two_inputs(self, iso: torch.Tensor, step1_small: torch.Tensor | None) -> StepTwoInputs:
        """The channels the step-2 model takes (its card), served patch by patch."""
        assert self.step2_model is not None
        inputs = self.settings.step2_channels(int(self.step2_model.card.config.get("in_channels", 2)))
        distance_small = (
            coarse_distance_channel(iso, self.config.target_spacing) if "distance" in inputs else None
        )
        return StepTwoInputs(iso, step1_small, inputs, self.mode, distance_small)

    def _predictor(self, loaded: LoadedModel, tta: bool | None = None) -> Forward:
        """The network as a batch function (see :mod:`fmc.acceleration`), with optional test-time flips."""
        forward = self._forwards[id(loaded)]
        return with_flips(forward) if (self.config.tta if tta is None else tta) else forward


def with_flips(forward: Forward) -> Forward:
    """Test-time flips: the mean of ``forward`` on the batch and on its flips along z, y and x
    (:data:`fmc.safeguards.TTA_FLIPS` passes), each flipped back."""

    def flipped(batch: torch.Tensor) -> torch.Tensor:
        total = forward(batch)
        for dims in ((2,), (3,), (4,)):
            total = total + forward(batch.flip(dims)).flip(dims)
        return total / 4

    return flipped


def weigh_differences(iso: torch.Tensor, prediction: torch.Tensor, settings: MethodSettings) -> torch.Tensor:
    """The method's difference weighting in the form ``settings`` names (``prediction`` is reused)."""
    form = settings.difference_weighting
    if form == "paper":
        return difference_weighting_(iso, prediction, settings.max_filter)
    if form == "released":
        return released_difference_weighting_(iso, prediction)
    return prediction


StageTimer = Callable[[dict[str, float], str, torch.device], contextlib.AbstractContextManager[None]]


def to_isotropic(
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    device: torch.device,
    target_spacing: float,
    stage: StageTimer | None = None,
    timings: dict[str, float] | None = None,
) -> tuple[torch.Tensor, tuple[float, float]]:
    """The method's first step: the volume on ``device``, normalized by its (p2, p99.8) bounds and
    resampled to ``target_spacing`` isotropic; returns it and the bounds (to map back).

    ``stage`` times each part into ``timings``; without it nothing is timed."""
    timings = {} if timings is None else timings

    def timed(name: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if stage is None else stage(timings, name, device)

    with timed("to_device"):
        raw = upload(volume, device)
    with timed("normalize"):
        lo, hi = raw.percentile_bounds()
    with timed("resample_in"):
        # resampling is linear with unit-sum weights: normalizing after it is the same
        iso_shape = isotropic_shape(tuple(volume.shape), spacing, target_spacing)
        iso = resample_to_shape(raw, iso_shape).sub_(lo).div_(hi - lo if hi > lo else 1.0)
        del raw
    return iso, (lo, hi)


def add_change_on_native_grid(
    volume: np.ndarray,
    iso: torch.Tensor,
    prediction: torch.Tensor,
    bounds: tuple[float, float],
    detail: NativeDetail = UNTOUCHED,
    strength: float = 1.0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The method's last step: the change the networks made at 0.6 um (``prediction - iso``),
    brought to the input's grid and added to the native input; the input's range, uint16.

    Why not resample the prediction itself: that passes the input through the 0.6 um round trip,
    which throws away its detail finer than 0.6 um (the studies have 0.195-0.39 um pixels). Per
    voxel, in normalized units, with ``up`` the resampling to the native grid, the native input N
    (smoothed in plane by ``detail.sigma``) and the 0.6 um input I:
    ``N + strength * up(P - I) - (1 - detail.gain) * (N - up(I))``. ``detail.gain`` is the share
    of the input's own finer detail kept (:mod:`fmc.native_detail`; 0: the round trip),
    ``strength`` the safeguard's trust in the networks' change. A change of exactly zero with
    the default ``detail`` (no smoothing, gain 1) returns the input bit for bit.

    The native input is read from the host one slab at a time (the device holds no copy of it
    through the networks: 2.1 GiB for study 5). ``prediction`` is overwritten; ``out`` may be
    ``volume`` itself (each slab is read before it is written).
    """
    shape = tuple(int(n) for n in volume.shape)
    result = np.empty(shape, dtype=np.uint16) if out is None else out
    dropped = 1.0 - float(detail.gain)
    change = prediction.sub_(iso)
    round_trip = resample_slabs(iso, shape) if dropped > 0 else None
    for z0, slab in resample_slabs(change, shape):
        z1 = z0 + slab.shape[0]
        native = smooth_in_plane(normalized_planes(volume, z0, z1, bounds, slab.device), detail.sigma)
        update = slab * float(strength)
        if round_trip is not None:
            z_iso, iso_slab = next(round_trip)
            assert z_iso == z0, "the two resamplings must share their slabs"
            update.sub_(native - iso_slab, alpha=dropped)
        native.add_(update)
        result[z0:z1] = to_input_range_uint16(native, *bounds)
    return result


def round_trip_uint16(iso: torch.Tensor, shape: tuple[int, ...], bounds: tuple[float, float]) -> np.ndarray:
    """A 0.6 um volume resampled to ``shape`` in the input's range, uint16: the ``resample`` baseline."""
    result = np.empty(shape, dtype=np.uint16)
    for z0, slab in resample_slabs(iso, shape):
        result[z0 : z0 + slab.shape[0]] = to_input_range_uint16(slab, *bounds)
    return result


def check_output_array(out: np.ndarray | None, shape: tuple[int, ...]) -> None:
    """Refuse an ``out`` the prediction cannot be written into: it must be writeable uint16 of ``shape``."""
    if out is None or (out.shape == shape and out.dtype == np.uint16 and out.flags.writeable):
        return
    raise ValueError(
        f"out must be a writeable uint16 array of shape {shape}, "
        f"got {out.dtype} {out.shape} (writeable: {out.flags.writeable})"
    )
