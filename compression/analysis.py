"""Static facts about an ONNX model: its inputs and outputs, parameters, nonzeros, and MACs per sample.

MACs are counted from *measured* shapes: the model is run once at batch 1 in ONNX Runtime with the
inputs and outputs of every Conv/Gemm/MatMul exposed as extra outputs, so dynamic shapes (sequence
lengths, reshapes the shape inference cannot follow) are counted as they really execute.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

_WEIGHT_TYPES = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE,
    onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
}
_QPARAM_OPS = {"QuantizeLinear", "DequantizeLinear"}
# Operands that configure an op rather than hold learned values: a float Resize ``scales`` [1, 1, 2, 2] or a
# Clip bound is a setting, not a parameter, whether it sits in an initializer or (as paddle2onnx writes
# everything) in a Constant node. Integer shapes, axes and pads are not weight types in the first place.
_CONFIG_INPUTS = {"Resize": {1, 2}, "Upsample": {1}, "Clip": {1, 2}, "Pad": {1, 2, 3}}
_CONV_OPS = {"Conv", "ConvInteger", "ConvTranspose"}
_MATMUL_OPS = {"MatMul", "MatMulInteger", "Gemm", "MatMulNBits"}
# metadata_props key under which quantization's packing records the weights it packed (codes name -> entry)
PACKED_KEY = "netcompress.packed_weights"


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _constant_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and ``Constant`` nodes' tensors (some exporters keep weights there), by value name."""
    out = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    t = a.t
                    if t.name != n.output[0]:  # the node's output names the value, not the tensor inside
                        t = onnx.TensorProto()
                        t.CopyFrom(a.t)
                        t.name = n.output[0]
                    out[t.name] = t
    return out


def _config_only(graph: onnx.GraphProto) -> set[str]:
    """Values every use of which is a configuring operand (:data:`_CONFIG_INPUTS`)."""
    config, data = set(), set()
    for n in graph.node:
        for i, name in enumerate(n.input):
            (config if i in _CONFIG_INPUTS.get(n.op_type, ()) else data).add(name)
    return config - data


def weight_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Tensors that hold learned values — initializers and ``Constant`` nodes' tensors alike, each once
    however many nodes use it — but not shapes, not quantization scales/zero points and not settings.

    What counts: a tensor of a weight type (float, float16/bfloat16, int8/uint8, int4/uint4; int32 only when
    ``DequantizeLinear`` decodes it: a quantized bias) with two or more elements, that is not a
    Quantize/DequantizeLinear scale or zero point and not used only as a configuring operand (Resize scales,
    Clip bounds, Pad values). Scalars and integer shape constants never count.
    """
    for g in _graphs(model.graph):
        not_learned = {n.input[i] for n in g.node if n.op_type in _QPARAM_OPS for i in (1, 2) if len(n.input) > i}
        not_learned |= _config_only(g)
        # int32 tensors dequantized by DequantizeLinear are quantized biases: learned values too.
        dq_data = {n.input[0] for n in g.node if n.op_type == "DequantizeLinear"}
        for t in _constant_tensors(g).values():
            learned = t.data_type in _WEIGHT_TYPES or (t.data_type == onnx.TensorProto.INT32 and t.name in dq_data)
            if learned and t.name not in not_learned and int(np.prod(t.dims)) > 1:
                yield t


def count_params(model: onnx.ModelProto) -> tuple[int, int]:
    """``(params, nonzero_params)`` as stored: one parameter per element of every :func:`weight_tensors`
    tensor; a quantized zero (value == zero point) counts as zero. Packed low-bit weights count their bytes
    here; what the service reports is :func:`param_counts`.

    Example:
        >>> count_params(onnx.load("model.onnx"))  # doctest: +SKIP
        (421834, 210917)
    """
    zero_points: dict[str, int] = {}
    for g in _graphs(model.graph):
        inits = _constant_tensors(g)
        for n in g.node:
            if n.op_type == "DequantizeLinear" and len(n.input) > 2 and n.input[2] in inits:
                zp = numpy_helper.to_array(inits[n.input[2]])
                if zp.size == 1 or np.all(zp == zp.flat[0]):
                    zero_points[n.input[0]] = int(zp.flat[0])
    params = nonzero = 0
    for t in weight_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:  # weights not loaded (an upload checked lazily):
            n = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1  # the shape counts; zeros unknown
            params += n
            nonzero += n
            continue
        arr = numpy_helper.to_array(t)
        params += arr.size
        nonzero += int(np.count_nonzero(arr != zero_points.get(t.name, 0)))
    return params, nonzero


def packed_entries(model: onnx.ModelProto) -> dict[str, dict]:
    """The packed weights recorded in the model's metadata (:mod:`compression.techniques.quantization.packing`),
    keyed by codes initializer: ``{weight, width, params, nonzero, tensors}``."""
    for p in model.metadata_props:
        if p.key == PACKED_KEY:
            return json.loads(p.value)
    return {}


def packed_param_counts(model: onnx.ModelProto) -> tuple[int, int]:
    """Correction to :func:`count_params` for packed weights: ``(params_delta, nonzero_delta)``.

    ``count_params`` counts the packed bytes, codebooks and shift tables as parameters; the true
    count is one parameter per decoded weight element, with decoded zeros not counted as nonzero.
    """
    entries = packed_entries(model)
    if not entries:
        return 0, 0
    present = set(_constant_tensors(model.graph))  # codes in an initializer or a Constant node
    live = {k: v for k, v in entries.items() if k in present}
    mine = {t for v in live.values() for t in v["tensors"]}
    d_params = d_nonzero = 0
    for t in weight_tensors(model):
        if t.name in mine:
            arr = numpy_helper.to_array(t)
            d_params -= arr.size
            d_nonzero -= int(np.count_nonzero(arr))
    for v in live.values():
        d_params += int(v["params"])
        d_nonzero += int(v["nonzero"])
    return d_params, d_nonzero


def param_counts(model: onnx.ModelProto) -> tuple[int, int]:
    """``(params, nonzero_params)`` as the service reports them — the model's record (``describe``) and its
    measured metrics (``measure``) alike: :func:`count_params`, with packed low-bit weights counted as the
    weights they decode to (:func:`packed_param_counts`).

    Example:
        >>> param_counts(onnx.load("clustered.onnx"))  # doctest: +SKIP
        (266200, 266200)
    """
    params, nonzero = count_params(model)
    d_params, d_nonzero = packed_param_counts(model)
    return params + d_params, nonzero + d_nonzero


_RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}  # W is [directions, gates × hidden, input]
MAC_OPS = _CONV_OPS | _MATMUL_OPS | {"LSTM", "GRU", "RNN"}
# contrib ops ONNX's shape inference does not know whose output type is not their first input's: a quantized
# Gather's output has its scales' type (input 2), not its codes'
_TYPE_FROM_INPUT = {"GatherBlockQuantized": 2}


def measured_shapes(model: onnx.ModelProto, sample: dict[str, np.ndarray], *,
                    every_value: bool = False, path: Path | None = None) -> dict[str, list[int]]:
    """Shapes of the main graph's values as ONNX Runtime produces them on ``sample`` (batch 1).

    Measured rather than inferred: shape inference cannot follow every reshape or dynamic dimension, and
    MACs must count what really executes. Initializers and the sample's arrays are included.

    Args:
        model: the model (not modified: a copy is probed).
        sample: one array per graph input, batch 1.
        every_value: expose every node output (what cut-point search needs), not only the operands and
            results of the MAC ops (``Conv``, ``Gemm``, ``MatMul`` and their integer variants).
        path: ``model`` as written with its weights in external data beside it (:func:`compression.modelio.save`):
            the probe is then its graph alone, written next to it and run from that file, so a model over
            protobuf's 2 GiB is neither copied nor serialized.

    Returns:
        Value name -> shape.

    Example:
        >>> measured_shapes(model, {"input": x[:1]})["/fc/Gemm_output_0"]  # doctest: +SKIP
        [1, 10]
    """
    import onnxruntime as ort

    if path is not None:
        probe = onnx.load_model(str(path), load_external_data=False)
    else:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
    g = probe.graph
    inits = {t.name: [int(d) for d in t.dims] for t in g.initializer}
    skip = set(inits) | {o.name for o in g.output}
    wanted: dict[str, None] = {}  # ordered and de-duplicated
    for n in g.node:
        if every_value:
            names = list(n.output)
        elif n.op_type in MAC_OPS:
            names = [*n.input[:3], n.output[0]] if n.op_type in _RECURRENT_GATES else [n.input[0], n.input[1], n.output[0]]
        else:
            continue
        wanted.update((name, None) for name in names if name and name not in skip)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe).graph
        types = {vi.name: vi.type.tensor_type.elem_type for vi in [*inferred.value_info, *inferred.input]}
    except Exception:
        types = {}
    types.update({t.name: t.data_type for t in g.initializer})
    types.update({i.name: i.type.tensor_type.elem_type for i in g.input if i.type.tensor_type.elem_type})
    changed = True
    while changed:  # what inference left untyped (a float16 graph, whose converter appends its Casts last)
        changed = False
        for n in g.node:  # Cast says its type; other ops keep their operands'
            cast_to = next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None
            for out in n.output:
                if out and not types.get(out):
                    src = n.input[_TYPE_FROM_INPUT[n.op_type]:] if n.op_type in _TYPE_FROM_INPUT else n.input
                    typed = cast_to or next((types[i] for i in src if types.get(i)), 0)
                    if typed:
                        types[out], changed = typed, True
    for name in wanted:
        g.output.append(helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.UNDEFINED), None))
    if path is None:
        sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    else:  # beside the model, so its external-data locations resolve
        probe_path = Path(path).with_name(f".probe-{Path(path).name}")
        onnx.save_model(probe, str(probe_path))
        try:
            sess = ort.InferenceSession(str(probe_path), providers=["CPUExecutionProvider"])
        finally:
            probe_path.unlink(missing_ok=True)
    out_names = [o.name for o in sess.get_outputs()]
    shapes = {k: list(np.shape(v)) for k, v in zip(out_names, sess.run(out_names, sample))}
    del sess
    shapes.update(inits)
    shapes.update({k: list(np.shape(v)) for k, v in sample.items()})
    return shapes


def node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """Multiply-accumulates per sample of one node, from measured shapes (:func:`measured_shapes`).

    The one counting rule of the project: Conv (and ConvInteger) = output elements × weight elements per
    output channel; ConvTranspose = input elements × the same; MatMul (and MatMulInteger, and ONNX Runtime's
    weight-only MatMulNBits, whose packed weight's shape is not ``[K, N]``) and Gemm = output elements × the
    reduced dimension; LSTM / GRU / RNN = time steps × batch × directions × gates ×
    hidden × (input + hidden), the input and recurrent projections of every step. Every other op counts 0.

    Raises:
        KeyError: a shape the count needs is not in ``shapes``.

    Example:
        >>> node_macs(gemm, {"x": [1, 784], "w": [300, 784], "y": [1, 300]})  # doctest: +SKIP
        235200
    """
    if node.op_type in ("Conv", "ConvInteger"):
        return int(np.prod(shapes[node.output[0]])) * int(np.prod(shapes[node.input[1]][1:]))
    if node.op_type == "ConvTranspose":
        return int(np.prod(shapes[node.input[0]])) * int(np.prod(shapes[node.input[1]][1:]))
    if node.op_type in ("MatMul", "MatMulInteger", "MatMulNBits"):
        return int(np.prod(shapes[node.output[0]])) * int(shapes[node.input[0]][-1])
    if node.op_type == "Gemm":
        a = shapes[node.input[0]]
        trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
        return int(np.prod(shapes[node.output[0]])) * int(a[0] if trans_a else a[-1])
    if node.op_type in _RECURRENT_GATES:
        steps_times_batch = int(np.prod(shapes[node.input[0]][:2]))  # [T, N, I] or, layout 1, [N, T, I]
        dirs, gates_hidden, inputs = shapes[node.input[1]]
        hidden = shapes[node.input[2]][-1]
        return steps_times_batch * int(dirs) * int(gates_hidden) * (int(inputs) + int(hidden))
    return 0


def macs(model: onnx.ModelProto, sample: dict[str, np.ndarray], *, path: Path | None = None) -> int:
    """Multiply-accumulates for one sample (``sample`` arrays have batch 1), Conv/Gemm/MatMul only; ``path``:
    the model as written with external data (see :func:`measured_shapes`)."""
    shapes = measured_shapes(model, sample, path=path)
    return sum(node_macs(n, shapes) for n in model.graph.node)


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    hist: dict[str, int] = {}
    for g in _graphs(model.graph):
        for n in g.node:
            hist[n.op_type] = hist.get(n.op_type, 0) + 1
    return dict(sorted(hist.items()))


def _shape_of(vi: onnx.ValueInfoProto) -> list[Any]:
    dims = []
    for d in vi.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return dims


def graph_io(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """The graph's inputs (initializers listed as inputs left out) and outputs: ``{name, shape, dtype}`` each;
    a dimension is its size, its symbolic name, or None.

    Example:
        >>> graph_io(onnx.load("lenet.onnx"))["inputs"]  # doctest: +SKIP
        [{'name': 'input', 'shape': ['batch', 784], 'dtype': 'float32'}]
    """
    inits = {i.name for i in model.graph.initializer}

    def io(vi: onnx.ValueInfoProto) -> dict[str, Any]:
        elem = vi.type.tensor_type.elem_type
        dtype = str(helper.tensor_dtype_to_np_dtype(elem)) if elem else "unknown"
        return {"name": vi.name, "shape": _shape_of(vi), "dtype": dtype}

    return {"inputs": [io(i) for i in model.graph.input if i.name not in inits],
            "outputs": [io(o) for o in model.graph.output]}


def input_specs(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """The graph's inputs as :func:`graph_io` gives them."""
    return graph_io(model)["inputs"]


def fixed_batch(shapes: Iterable[Sequence[Any]]) -> int | None:
    """The batch size the first input with a fixed first dimension fixes, or None when every one is free.

    ``shapes`` are the graph inputs' shapes (an int, a symbolic name or None per dimension), as
    :func:`input_specs` or an ONNX Runtime session's ``get_inputs()`` give them. A batch-1 detector must be
    fed (calibrated, measured) one sample per run.

    Example:
        >>> fixed_batch([["batch", 3, 224, 224]]), fixed_batch([[1, 3, 640, 640], ["n", 2]])
        (None, 1)
    """
    for shape in shapes:
        if len(shape) and isinstance(shape[0], int) and shape[0] > 0:
            return shape[0]
    return None
