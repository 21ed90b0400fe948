"""litefocus.export: static per-bucket ONNX / TensorRT export of a LiteFocus UNet (issue 3)."""
