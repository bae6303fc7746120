"""How a network runs on the device: precision, memory layout, cuDNN autotuning, torch.compile.

Why a separate module: these are the knobs the performance work measures one by one
(``benchmarks/bench_kernels.py``); inference and the benchmark must build the forward
function the same way. The default precision, ``auto``, is float16 weights on CUDA (faster than
float32 for a negligible change of N_SSIM; figures: docs/performance.md) and float32 elsewhere.
Options a CPU cannot use (fp16, cuDNN) fall back to float32 with a warning instead of failing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "fp16-weights")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CUDA_ONLY_PRECISIONS = ("fp16", "fp16-weights")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")

Forward = Callable[[torch.Tensor], torch.Tensor]
#: Precisions whose arithmetic can overflow where float32 does not (float16's range ends at 65504).
HALF_PRECISIONS = ("fp16", "fp16-weights")
_last_precision: list[str] = []  # the precision the most recent forward ran with (one entry)


def last_forward_was_float16() -> bool:
    """Whether the most recent network forward ran in float16, so a non-finite output may be an
    overflow (and --precision fp32 the cure) rather than broken weights or input."""
    return bool(_last_precision) and _last_precision[0] in HALF_PRECISIONS


@dataclass(frozen=True)
class KernelOptions:
    """Execution options for the networks.

    ``precision``: ``fp32`` (cuDNN may use TF32 for convolutions, PyTorch's default), ``bf16`` or
    ``fp16`` autocast, ``fp16-weights`` (the whole network cast to float16, no autocast), or
    ``auto``: ``fp16-weights`` on CUDA, ``fp32`` elsewhere.
    ``channels_last``: channels_last_3d memory format; None picks per device: on for a CPU
    (1.55x on the sample case's step 2, same output to 1 uint16 step), off for CUDA
    (docs/performance.md, Anchors: slower with fp16 on an H100). ``cudnn_benchmark``: let cuDNN time its
    algorithms per input shape. ``compile``: a ``torch.compile`` mode, or None for eager.
    """

    precision: str = "auto"
    channels_last: bool | None = None
    cudnn_benchmark: bool = False
    compile: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be None or one of {COMPILE_MODES}, got {self.compile!r}")

    @property
    def needs_cuda(self) -> bool:
        """Whether any option here only exists on CUDA (a CPU runs float32 / without cuDNN instead)."""
        return self.precision in CUDA_ONLY_PRECISIONS or self.cudnn_benchmark

    def describe(self) -> str:
        """Short label for logs and benchmark rows, e.g. ``fp16-weights+channels_last+compile(default)``."""
        parts = [self.precision]
        if self.channels_last:
            parts.append("channels_last")
        if self.cudnn_benchmark:
            parts.append("cudnn_benchmark")
        if self.compile:
            parts.append(f"compile({self.compile})")
        return "+".join(parts)


def effective_options(options: KernelOptions, device: torch.device) -> KernelOptions:
    """The options as they will run on ``device``: ``auto`` precision and an unset
    ``channels_last`` become the device's defaults; fp16 and cuDNN need CUDA, else float32 / off."""
    cuda = device.type == "cuda"
    channels_last = (not cuda) if options.channels_last is None else options.channels_last
    if options.precision == "auto":
        options = replace(options, precision="fp16-weights" if cuda else "fp32")
    if cuda:
        return replace(options, channels_last=channels_last)
    precision = options.precision
    if precision in CUDA_ONLY_PRECISIONS:
        log.warning("%s needs CUDA; running the networks in float32 on %s", precision, device.type)
        precision = "fp32"
    return KernelOptions(precision, channels_last, False, options.compile)


def build_forward(network: nn.Module, options: KernelOptions, device: torch.device) -> Forward:
    """A batch function ``(B, C, Z, Y, X) -> float32 (B, C_out, Z, Y, X)`` running ``network`` as asked.

    Modifies ``network`` in place (device, dtype, memory format) and switches the process-wide
    ``cudnn.benchmark`` flag on when asked. With ``compile``, the first call of each new input
    shape compiles; the compile time is logged.
    """
    wanted, options = options, effective_options(options, device)
    if options != wanted:
        log.info("networks run as %s on %s (asked: %s)", options.describe(), device.type, wanted.describe())
    network.to(device).eval()
    if device.type == "cuda" and options.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True  # only switched on: a caller's own setting stays
    input_dtype = torch.float32
    if options.precision == "fp16-weights":
        network.half()
        input_dtype = torch.float16
    memory_format = torch.channels_last_3d if options.channels_last else torch.contiguous_format
    if options.channels_last:
        network.to(memory_format=torch.channels_last_3d)
    autocast = AUTOCAST_DTYPES.get(options.precision)
    module: Callable[[torch.Tensor], torch.Tensor] = network
    if options.compile:
        module = torch.compile(network, mode=options.compile, dynamic=False)
    seen_shapes: set[tuple[int, ...]] = set()

    def forward(batch: torch.Tensor) -> torch.Tensor:
        _last_precision[:] = [options.precision]
        x = batch.to(dtype=input_dtype).contiguous(memory_format=memory_format)
        first = options.compile is not None and tuple(x.shape) not in seen_shapes
        start = time.perf_counter()
        if autocast is None:
            out = module(x)
        else:
            with torch.autocast(device.type, dtype=autocast):
                out = module(x)
        if first:
            seen_shapes.add(tuple(x.shape))
            log.info(
                "torch.compile(%s) for input %s: %.1f s",
                options.compile,
                tuple(x.shape),
                time.perf_counter() - start,
            )
        return out.float().contiguous()

    return forward
