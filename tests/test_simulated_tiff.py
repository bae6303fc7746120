"""fmc.simulated_tiff: the test-file writer refuses a metadata style or key spelling it does not know."""

import pytest
from conftest import IO_SPACING, random_volume

from fmc.simulated_tiff import write_volume


def test_write_volume_rejects_unknown_style_and_spelling(tmp_path):
    with pytest.raises(ValueError, match="style"):
        write_volume(
            tmp_path / "a.tif", random_volume(), spacing=IO_SPACING, channel=None, study=None, style="xml"
        )
    with pytest.raises(ValueError, match="key_spelling"):
        write_volume(
            tmp_path / "a.tif",
            random_volume(),
            spacing=IO_SPACING,
            channel=None,
            study=None,
            key_spelling="px",
        )
