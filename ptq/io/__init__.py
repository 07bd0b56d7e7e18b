"""Reading model files safely: validating safetensors and GGUF readers, input checks."""

from ptq.io.safetensors_reader import SafetensorsFile, SafetensorsIndex

__all__ = ["SafetensorsFile", "SafetensorsIndex"]
