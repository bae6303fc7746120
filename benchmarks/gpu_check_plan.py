"""gpu_check's plan: the seven parts in order of value, their limits, and what each part process is told.

Why a module of its own: the orchestrator needs the plan (limits, expected seconds, file names)
without importing the parts' code, and the plan's total is what a test holds to the issue's
ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: The issue's ceiling for the plan's expected total on an H200-class GPU.
PLAN_CEILING_SECONDS = 480.0
#: The whole run's own deadline: under the device tool's 600 s per command, with room to copy
#: the results out after it.
DEFAULT_TOTAL_SECONDS = 560.0


@dataclass(frozen=True)
class Part:
    """One part of the check: its limit in a real run and what it should take on an H200."""

    number: int
    name: str
    title: str
    limit_seconds: float
    expected_h200_seconds: float

    @property
    def filename(self) -> str:
        return f"part{self.number}_{self.name}.json"


#: In order of value: a CUDA path that is wrong matters more than how fast it is.
PARTS: tuple[Part, ...] = (
    Part(1, "cuda_tests", "CUDA tests + inference.py on CUDA vs CPU (same case, default weights)", 120, 60),
    Part(2, "study5", "study 5 end to end (paper preset, random weights, default settings)", 150, 60),
    Part(3, "study5_cap15", "study 5 under --gpu-memory-gib 15: same bytes as part 2?", 90, 35),
    Part(4, "compare", "compare: study 1 full size, study 5 half scale, vs published style", 180, 100),
    Part(5, "kernels", "bench_kernels: paper preset, 2x128^3, eager options + torch.compile", 120, 60),
    Part(6, "training", "train.py fit, step 1 then step 2 (DDP/NCCL, 1 GPU), bf16-mixed, paper", 150, 90),
    Part(7, "overlap", "the step-2 overlap that meets the 20 s study-5 target", 90, 35),
)
PARTS_BY_NUMBER = {part.number: part for part in PARTS}


def plan_total_seconds(parts: tuple[Part, ...] = PARTS) -> float:
    """Expected seconds of the whole run on an H200 (the issue allows 480)."""
    return float(sum(part.expected_h200_seconds for part in parts))


def plan_lines(parts: tuple[Part, ...], total_seconds: float) -> list[str]:
    """The plan as text: each part's limit and expected H200 seconds, then the totals."""
    lines = [f"{'part':<5}{'limit s':>9}{'H200 s':>9}  what"]
    for part in parts:
        lines.append(
            f"{part.number:<5}{part.limit_seconds:>9.0f}{part.expected_h200_seconds:>9.0f}  {part.title}"
        )
    lines.append(
        f"expected total on an H200: {plan_total_seconds(parts):.0f} s "
        f"(ceiling {PLAN_CEILING_SECONDS:.0f} s); "
        f"the run stops at {total_seconds:.0f} s whatever the limits add up to"
    )
    return lines


@dataclass(frozen=True)
class Settings:
    """What every part process is told: where to write, where to work, device and scale."""

    out: Path
    work: Path
    device: str
    quick: bool
    preset: str

    @property
    def case_preset(self) -> str:
        return "tiny" if self.quick else self.preset

    @property
    def quick_inference_args(self) -> list[str]:
        """inference.py flags that make a rehearsal case take seconds on 2 CPU cores."""
        return ["--patch", "16", "--global-size", "16"] if self.quick else []

    def part_argv(self, number: int) -> list[str]:
        """gpu_check's own flags that run part ``number`` alone, in a process of its own."""
        return [
            "--run-part", str(number), "--out", str(self.out), "--work", str(self.work),
            "--device", self.device, "--preset", self.preset, *(["--quick"] if self.quick else []),
        ]  # fmt: skip
