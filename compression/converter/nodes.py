"""Plain-data view of ONNX nodes and graphs used by the converter.

Nodes are turned into :class:`NodeSpec` objects holding only picklable Python values (ints, floats,
strings, numpy arrays, compiled subgraphs). The converted module stores these specs instead of
closures, so it survives ``copy.deepcopy`` (used by pruning/quantization tools) and ``torch.save``.
"""

from __future__ import annotations

import re
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import AttributeProto, numpy_helper

DEFAULT_DOMAINS = ("", "ai.onnx")

# ONNX TensorProto.DataType -> torch dtype (only the types torch can represent).
ONNX_TO_TORCH_DTYPE: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT16: torch.uint16,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.UINT32: torch.uint32,
    onnx.TensorProto.UINT64: torch.uint64,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
}


def op_key(op_type: str, domain: str = "") -> str:
    """Registry key of an op: the bare op type for the default domain, ``domain::op`` otherwise."""
    return op_type if domain in DEFAULT_DOMAINS else f"{domain}::{op_type}"


def torch_dtype(onnx_type: int) -> torch.dtype:
    try:
        return ONNX_TO_TORCH_DTYPE[onnx_type]
    except KeyError:
        name = onnx.TensorProto.DataType.Name(onnx_type)
        raise NotImplementedError(f"ONNX tensor type {name} has no torch equivalent") from None


def tensor_to_numpy(t: onnx.TensorProto) -> np.ndarray:
    """Decode a TensorProto to a writable numpy array (bfloat16 is widened to float32 bits-exactly)."""
    if t.data_type == onnx.TensorProto.BFLOAT16:
        raw = numpy_helper.to_array(t)
        return np.asarray(raw, dtype=np.float32)
    return np.array(numpy_helper.to_array(t), copy=True)


def tensor_to_torch(t: onnx.TensorProto) -> torch.Tensor:
    arr = tensor_to_numpy(t)
    if arr.dtype == object:
        raise NotImplementedError(f"string tensor {t.name!r} cannot be represented in torch")
    out = torch.from_numpy(arr)
    if t.data_type == onnx.TensorProto.BFLOAT16:
        out = out.to(torch.bfloat16)
    return out


@dataclass
class SubGraph:
    """A compiled subgraph (``If`` branches): ordered nodes, its own constants and its outputs."""

    nodes: list[NodeSpec]
    constants: dict[str, str]  # ONNX value name -> buffer key in OnnxModule.consts
    outputs: list[str]


@dataclass
class NodeSpec:
    """One ONNX node in plain data, plus converter-private ``extra`` state set at build time.

    ``impl`` is the registry key actually executed; it differs from ``op_type`` when the builder
    rewrote the node (e.g. an Add whose bias was fused into the preceding Linear runs as Identity).
    """

    op_type: str
    domain: str
    name: str
    key: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    opset: int
    impl: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.impl:
            self.impl = op_key(self.op_type, self.domain)

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


def attribute_value(attr: AttributeProto) -> Any:
    """Convert an attribute to plain Python (strings decoded, tensors to numpy, graphs kept as protos)."""
    kind = attr.type
    if kind == AttributeProto.FLOAT:
        return float(attr.f)
    if kind == AttributeProto.INT:
        return int(attr.i)
    if kind == AttributeProto.STRING:
        return attr.s.decode("utf-8")
    if kind == AttributeProto.FLOATS:
        return [float(v) for v in attr.floats]
    if kind == AttributeProto.INTS:
        return [int(v) for v in attr.ints]
    if kind == AttributeProto.STRINGS:
        return [s.decode("utf-8") for s in attr.strings]
    if kind == AttributeProto.TENSOR:
        return tensor_to_numpy(attr.t)
    if kind == AttributeProto.GRAPH:
        return attr.g
    if kind == AttributeProto.GRAPHS:
        return list(attr.graphs)
    raise NotImplementedError(f"attribute {attr.name!r} of type {kind} is not supported")


def sanitize(name: str, taken: set[str], fallback: str) -> str:
    """Make ``name`` a valid, unique ``nn.Module``/``ParameterDict`` key (``[A-Za-z0-9_]``, no clashes)."""
    base = re.sub(r"[^0-9A-Za-z_]", "_", name).strip("_") or fallback
    if base[0].isdigit():
        base = f"n_{base}"
    key, i = base, 1
    while key in taken or key in _RESERVED:
        key, i = f"{base}_{i}", i + 1
    taken.add(key)
    return key


# Attribute names of nn.Module / ModuleDict / ParameterDict: keys equal to these are rejected by torch.
_RESERVED = frozenset(
    name for cls in (torch.nn.ModuleDict, torch.nn.ParameterDict) for name in dir(cls)
)


def iter_subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == AttributeProto.GRAPHS:
            yield from attr.graphs


def iter_all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` including nodes of nested subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for sub in iter_subgraphs(node):
            yield from iter_all_nodes(sub)


def subgraph_outer_refs(graph: onnx.GraphProto) -> set[str]:
    """Value names a subgraph reads from enclosing scopes (needed for use counts and liveness)."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        defined.update(o for o in node.output if o)
    for node in graph.node:
        used.update(i for i in node.input if i)
        for sub in iter_subgraphs(node):
            used |= subgraph_outer_refs(sub)
    used.update(o.name for o in graph.output)
    return used - defined


def node_inputs_with_subgraphs(node: onnx.NodeProto) -> list[str]:
    names = [i for i in node.input if i]
    for sub in iter_subgraphs(node):
        names.extend(sorted(subgraph_outer_refs(sub)))
    return names


def topological_order(nodes: Iterable[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Kahn's algorithm (stable): ONNX requires sorted graphs but some tools emit unsorted ones."""
    nodes = list(nodes)
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if out:
                producer[out] = i
    deps: list[set[int]] = []
    users: dict[int, list[int]] = defaultdict(list)
    for i, node in enumerate(nodes):
        d = {producer[n] for n in node_inputs_with_subgraphs(node) if n in producer and n not in available}
        d.discard(i)
        deps.append(d)
        for j in d:
            users[j].append(i)
    ready = deque(i for i, d in enumerate(deps) if not d)
    order: list[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for u in users[i]:
            deps[u].discard(i)
            if not deps[u]:
                ready.append(u)
    if len(order) != len(nodes):
        stuck = [nodes[i].name or nodes[i].op_type for i in range(len(nodes)) if i not in set(order)]
        raise ValueError(f"ONNX graph has a cycle or dangling inputs near nodes {stuck[:5]}")
    return [nodes[i] for i in order]


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            return int(imp.version)
    return onnx.defs.onnx_opset_version()


def opsets(model: onnx.ModelProto) -> dict[str, int]:
    out = {imp.domain: int(imp.version) for imp in model.opset_import}
    out.setdefault("", default_opset(model))
    return out
