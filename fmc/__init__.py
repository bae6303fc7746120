"""fmc: predict the multiview-fused lightsheet volume from a single view (FuseMyCells)."""

__version__ = "0.1.0"
