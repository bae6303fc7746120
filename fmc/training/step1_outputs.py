"""Cache of the trained step-1 network's predictions, the second input channel of step 2.

Computed with the inference pipeline's own step 1 (global_size^3 forward, upsampled to
the 0.6 um grid by fmc.resample) so step 2 trains on exactly what it will see at
inference. The folder name carries a fingerprint of the step-1 weights: retraining
step 1 never reuses stale predictions.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fmc.atomic import atomic_write_bytes
from fmc.network import RUNet
from fmc.pipeline import FusionPipeline, PipelineConfig
from fmc.training.cache import CachedCase
from fmc.weights import LoadedModel, ModelCard, ModelSet

log = logging.getLogger(__name__)


def weights_fingerprint(network: torch.nn.Module) -> str:
    """SHA-1 over the state dict (names, shapes, bytes): identical weights, identical folder."""
    digest = hashlib.sha1()
    for name, tensor in sorted(network.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def outputs_folder(run_dir: Path, fingerprint: str, global_size: int, step1_mode: str = "output") -> Path:
    """One folder per step-1 weights, global size and way of reaching the 0.6 um grid (fmc.method)."""
    suffix = "" if step1_mode == "output" else f"_{step1_mode}"
    return run_dir / "step2" / "step1_outputs" / f"{fingerprint[:16]}_g{global_size}{suffix}"


def compute_step1_outputs(
    network: RUNet,
    network_config: dict,
    cases: list[CachedCase],
    cache: Path,
    folder: Path,
    *,
    pipeline: PipelineConfig,
    device: torch.device,
) -> int:
    """Write ``<folder>/<case id>.npy`` (float16, 0.6 um grid) for each case lacking one; returns how many."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [c for c in cases if not (folder / f"{c.id}.npy").is_file()]
    if not todo:
        return 0
    card = ModelCard(step=1, preset="training", config=network_config, normalization={})
    models = ModelSet(
        step1=LoadedModel(network, card, Path("<training>")), step2=None, folder=Path("<training>")
    )
    was_training = network.training
    fusion = FusionPipeline(models, pipeline, device)
    log.info("computing step-1 outputs for %d case(s) into %s", len(todo), folder)
    with torch.inference_mode():
        for case in tqdm(todo, desc="step-1 outputs", unit="case", disable=None):
            iso = torch.from_numpy(np.asarray(case.load(cache, "input"), dtype=np.float32)).to(device)
            out = fusion.predict_isotropic(iso).to(torch.float16).cpu().numpy()
            target = folder / f"{case.id}.npy"
            atomic_write_bytes(target, lambda handle, out=out: np.save(handle, out))
    network.train(was_training)
    return len(todo)
