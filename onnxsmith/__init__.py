"""onnxsmith: an ONNX graph-rewriting optimizer with verified passes."""

__version__ = "0.1.0"
