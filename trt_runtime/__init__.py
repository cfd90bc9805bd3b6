"""TensorRT: ONNX export of the quantized text transformer, engine build, engine cache, engine execution."""
