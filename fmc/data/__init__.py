"""Training data on disk, with no Lightning in it: what both training and the baselines read.

- ``pairs``: find ``image_{N}_{channel}_{angle|fused}`` pairs, reconcile their metadata;
- ``split``: seeded stratified train/validation split by image id, or held-out studies.
"""
