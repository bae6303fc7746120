"""Training of the two-step fusion model (``train.py``).

One job per module (the pairs on disk and the split are :mod:`fmc.data`'s):

- ``cache``: ``prepare`` -- resample + normalize pairs into a memory-mapped float16 cache;
- ``data`` / ``datamodule``: datasets (global volumes, random crops) and the LightningDataModule;
- ``step1_outputs``: cached step-1 predictions, the second input channel of step 2;
- ``losses``: MAE, SSIM, Pearson, cosine, adversarial;
- ``module``: the LightningModule (manual GAN optimization, pipeline-based validation);
- ``config``: the typed FitConfig (six groups, one flag per setting) and the Table 1 ablation presets;
- ``fit`` / ``export`` / ``evaluate`` / ``cli``: the subcommands.
"""
