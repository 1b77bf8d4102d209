"""What many tests do, once: apply one step of a spec, run a model in ONNX Runtime, measure its accuracy, rewrite
a model as other exporters write it."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from compression.context import StepContext
from compression.data import DataSplit
from compression.registry import get_technique
from compression.spec import parse_spec


def apply_step(spec: dict[str, Any], model: onnx.ModelProto, data: DataSplit | None, workdir: Path, *,
               seed: int = 0, threads: int = 1, models: dict[str, onnx.ModelProto] | None = None,
               **ctx: Any) -> Any:
    """Validate ``spec`` as the one step of a spec (defaults filled, as the service does) and apply it.

    ``models`` resolves model ids the step names (teachers, a student, a rewind init). Returns the
    technique's :class:`~compression.context.StepResult`.
    """
    step = parse_spec({"steps": [spec]}).steps[0]
    load: Callable[[str], onnx.ModelProto] | None = models.__getitem__ if models is not None else None
    context = StepContext(workdir=workdir, data=data, original=model, seed=seed, threads=threads, load_model=load,
                          **ctx)
    return get_technique(step.method).apply(model, step, context)


def run_ort(model: onnx.ModelProto | bytes, feeds: dict[str, np.ndarray] | np.ndarray) -> np.ndarray:
    """The model's first output in ONNX Runtime; an array alone feeds the first input."""
    blob = model if isinstance(model, bytes) else model.SerializeToString()
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    if isinstance(feeds, np.ndarray):
        feeds = {sess.get_inputs()[0].name: feeds}
    return sess.run(None, feeds)[0]


def accuracy(model: onnx.ModelProto, data: DataSplit) -> float:
    """Top-1 accuracy of the model's first output on the held-out split."""
    return float((run_ort(model, data.holdout.inputs).argmax(1) == data.holdout.labels).mean())


def initializers_to_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every top-level initializer moved into a ``Constant`` node (placed first, in
    initializer order) and dropped from the graph inputs: how paddle2onnx writes every weight. The graph
    computes the same thing; a tensor used by several nodes stays one Constant.

    Example:
        >>> [n.op_type for n in initializers_to_constants(lenet).graph.node][:2]  # doctest: +SKIP
        ['Constant', 'Constant']
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    names = {t.name for t in g.initializer}
    constants = [helper.make_node("Constant", [], [t.name], name=f"const_{i}", value=t)
                 for i, t in enumerate(g.initializer)]
    nodes = constants + list(g.node)
    inputs = [i for i in g.input if i.name not in names]
    del g.initializer[:], g.node[:], g.input[:]
    g.node.extend(nodes)
    g.input.extend(inputs)
    return out
