"""Quantization primitives and layers: the fake-quant math, observers, quantizers, quantized
Conv/Linear layers, BatchNorm folding, ``prepare_qat_fx`` and the model-mode switches."""
