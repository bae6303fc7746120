"""The method's settings that belong to a trained pair of networks, owned by their model card.

Why one typed object: a model trained and validated without difference weighting must not get
it at inference, and ``train.py evaluate`` and ``inference.py`` must run the same method on the
same weights. ``train.py export`` writes these settings into the card
(``card.training["pipeline"]``), the pipeline reads them back, and a command-line flag overrides
a setting only when it is given (the log says which source each setting came from).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

# Each choice is one Literal type; its tuple (for argparse choices and messages) is derived from it.
#: The difference weighting forms training can apply before the loss or record for inference.
TrainableDWForm = Literal["paper", "released"]
#: Difference weighting, eq. (2): as the paper's text reads, as the authors' released code does
#: it (FuseMyCells ``evaluation_doublestep``), or not at all.
DWForm = Literal[TrainableDWForm, "none"]
DW_FORMS: tuple[str, ...] = typing.get_args(DWForm)
#: How step 1's prediction reaches step 2 and the output. "output": the step-1 network's output,
#: upsampled, is the prediction (the paper). "correction": the step-1 network predicts a change
#: of its global cube, and that change, upsampled, is added to the 0.6 um input -- so networks
#: with zero heads change nothing (the output is then the input itself, fmc.pipeline), and training
#: can only add to it.
Step1Mode = Literal["output", "correction"]
STEP1_MODES: tuple[str, ...] = typing.get_args(Step1Mode)
#: Input channels step 2 can be given, in the order a card lists them: the 0.6 um input, the
#: step-1 prediction upsampled, the signed surface distance (:mod:`fmc.distance`). "image" is first.
Step2Input = Literal["image", "step1", "distance"]
STEP2_INPUTS: tuple[str, ...] = typing.get_args(Step2Input)
#: The method's grid: every volume is resampled to this isotropic spacing (um) and back.
TARGET_SPACING_UM = 0.6
#: The stained structures the challenge scores apart.
Channel = Literal["nucleus", "membrane"]
CHANNELS: tuple[str, ...] = typing.get_args(Channel)
DEFAULT_GLOBAL_SIZE = 224  # the paper's step-1 cube
DEFAULT_PATCH = 128
#: The smallest step-1 cube and step-2 patch edge; MethodSettings checks it for cards, inference.py's
#: flags and train.py fit alike.
MIN_SIZE = 8


#: Upper limits of the output's trust settings (each from 0): shares and the closeness threshold
#: (an SSIM) are at most 1, the noise weight 4 (a gain of 0 from a quarter of noise), the in-plane
#: sigma 3 voxels.
OUTPUT_SETTING_LIMITS = {
    "change_strength": 1.0,
    "close_change_strength": 1.0,
    "closeness_threshold": 1.0,
    "native_detail": 1.0,
    "detail_noise_weight": 4.0,
    "detail_sigma": 3.0,
}
#: What each output setting does, in the words of its inference.py flag (``--change-strength`` ...).
OUTPUT_SETTING_HELP = {
    "change_strength": "the safeguard: share of the networks' change added to the input",
    "close_change_strength": "the share added instead in a case whose closeness reaches "
    "--closeness-threshold",
    "closeness_threshold": "SSIM(input, prediction) at 0.6 um from which a case counts as close to its "
    "truth; 1 = no gate",
    "native_detail": "share of the input's detail finer than 0.6 um kept before its noise is weighed; "
    "0 = the 0.6 um round trip",
    "detail_noise_weight": "how fast that share falls with the detail's estimated noise; 0 = a fixed share",
    "detail_sigma": "in-plane Gaussian sigma (input voxels) on the native input before its detail is weighed",
}


def check_step2_inputs(names: tuple[str, ...]) -> None:
    """Refuse step-2 channel names the pipeline cannot build, or out of order (``image`` first, once each)."""
    unknown = [name for name in names if name not in STEP2_INPUTS]
    if unknown:
        raise ValueError(
            f"step2_inputs asks for input channel(s) {unknown} that this pipeline cannot build "
            f"(it builds {', '.join(STEP2_INPUTS)}); use weights exported by this version of train.py"
        )
    if not names or names[0] != "image" or len(set(names)) != len(names):
        raise ValueError(
            f"step2_inputs must start with 'image' and name each channel once, got {list(names)}"
        )


@dataclass(frozen=True)
class MethodSettings:
    """Settings of the method that a model was trained and validated with."""

    difference_weighting: DWForm = "paper"
    max_filter: int = 3  # the paper form's max filter on O' (odd; 1 = off)
    global_size: int = DEFAULT_GLOBAL_SIZE  # the step-1 cube's edge (>= MIN_SIZE)
    patch: int = DEFAULT_PATCH  # the step-2 patch edge (>= MIN_SIZE): see tile_patch
    step1_mode: Step1Mode = "output"
    # Step 2's input channels by name; () for cards that predate the list: see step2_channels.
    step2_inputs: tuple[Step2Input, ...] = ()
    # The native-grid output (docs/inference.md, "The method"): the change predicted at 0.6 um is added to
    # the native input. The share of the input's detail finer than the 0.6 um grid kept per case
    # (fmc.native_detail) is clip(native_detail - detail_noise_weight * that detail's noise share,
    # 0, 1): the defaults (1, 0) keep all of it; native_detail 0 is the 0.6 um round trip.
    native_detail: float = 1.0
    detail_noise_weight: float = 0.0
    # In-plane Gaussian sigma (input voxels) on the native input before its detail is weighed; 0: none.
    detail_sigma: float = 0.0
    # The safeguard (fmc.change_gate): the networks' change is scaled by change_strength before it
    # is added (1: all; 0: none), or by close_change_strength in a case whose closeness
    # (SSIM(input, prediction) at 0.6 um) is at least closeness_threshold; a threshold of 1: no gate.
    change_strength: float = 1.0
    close_change_strength: float = 1.0
    closeness_threshold: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "step2_inputs", tuple(self.step2_inputs))  # JSON gives a list
        if self.step2_inputs:
            check_step2_inputs(self.step2_inputs)
        if self.difference_weighting not in DW_FORMS:
            raise ValueError(
                f"difference_weighting must be one of {DW_FORMS}, got {self.difference_weighting!r}"
            )
        if self.step1_mode not in STEP1_MODES:
            raise ValueError(f"step1_mode must be one of {STEP1_MODES}, got {self.step1_mode!r}")
        if self.max_filter < 1 or self.max_filter % 2 == 0:
            raise ValueError(f"max_filter must be odd and >= 1, got {self.max_filter}")
        for name, top in OUTPUT_SETTING_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= top:
                raise ValueError(f"{name} must be a number in [0, {top:g}], got {value!r}")
        for name in ("global_size", "patch"):  # one message each, so a caller can name its flag
            if getattr(self, name) < MIN_SIZE:
                raise ValueError(f"{name} must be >= {MIN_SIZE}, got {getattr(self, name)}")

    def tile_patch(self, flag: int | None = None) -> tuple[int, int, int]:
        """The step-2 patch (z, y, x) to tile with: ``flag`` when given (checked as a setting:
        ``patch must be >= 8``), else these settings' (the card's, else DEFAULT_PATCH).

        Why here: the patch is a setting of the card like the others, so inference.py and
        ``train.py evaluate`` resolve it by the same "None means the card's value" rule.
        """
        edge = self.override(patch=flag).patch
        return (edge, edge, edge)

    def step2_channels(self, in_channels: int) -> tuple[str, ...]:
        """The channels to build for a step-2 network of ``in_channels`` inputs. Cards without the
        list meant the input alone (1) or [input, step-1 output] (2)."""
        names = self.step2_inputs or STEP2_INPUTS[: min(in_channels, 2)]
        if len(names) != in_channels:
            raise ValueError(
                f"step2_inputs lists {len(names)} channel(s) {list(names)} "
                f"but the step-2 network takes {in_channels}"
            )
        return names

    def to_card(self) -> dict[str, Any]:
        """The JSON the card stores."""
        record = dataclasses.asdict(self)
        record["step2_inputs"] = list(self.step2_inputs)
        return record

    @classmethod
    def from_card(cls, stored: dict[str, Any]) -> MethodSettings:
        """Read a card's settings; cards written before the forms existed stored DW as a bool."""
        values = {f.name: stored[f.name] for f in dataclasses.fields(cls) if f.name in stored}
        dw = values.get("difference_weighting")
        if isinstance(dw, bool):
            values["difference_weighting"] = "paper" if dw else "none"
        return cls(**values)

    def override(self, **flags: Any) -> MethodSettings:
        """These settings with every flag that is not None put in their place."""
        return dataclasses.replace(self, **{k: v for k, v in flags.items() if v is not None})

    def describe(self, sources: dict[str, str] | None = None) -> str:
        """One phrase for the log, e.g. ``dw=none (card) max_filter=3 (card) ...``."""
        sources = sources or {}
        parts = []
        for f in dataclasses.fields(self):
            origin = sources.get(f.name)
            parts.append(f"{f.name}={getattr(self, f.name)}" + (f" ({origin})" if origin else ""))
        return " ".join(parts)
