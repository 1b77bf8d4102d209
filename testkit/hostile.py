"""Hostile uploads for the sandbox tests: tiny models that cost a lot, and poisoned ``.pt2`` archives."""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def constant_bomb(numel: int) -> bytes:
    """A ~200-byte ONNX whose ``ConstantOfShape([numel])`` ONNX Runtime folds at session creation."""
    shape = numpy_helper.from_array(np.array([numel], dtype=np.int64), "shape")
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
             helper.make_node("Add", ["x", "s"], ["y"])]
    g = helper.make_graph(nodes, "bomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])], [shape])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def run_time_bomb(width: int) -> bytes:
    """Cheap to load, expensive to run: ``Expand(x[N, 1], [N, width])`` allocates N × width floats per run."""
    nodes = [helper.make_node("Shape", ["x"], ["xs"]),
             helper.make_node("Slice", ["xs", "zero", "one"], ["n"]),
             helper.make_node("Concat", ["n", "w"], ["target"], axis=0),
             helper.make_node("Expand", ["x", "target"], ["y"])]
    inits = [numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
             numpy_helper.from_array(np.array([width], dtype=np.int64), "w")]
    g = helper.make_graph(nodes, "runbomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def spinning_loop(trips: int) -> bytes:
    """A ~400-byte ONNX whose ``Loop`` adds 1 ``trips`` times: nothing at load, seconds of CPU per run."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["acc_in", "one"], ["acc_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, ["n"])],
        [numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")])
    inits = [numpy_helper.from_array(np.array(trips, dtype=np.int64), "trips"),
             numpy_helper.from_array(np.array(True), "cond")]
    g = helper.make_graph([helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body)], "spin",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


class _WriteMarker:
    """Unpickling this writes ``path``: the proof a payload ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def save_program(path: Path) -> Path:
    """A real ``torch.export.save`` archive of a small Linear + ReLU program (dynamic batch)."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc(x))

    ep = torch.export.export(Net(), (torch.randn(2, 4),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, str(path))
    return path


def poison_program(src: Path, dest: Path, marker: Path, *, where: str) -> Path:
    """Copy a real archive with one road to ``pickle`` opened, whose payload would write ``marker``.

    ``where``: ``"weight"`` (the bias entry flipped to ``use_pickle`` and its bytes replaced by a pickle — what
    ``torch.export.load`` unpickles with ``weights_only=False``), or ``"sample_inputs"`` (the example inputs
    replaced by a pickle that the safe loader refuses, so ``torch.export.load`` retries unsafely).
    """
    payload = pickle.dumps(_WriteMarker(marker))
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        names = zin.namelist()
        config_name = next(n for n in names if n.endswith("model_weights_config.json"))
        config = json.loads(zin.read(config_name))
        bias = next(k for k in config["config"] if k.endswith("bias"))
        for name in names:
            data = zin.read(name)
            if where == "weight" and name == config_name:
                config["config"][bias]["use_pickle"] = True
                data = json.dumps(config).encode()
            elif where == "weight" and name.endswith("/" + config["config"][bias]["path_name"]):
                data = payload
            elif where == "sample_inputs" and "sample_inputs" in name and not name.endswith("/"):
                data = payload
            zout.writestr(name, data)
    return dest

