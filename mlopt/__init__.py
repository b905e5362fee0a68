"""mlopt: compile PyTorch and ONNX models into measured, versioned builds for every SKU in a fleet."""

__version__ = "0.1.0"
