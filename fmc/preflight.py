"""Checks a run makes before any fusing: the input folder, where the outputs go, and the side files.

Why before: fusing takes minutes per case, and a fault found only at the end (a report path that
is a folder, an output folder that is the input folder) either loses that work or, worse,
overwrites what the user gave us. Each check raises :class:`PreflightError`, whose text is the
one line the run logs before it stops.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from fmc.io import OutputError, check_writable_folder, list_cases

PREVIEW_SUFFIX = "_preview.png"


class PreflightError(Exception):
    """A run that cannot start: ``str(error)`` is one line naming the path and the fault."""


def _reason(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


def list_inputs(folder: Path) -> list[Path]:
    """The input TIFFs (unreadable names included, so each gets its error line).

    Why not :func:`fmc.io.list_cases` alone: a folder that exists but cannot be listed (mode 700,
    another user) raised a PermissionError traceback instead of saying so.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    try:
        return list_cases(folder, include_unreadable=True)
    except OSError as error:
        raise PreflightError(f"cannot list the input folder {folder}: {_reason(error)}") from None


def check_output_outside_input(input_dir: Path, output_dir: Path) -> None:
    """Refuse an output folder equal to, or inside, the input folder.

    Why: outputs keep the input's file names, so ``--output`` equal to ``--input`` replaces every
    input by its prediction, and an output folder inside it mixes predictions into the inputs of
    a later run.
    """
    source, target = Path(input_dir).resolve(), Path(output_dir).resolve()
    if target == source:
        raise PreflightError(
            f"--output {output_dir} is the input folder: every input would be replaced by its "
            "output; choose another folder (or pass --allow-output-in-input)"
        )
    if target.is_relative_to(source):
        raise PreflightError(
            f"--output {output_dir} is inside the input folder {input_dir}: choose a folder outside "
            "it (or pass --allow-output-in-input)"
        )


def side_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot take a side file (report, preview) by write-and-rename, or None.

    Only a regular file (or nothing, or a symbolic link, which the rename replaces) may be there:
    a rename onto a FIFO or a device would silently turn it into a regular file.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None  # nothing there, or a dangling link the rename replaces
    except OSError as error:
        return _reason(error)
    if stat.S_ISDIR(mode):
        return "a folder of that name is in the way"
    if not stat.S_ISREG(mode):
        return f"it is a {_kind(mode)}, not a regular file; only regular files are replaced"
    return None


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def prepare_side_file(path: Path, flag: str) -> None:
    """Make ``path``'s folder if needed and prove a file can be made there, as for the output folder.

    ``flag`` names the option in the error line (``--report``).
    """
    path = Path(path)
    problem = side_file_problem(path)
    if problem is None:
        problem = _folder_problem(path.parent)
    if problem is not None:
        raise PreflightError(f"{flag} {path}: cannot write it: {problem}")


def _folder_problem(folder: Path) -> str | None:
    """What stops a file being made in ``folder`` (the output folder's own check), or None."""
    try:
        check_writable_folder(folder)
    except OutputError as error:
        return f"{error.path}: {error.reason}"
    return None


def preview_paths(cases: Iterable[Path], output_dir: Path) -> dict[Path, Path]:
    """Each case's preview file: ``<stem>_preview.png``, or ``<stem>_<suffix>_preview.png`` where two
    inputs share a stem (``a.tif`` and ``a.tiff``), so one preview never overwrites another's."""
    cases = list(cases)
    stems: dict[str, int] = {}
    for case in cases:
        stems[case.stem] = stems.get(case.stem, 0) + 1
    paths = {}
    for case in cases:
        name = case.stem if stems[case.stem] == 1 else f"{case.stem}_{case.suffix.lstrip('.')}"
        paths[case] = Path(output_dir) / f"{name}{PREVIEW_SUFFIX}"
    return paths
