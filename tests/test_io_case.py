"""fmc.io.case: the typed case error crosses process boundaries intact."""

import pickle
from pathlib import Path

from fmc.io import (
    CaseError,
)


def test_case_error_survives_pickling():
    error = pickle.loads(pickle.dumps(CaseError(Path("/x/a.tif"), "2-D image")))
    assert (str(error), error.reason, error.path) == ("a.tif: 2-D image", "2-D image", Path("/x/a.tif"))
