"""A pytest plugin that keeps only the tests that need CUDA: ``python -m pytest -p benchmarks.cuda_tests``.

Why a plugin and not a list of test ids: the GPU check (``benchmarks.gpu_check`` part 1) must
pick up CUDA tests added later without anyone editing it. A test counts as a CUDA test when
it carries the ``cuda`` marker (pyproject.toml) or a ``skipif`` whose reason names CUDA (the
suite's CPU-vs-GPU comparisons are written ``skipif(not torch.cuda.is_available(),
reason="needs CUDA: ...")``). Everything else is deselected, so a CPU rehearsal collects the
same tests and reports them as skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

_NAMES_CUDA = re.compile(r"\bCUDA\b|\bGPU\b")
#: Text that marks a test file as holding CUDA tests; files without it are not collected at all
#: (collecting the whole suite imports Lightning, skimage, ... for nothing).
_FILE_HINTS = ("mark.cuda", "needs CUDA", "cuda.is_available()")


def needs_cuda(item: pytest.Item) -> bool:
    """True for a test marked ``cuda`` or skipped unless CUDA is there."""
    if item.get_closest_marker("cuda") is not None:
        return True
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", ""))
        if _NAMES_CUDA.search(reason):
            return True
    return False


def candidate_files(tests_dir: Path) -> list[Path]:
    """Test files whose text mentions CUDA the way CUDA tests do (cheap: no import)."""
    found = []
    for path in sorted(tests_dir.rglob("test_*.py")):
        if "container" in path.relative_to(tests_dir).parts:
            continue  # builds Docker images; never a CUDA comparison
        text = path.read_text(encoding="utf-8", errors="replace")
        if any(hint in text for hint in _FILE_HINTS):
            found.append(path)
    return found


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep = [item for item in items if needs_cuda(item)]
    dropped = [item for item in items if not needs_cuda(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep
