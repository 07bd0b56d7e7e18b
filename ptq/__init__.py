"""ptq: a post-training quantization compiler for PyTorch models."""

__version__ = "0.1.0"
