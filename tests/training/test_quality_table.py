"""train.py table's rows for a patch-only model (no step 1): 'patch only' rows, no step-1 rows."""

from __future__ import annotations

from pathlib import Path

import torch

from fmc.network import RUNet, preset
from fmc.normalization import CARD_NORMALIZATION
from fmc.training.quality_table import score_family
from fmc.weights import ModelCard, save_model


def test_a_patch_only_model_gets_patch_only_rows_and_no_step_one_rows(sim_data: Path, tmp_path: Path) -> None:
    family = tmp_path / "family"
    family.mkdir()
    for kind in ("angle", "fused"):
        name = f"image_0_nucleus_{kind}.tif"
        (family / name).write_bytes((sim_data / name).read_bytes())
    torch.manual_seed(0)
    config = preset("tiny", in_channels=1)
    card = ModelCard(
        step=2,
        preset="tiny",
        config=config.to_dict(),
        normalization=dict(CARD_NORMALIZATION),
        training={"pipeline": {"patch": 16, "step1": False, "difference_weighting": "none"}},
    )
    save_model(tmp_path / "weights" / "any" / "step2", RUNet(config), card)
    rows = score_family(tmp_path / "weights", family, "held-out", torch.device("cpu"), overlap=0.0)
    methods = {r["method"] for r in rows}
    assert {"patch only", "patch only + DW (paper)", "patch only + DW (released)", "resample"} <= methods
    assert not any(m.startswith("step 1") or m.startswith("two steps") for m in methods)
