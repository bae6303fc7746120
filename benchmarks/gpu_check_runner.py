"""Run a command in a process group of its own, stream its output, kill the whole group at a timeout.

Why a process group: a part of the GPU check starts children of its own (pytest, inference.py,
Lightning's workers); killing only the part would leave them on the GPU, holding memory the
next part needs. ``start_new_session`` makes the part the leader of a group that one
``killpg`` ends, children included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TextIO

log = logging.getLogger("gpu_check")

#: Seconds the group gets after SIGTERM (to remove its temporaries), then after SIGKILL.
STOP_WAITS = ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0))


@dataclass(frozen=True)
class GroupRun:
    """How a command run by :func:`run_in_own_group` ended."""

    returncode: int | None
    timed_out: bool
    seconds: float


def run_in_own_group(
    command: list[str],
    *,
    label: str,
    cwd: Path,
    timeout: float,
    sinks: list[TextIO],
    lock: threading.Lock,
    env: dict[str, str] | None = None,
) -> GroupRun:
    """Run ``command`` as the leader of a new session, its stdout and stderr copied line by line to
    every sink (under ``lock``, which other writers of those sinks share); kill the group at
    ``timeout`` seconds, and on any exception here (Ctrl-C, SIGTERM turned into one). ``label``
    names the command in the log."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    reader = threading.Thread(target=_copy_lines, args=(process.stdout, sinks, lock), daemon=True)
    reader.start()
    timed_out = False
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        log.warning("%s ran past its %.0f s: killing its process group", label, timeout)
        kill_group(process)
    except BaseException:
        kill_group(process)  # never leave a GPU job behind
        raise
    reader.join(timeout=10)
    return GroupRun(process.returncode, timed_out, round(time.perf_counter() - start, 3))


def _copy_lines(pipe: IO[str], sinks: list[TextIO], lock: threading.Lock) -> None:
    for line in pipe:
        with lock:
            for sink in sinks:
                sink.write(line)
                sink.flush()


def kill_group(process: subprocess.Popen) -> None:
    """SIGTERM the process's group, then SIGKILL it if it has not gone in time."""
    for sig, wait in STOP_WAITS:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
