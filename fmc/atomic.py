"""Files appear whole or not at all: writes go through a hidden temporary in the same folder and a rename.

Why one module: outputs, weights, cards, cache arrays and previews are all read by someone who
must never see half a file (the platform's evaluator, a training worker, a resumed run). The
temporary's name, ``.<name>.partial-<pid>``, says whose it is, so one a killed process left
behind can be told from one a live process is still writing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a hidden temporary in the same folder and rename: readers never see half a file.

    Any exception, a SIGTERM turned into one included (:mod:`fmc.infer`), removes the temporary.
    """
    path = Path(path)
    tmp = partial_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """:func:`atomic_write` through an open binary handle (``np.save``, JSON bytes)."""

    def through_handle(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            write(handle)

    atomic_write(path, through_handle)


_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)$")


def partial_name(path: Path) -> Path:
    """The hidden temporary a write of ``path`` goes through (same folder, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours from an earlier run with the same pid (a container's pid 1): we wrote nothing yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_partials(folder: Path) -> list[Path]:
    """Remove ``.<name>.partial-<pid>`` temporaries whose process is gone (a SIGKILL, a power cut)."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in Path(folder).iterdir():
            match = _PARTIAL.match(entry.name)
            if match is None or _process_alive(int(match["pid"])) or not entry.is_file():
                continue
            try:
                entry.unlink()
            except OSError as error:
                log.warning("cannot remove the stale temporary %s: %s", entry, error.strerror or str(error))
                continue
            log.warning("removed %s: a temporary left by process %s, which is gone", entry, match["pid"])
            removed.append(entry)
    return removed
