"""The vitq version, apart so that the checkpoint and ONNX writers can record it without importing the package's
public API."""

__version__ = "0.1.0"
