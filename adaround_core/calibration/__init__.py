"""Calibration data: batches fed to the model, the order layers run in, capture of each
layer's inputs and targets, and the in-memory or on-disk stores AdaRound samples from."""
