"""ONNX -> trainable PyTorch converter.

Weights of Conv/ConvTranspose/Gemm/MatMul become real ``nn.Conv*d``/``nn.Linear`` layers, other
float initializers become ``nn.Parameter``s, and :meth:`OnnxModule.write_back` puts trained values
back into the unchanged original graph. Ops live in a registry (:func:`register_op`), so coverage
is extended by adding one decorated function.
"""

from .convert import to_torch, unsupported_ops
from .module import OnnxModule
from .ops import UnsupportedOp, get_op, register_op, supported_ops

__all__ = [
    "OnnxModule",
    "UnsupportedOp",
    "get_op",
    "register_op",
    "supported_ops",
    "to_torch",
    "unsupported_ops",
]
