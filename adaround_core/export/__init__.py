"""Export of a calibrated, rounded model: ONNX in QDQ form, AIMET-style encodings, and the
integer weights with their scales as safetensors."""
