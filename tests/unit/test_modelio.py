"""Reading uploads: ONNX, a .zip with external data, a torch.export .pt2; hostile variants refused."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compression.errors import InvalidModel, UnsupportedModelFormat
from compression.modelio import read_upload
from testkit.zoo import LeNet300100

CAP = 100 * 1024 * 1024


@pytest.fixture(scope="module")
def lenet_external(tmp_path_factory):
    """LeNet exported with its weights in a sidecar .data file (torch 2.13's default)."""
    d = tmp_path_factory.mktemp("ext")
    net = LeNet300100().eval()
    torch.onnx.export(net, (torch.zeros(2, 784),), str(d / "model.onnx"), dynamo=True, external_data=True,
                      input_names=["input"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    files = sorted(p.name for p in d.iterdir())
    assert len(files) == 2, files
    return net, d


def _zip(folder, extra=None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in folder.iterdir():
            zf.write(p, p.name)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_zip_with_external_data_loads(lenet_external, tmp_path):
    net, d = lenet_external
    up = tmp_path / "up.zip"
    up.write_bytes(_zip(d))
    loaded = read_upload(up, "up.zip", tmp_path, max_unpacked_bytes=CAP)
    assert loaded.format == "onnx_zip"
    x = np.random.default_rng(0).standard_normal((3, 784)).astype(np.float32)
    np.testing.assert_allclose(_outputs(loaded.model, x), net(torch.from_numpy(x)).detach().numpy(), atol=1e-5)


def test_bare_onnx_with_external_refs_refused(lenet_external, tmp_path):
    _, d = lenet_external
    with pytest.raises(InvalidModel, match="zip"):
        read_upload(d / "model.onnx", "model.onnx", tmp_path, max_unpacked_bytes=CAP)


@pytest.mark.parametrize("location", ["../secret.data", "/etc/passwd"])
def test_external_data_outside_upload_refused(lenet_external, tmp_path, location):
    _, d = lenet_external
    m = onnx.load(str(d / "model.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(m, str(src / "model.onnx"))
    up = tmp_path / "up.zip"
    up.write_bytes(_zip(src))
    with pytest.raises(InvalidModel, match="leaves the upload"):
        read_upload(up, "up.zip", tmp_path / "w", max_unpacked_bytes=CAP)


def test_zip_bomb_refused(tmp_path):
    up = tmp_path / "bomb.zip"
    with zipfile.ZipFile(up, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model.onnx", b"\0" * (8 * 1024 * 1024))
    with pytest.raises(InvalidModel, match="unpacks to more"):
        read_upload(up, "bomb.zip", tmp_path, max_unpacked_bytes=1024 * 1024)


def test_pt2_program_becomes_onnx(tmp_path):
    net = LeNet300100().eval()
    ep = torch.export.export(net, (torch.zeros(2, 784),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path / "lenet.pt2"
    torch.export.save(ep, str(path))
    loaded = read_upload(path, "lenet.pt2", tmp_path, max_unpacked_bytes=CAP)
    assert loaded.format == "pt2"
    x = np.random.default_rng(1).standard_normal((5, 784)).astype(np.float32)
    name = loaded.model.graph.input[0].name
    out = ort.InferenceSession(loaded.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    np.testing.assert_allclose(out, net(torch.from_numpy(x)).detach().numpy(), atol=1e-5)


def test_torch_save_checkpoint_refused(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save(LeNet300100().state_dict(), str(path))
    with pytest.raises(UnsupportedModelFormat, match="never unpickled"):
        read_upload(path, "weights.bin", tmp_path, max_unpacked_bytes=CAP)


def test_impossible_initializer_shape_refused(tmp_path):
    from onnx import TensorProto, helper

    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20], raw_data=b"\0" * 16)
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [t])
    path = tmp_path / "big.onnx"
    onnx.save(helper.make_model(g), str(path))
    with pytest.raises(InvalidModel):
        read_upload(path, "big.onnx", tmp_path, max_unpacked_bytes=CAP)


def test_lazy_zip_validates_without_loading_weights_and_load_stored_opens_it(lenet_external, tmp_path):
    """Above ``lazy_above`` bytes of external data the weights stay on disk: the API's memory stays flat."""
    from compression.modelio import load_stored, uses_external_data

    net, d = lenet_external
    up = tmp_path / "up.zip"
    up.write_bytes(_zip(d))
    loaded = read_upload(up, "up.zip", tmp_path / "w", max_unpacked_bytes=CAP, lazy_above=0)
    assert loaded.format == "onnx_zip" and uses_external_data(loaded.model)
    assert all(len(t.raw_data) == 0 for t in loaded.model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    # below the threshold the same upload is loaded whole, as before
    assert not uses_external_data(read_upload(up, "up.zip", tmp_path / "w2", max_unpacked_bytes=CAP,
                                              lazy_above=CAP).model)
    model = load_stored(up, tmp_path / "stored")
    x = np.random.default_rng(1).standard_normal((3, 784)).astype(np.float32)
    np.testing.assert_allclose(_outputs(model, x), net(torch.from_numpy(x)).detach().numpy(), atol=1e-5)


def test_lazy_zip_with_short_external_data_refused(lenet_external, tmp_path):
    _, d = lenet_external
    src = tmp_path / "src"
    src.mkdir()
    for p in d.iterdir():
        data = p.read_bytes()
        (src / p.name).write_bytes(data if p.suffix == ".onnx" else data[:-4096])  # weights cut short
    up = tmp_path / "up.zip"
    up.write_bytes(_zip(src))
    with pytest.raises(InvalidModel, match="external data"):
        read_upload(up, "up.zip", tmp_path / "w", max_unpacked_bytes=CAP, lazy_above=0)
