"""ONNX export of decoder LMs (MatMulNBits / QDQ) and ONNX Runtime generation."""

from ptq.exporters.onnx.export import export_onnx
from ptq.exporters.onnx.runtime import run_onnx

__all__ = ["export_onnx", "run_onnx"]
