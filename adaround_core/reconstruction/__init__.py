"""Reconstruction: AdaRound's equations, the per-layer optimisation, the model-level
``weight_reconstruction`` and its validated configuration."""
