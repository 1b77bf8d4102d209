"""Entry points: check convertibility and convert an ONNX model to an :class:`OnnxModule`."""

from __future__ import annotations

import onnx

from .module import OnnxModule
from .nodes import iter_all_nodes, op_key
from .ops import UnsupportedOp, is_supported


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Op types (including those in If/Loop/Scan bodies and local functions) with no converter.

    Non-default domains are reported as ``domain::OpType``. An empty list means :func:`to_torch`
    will not raise :class:`~compression.converter.ops.UnsupportedOp`.
    """
    local_functions = {(f.domain, f.name) for f in model.functions}
    graphs = [model.graph]
    missing: set[str] = set()
    for graph in graphs:
        for node in iter_all_nodes(graph):
            if (node.domain, node.op_type) in local_functions:
                continue
            if not is_supported(node.op_type, node.domain):
                missing.add(op_key(node.op_type, node.domain))
    for function in model.functions:
        for node in function.node:
            if (node.domain, node.op_type) in local_functions:
                continue
            if not is_supported(node.op_type, node.domain):
                missing.add(op_key(node.op_type, node.domain))
    return sorted(missing)


def to_torch(model: onnx.ModelProto) -> OnnxModule:
    """Convert ``model`` to a trainable :class:`OnnxModule` (in eval mode).

    Raises :class:`~compression.converter.ops.UnsupportedOp` listing every op type without a
    converter, before doing any work.
    """
    missing = unsupported_ops(model)
    if missing:
        raise UnsupportedOp(missing)
    return OnnxModule(model)
