"""Split: seeded 4:1 by image id, stratified by (study, channel); --val-studies holds out whole studies."""

from __future__ import annotations

from collections import Counter

from fmc.data.split import make_split, read_split, split_summary, write_split


def _cases() -> list[tuple[str, int, str, int | None]]:
    """Study 1: 10 nucleus + 5 membrane ids; study 2: 20 nucleus ids; study 3: one lonely id."""
    cases = [(f"image_{i}_nucleus", i, "nucleus", 1) for i in range(10)]
    cases += [(f"image_{i}_membrane", i, "membrane", 1) for i in range(10, 15)]
    cases += [(f"image_{i}_nucleus", i, "nucleus", 2) for i in range(100, 120)]
    cases += [("image_500_nucleus", 500, "nucleus", 3)]
    return cases


def test_split_is_four_to_one_within_every_stratum() -> None:
    rows = make_split(_cases(), val_fraction=0.2, seed=3)
    val = Counter((r.study, r.channel) for r in rows if r.subset == "val")
    assert val == {(1, "nucleus"): 2, (1, "membrane"): 1, (2, "nucleus"): 4}
    lonely = next(r for r in rows if r.image_id == 500)
    assert lonely.subset == "train"  # the only one-id stratum: its pool of one cannot validate
    assert len(rows) == len(_cases())


def test_split_is_seeded() -> None:
    first = make_split(_cases(), seed=7)
    assert first == make_split(_cases(), seed=7)
    others = [make_split(_cases(), seed=s) for s in range(8, 12)]
    assert any(
        {r.case_id for r in o if r.subset == "val"} != {r.case_id for r in first if r.subset == "val"}
        for o in others
    )


def test_split_keeps_an_image_id_on_one_side() -> None:
    cases = [(f"image_{i}_{c}", i, c, 1) for i in range(10) for c in ("nucleus", "membrane")]
    rows = make_split(cases, seed=0)
    sides = {}
    for row in rows:
        sides.setdefault(row.image_id, set()).add(row.subset)
    assert all(len(s) == 1 for s in sides.values())
    assert sum(1 for s in sides.values() if s == {"val"}) == 2


def test_val_studies_hold_out_whole_studies() -> None:
    rows = make_split(_cases(), val_studies=(2, 3))
    assert {r.subset for r in rows if r.study in (2, 3)} == {"val"}
    assert {r.subset for r in rows if r.study == 1} == {"train"}


def test_split_csv_round_trip(tmp_path) -> None:
    rows = make_split([*_cases(), ("image_900_nucleus", 900, "nucleus", None)], seed=1)
    write_split(tmp_path / "split.csv", rows)
    assert read_split(tmp_path / "split.csv") == rows
    summary = split_summary(rows)
    assert summary["val"]["study2/nucleus"] == 4


def test_one_id_strata_are_pooled_so_simulated_pairs_validate() -> None:
    """Every id in a study of its own (as fmc.simulate draws them): the pool of 10 gives 2 ids."""
    cases = [(f"image_{i}_{ch}", i, ch, i) for i in range(10) for ch in ("nucleus", "membrane")]
    rows = make_split(cases, val_fraction=0.2, seed=0)
    val_ids = {r.image_id for r in rows if r.subset == "val"}
    assert len(val_ids) == 2
    assert all(r.subset == ("val" if r.image_id in val_ids else "train") for r in rows)
    # strata of two or more ids keep the ids the split gave them before one-id strata were pooled
    # (computed with that code: [5, 9, 14, 102, 103, 105, 117]); the pool of four adds one id
    lonely = [(f"image_{i}_nucleus", i, "nucleus", 4 + i) for i in range(600, 603)]
    rows = make_split(_cases() + lonely, val_fraction=0.2, seed=3)
    val_ids = {r.image_id for r in rows if r.subset == "val"}
    assert val_ids - {500, 600, 601, 602} == {5, 9, 14, 102, 103, 105, 117}
    assert len(val_ids & {500, 600, 601, 602}) == 1
