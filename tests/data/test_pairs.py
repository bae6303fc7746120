"""Pairing by file name and metadata reconciliation (fused spacing wins)."""

from __future__ import annotations

from pathlib import Path

from fmc.data.pairs import PairedFiles, find_pairs, reconcile
from fmc.io import CaseMetadata


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).write_bytes(b"")


def test_find_pairs_reports_what_it_cannot_pair(tmp_path: Path) -> None:
    _touch(
        tmp_path,
        "image_1_nucleus_angle.tif",
        "image_1_nucleus_fused.tif",
        "image_2_membrane_angle.TIFF",
        "image_2_membrane_fused.tiff",
        "image_3_nucleus_angle.tif",  # no fused
        "image_4_membrane_fused.tif",  # no angle
        "notes.tif",  # bad name
        "image_5_nucleus_mip.png",  # not a TIFF: ignored
    )
    search = find_pairs(tmp_path)
    assert [(p.image_id, p.channel) for p in search.pairs] == [(1, "nucleus"), (2, "membrane")]
    assert search.pairs[1].case_id == "image_2_membrane"
    reasons = {path.name: reason for path, reason in search.unpaired}
    assert set(reasons) == {"image_3_nucleus_angle.tif", "image_4_membrane_fused.tif", "notes.tif"}
    assert reasons["image_3_nucleus_angle.tif"] == "no fused file"
    assert reasons["image_4_membrane_fused.tif"] == "no angle file"


def _meta(spacing, valid=True, channel="nucleus", study=1) -> CaseMetadata:
    return CaseMetadata(
        spacing=spacing,
        spacing_valid=valid,
        channel=channel,
        study=study,
        unit="um",
        raw={},
        sources={},
        dtype="uint16",
    )


def test_reconcile_takes_the_fused_spacing_and_warns() -> None:
    pair = PairedFiles(213, "nucleus", Path("a.tif"), Path("f.tif"))
    result = reconcile(pair, _meta((2.0, 0.4, 0.4), study=None), _meta((1.0, 0.195, 0.195), study=1))
    assert result.spacing == (1.0, 0.195, 0.195) and result.spacing_source == "fused"
    assert result.study == 1
    assert any("spacing differs" in w for w in result.warnings)


def test_reconcile_falls_back_to_the_angle_when_fused_has_no_spacing() -> None:
    pair = PairedFiles(7, "membrane", Path("a.tif"), Path("f.tif"))
    result = reconcile(
        pair,
        _meta((1.0, 0.39, 0.39), channel="membrane"),
        _meta((0.6, 0.6, 0.6), valid=False, channel="nucleus"),
    )
    assert result.spacing == (1.0, 0.39, 0.39) and result.spacing_source == "angle"
    assert any("channel 'nucleus'" in w for w in result.warnings)


def test_reconcile_is_silent_when_files_agree() -> None:
    pair = PairedFiles(7, "nucleus", Path("a.tif"), Path("f.tif"))
    result = reconcile(pair, _meta((1.0, 0.39, 0.39)), _meta((1.0, 0.39, 0.39)))
    assert result.warnings == []
