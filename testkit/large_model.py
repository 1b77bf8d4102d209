"""A random-weight decoder-style ONNX with its weights in external data, of any size, written tensor by tensor.

What a large-model test or bench uploads: the layout an exporter writes (one ``.onnx``, its weights in one
data file or one file per tensor, in a sub-folder or beside it), zipped as a user would. Built with
onnx.helper and numpy, no torch; each weight is generated, written and dropped before the next, so even a
model over 2 GiB costs this process one tensor of memory.

Example:
    >>> onnx_path = write_decoder(tmp / "export", hidden=64, layers=4)  # doctest: +SKIP
    >>> zip_folder(tmp / "export", tmp / "model.zip")  # doctest: +SKIP
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper

FFN = 4  # the feed-forward width, times hidden


def decoder_params(hidden: int, layers: int) -> int:
    """Parameters of :func:`write_decoder`'s model: two ``[H, 4H]``/``[4H, H]`` matrices a layer."""
    return layers * 2 * hidden * FFN * hidden


def layers_for(gib: float, hidden: int) -> int:
    """Layers that bring the float32 weights of a ``hidden``-wide decoder to at least ``gib`` GiB."""
    per_layer = 2 * hidden * FFN * hidden * 4
    return max(1, -(-int(gib * 1024**3) // per_layer))


def write_decoder(folder: Path, *, hidden: int, layers: int, data_dir: str = "weights", one_file: bool = True,
                  seed: int = 0) -> Path:
    """Write ``folder/model.onnx`` and its weights; returns the ``.onnx`` path.

    The graph: input ``hidden_states [batch, hidden]``; per layer ``h + MatMul(Relu(MatMul(h, W_up)), W_down)``
    (constant 2-D weights, what weight-only quantizers act on); output ``[batch, hidden]``. Weights are
    N(0, 0.02) float32, scaled so activations stay of order one through the layers.

    Args:
        data_dir: the sub-folder of the weight files ("" beside the ``.onnx``).
        one_file: all weights in ``<data_dir>/model.onnx.data`` (torch's exporter) or one file per tensor.
    """
    folder = Path(folder)
    (folder / data_dir).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    inits: list[TensorProto] = []
    nodes = []
    shared = f"{data_dir}/model.onnx.data" if data_dir else "model.onnx.data"
    offset = 0
    h = "hidden_states"
    for i in range(layers):
        for name, shape, std in ((f"layer{i}.up", (hidden, FFN * hidden), 0.02),
                                 (f"layer{i}.down", (FFN * hidden, hidden), 0.02 / np.sqrt(layers))):
            w = rng.normal(0.0, std, shape).astype(np.float32)
            location = shared if one_file else (f"{data_dir}/{name}.bin" if data_dir else f"{name}.bin")
            mode = "ab" if one_file and offset else "wb"
            with open(folder / location, mode) as f:
                f.write(w.tobytes())
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
            external_data_helper.set_external_data(
                _with_raw(t), location, offset=offset if one_file else 0, length=w.nbytes)
            t.ClearField("raw_data")
            offset += w.nbytes if one_file else 0
            inits.append(t)
            del w
        nodes += [helper.make_node("MatMul", [h, f"layer{i}.up"], [f"u{i}"], name=f"layer{i}/up"),
                  helper.make_node("Relu", [f"u{i}"], [f"r{i}"], name=f"layer{i}/relu"),
                  helper.make_node("MatMul", [f"r{i}", f"layer{i}.down"], [f"d{i}"], name=f"layer{i}/down"),
                  helper.make_node("Add", [h, f"d{i}"], [f"h{i}"], name=f"layer{i}/residual")]
        h = f"h{i}"
    nodes.append(helper.make_node("Identity", [h], ["output"], name="output"))
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT,
                                                                               ["batch", hidden])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="testkit")
    path = folder / "model.onnx"
    onnx.save_model(model, str(path))
    return path


def _with_raw(t: TensorProto) -> TensorProto:
    """``set_external_data`` insists on a ``raw_data`` field; a placeholder satisfies it (cleared after)."""
    t.raw_data = b"\0"
    return t


def zip_folder(folder: Path, dest: Path) -> Path:
    """Zip every file under ``folder`` (paths relative to it), stored uncompressed: random float weights do
    not deflate, and a zip of GiBs is written at disk speed."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
    return Path(dest)
