"""fmc.atomic: whole files or none, and the cleanup of temporaries that dead processes left."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from fmc.atomic import atomic_write, atomic_write_bytes, partial_name, remove_stale_partials


def test_a_failing_write_leaves_neither_the_file_nor_its_temporary(tmp_path):
    target = tmp_path / "out.tif"

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert os.listdir(tmp_path) == []


def test_writes_go_through_the_named_temporary_and_replace_the_old_file(tmp_path):
    target = tmp_path / "a.npy"
    target.write_bytes(b"old")
    seen = []
    atomic_write_bytes(
        target, lambda handle: (seen.append(sorted(os.listdir(tmp_path))), np.save(handle, np.arange(3)))
    )
    assert seen == [sorted(["a.npy", partial_name(target).name])]  # the old file stays until the rename
    assert np.load(target).tolist() == [0, 1, 2] and os.listdir(tmp_path) == ["a.npy"]


def test_stale_temporaries_of_live_processes_and_other_names_stay(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".a.tif.partial-{dead.pid}").write_bytes(b"x")
    (tmp_path / f".b.tif.partial-{os.getppid()}").write_bytes(b"x")  # a live process: maybe another run
    (tmp_path / ".notes.partial").write_bytes(b"x")
    remove_stale_partials(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [f".b.tif.partial-{os.getppid()}", ".notes.partial"]
