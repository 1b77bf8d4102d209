"""Low-bit packing: codes packed into bytes and decoded by ONNX Runtime, the sparse layout, the parameter
count correction, and what ``measure`` makes of packed weights."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compression.analysis import count_params, packed_param_counts
from compression.errors import CompressionError
from compression.metrics import EvalData, measure, ratios
from compression.techniques.quantization.packing import (
    computed_weights, container_bits, encode_relative_codebook, encode_sparse_codebook, encode_weight, pack_codes,
    relative_entries, unpack_codes,
)
from compression.xz_artifact import compress
from testkit.helpers import apply_step, run_ort

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("width", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 64, 1001])
def test_pack_roundtrip(width, n):
    codes = np.random.default_rng(n).integers(0, 1 << width, n).astype(np.uint8)
    packed = pack_codes(codes, width)
    assert packed.dtype == np.uint8 and packed.size == -(-n * width // 8)
    np.testing.assert_array_equal(unpack_codes(packed, width, n), codes)


def test_container_bits():
    assert [container_bits(b) for b in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    with pytest.raises(ValueError):
        pack_codes(np.array([4]), 2)


def _matmul_model(w: np.ndarray, opset: int = 17) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, w.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, w.shape[1]])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g", [x], [y],
                          initializer=[numpy_helper.from_array(w, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_codebook_weight_is_decoded_by_onnxruntime(width):
    rng = np.random.default_rng(0)
    codebook = np.sort(rng.normal(size=1 << width)).astype(np.float32)
    codes = rng.integers(0, 1 << width, (37, 11))  # 407 codes: not a multiple of 8 / width
    model = _matmul_model(codebook[codes])
    enc = encode_weight(model, "W", codes, width, codebook=codebook)
    onnx.checker.check_model(model)
    assert "W" not in {t.name for t in model.graph.initializer}
    ops = [n.op_type for n in model.graph.node]
    assert "Gather" in ops and ("BitShift" in ops) == (width < 8)
    np.testing.assert_array_equal(computed_weights(model, ["W"])["W"], codebook[codes])
    x = rng.normal(size=(3, 37)).astype(np.float32)
    out = run_ort(model, {"x": x})
    np.testing.assert_allclose(out, x @ codebook[codes], rtol=1e-5, atol=1e-5)
    packed = next(t for t in model.graph.initializer if t.data_type == TensorProto.UINT8 and t.name.startswith("W.codes"))
    assert len(packed.raw_data) == -(-codes.size * width // 8)
    assert enc.stored_bytes == len(packed.raw_data) + codebook.nbytes


def test_affine_ternary_weight_and_param_counts():
    alpha = np.array([0.5, 0.25, 2.0], np.float32)
    codes = np.random.default_rng(1).integers(0, 3, (5, 3))
    w = ((codes - 1) * alpha).astype(np.float32)
    model = _matmul_model(w)
    encode_weight(model, "W", codes, 2, scale=alpha.reshape(1, 3), offset=1.0, zero_code=1)
    np.testing.assert_array_equal(computed_weights(model, ["W"])["W"], w)
    params, nonzero = count_params(model)
    dp, dn = packed_param_counts(model)
    assert (params + dp, nonzero + dn) == (15, int(np.count_nonzero(w)))


def test_sparse_codebook_layout_decodes_and_is_smaller():
    rng = np.random.default_rng(2)
    codebook = np.array([-0.7, -0.2, 0.0, 0.3, 0.9], np.float32)
    codes = np.where(rng.random((300, 40)) < 0.9, 2, rng.integers(0, 5, (300, 40)))
    model = _matmul_model(codebook[codes])
    enc = encode_sparse_codebook(model, "W", codes, codebook, zero_code=2)
    onnx.checker.check_model(model)
    assert {"CumSum", "BitShift", "Gather"} <= {n.op_type for n in model.graph.node}
    np.testing.assert_array_equal(computed_weights(model, ["W"])["W"], codebook[codes])
    assert enc.layout == "sparse" and enc.nonzero == int((codes != 2).sum())
    assert enc.stored_bytes < codes.size * 4 / 8  # below the dense 4-bit layout
    params, nonzero = count_params(model)
    dp, dn = packed_param_counts(model)
    assert (params + dp, nonzero + dn) == (codes.size, enc.nonzero)


def test_relative_index_layout_decodes_exactly_and_beats_the_bitmap_under_xz():
    rng = np.random.default_rng(3)
    codebook = np.array([-0.7, -0.2, 0.0, 0.3, 0.9], np.float32)
    keep = (rng.random((784, 30)) < 0.07) & (rng.random((784, 1)) < 0.6)  # dead input rows: gaps over 255
    codes = np.where(keep, rng.integers(0, 5, keep.shape), 2)
    codes[-1, -1] = 4  # a nonzero in the very last slot
    gaps, entry_codes = relative_entries(codes, 2)
    assert gaps.max() == 255 and gaps.size > int((codes != 2).sum())  # fillers were needed
    model = _matmul_model(codebook[codes])
    enc = encode_relative_codebook(model, "W", codes, codebook, zero_code=2)
    onnx.checker.check_model(model)
    assert {"CumSum", "ScatterElements", "Gather"} <= {n.op_type for n in model.graph.node}
    np.testing.assert_array_equal(computed_weights(model, ["W"])["W"], codebook[codes])
    x = rng.normal(size=(2, 784)).astype(np.float32)
    np.testing.assert_allclose(run_ort(model, {"x": x}), x @ codebook[codes], rtol=1e-5, atol=1e-5)
    assert enc.layout == "relative" and enc.nonzero == int((codes != 2).sum())
    params, nonzero = count_params(model)
    dp, dn = packed_param_counts(model)
    assert (params + dp, nonzero + dn) == (codes.size, enc.nonzero)
    bitmap = _matmul_model(codebook[codes])
    encode_sparse_codebook(bitmap, "W", codes, codebook, zero_code=2)
    assert len(compress(model.SerializeToString())) < 0.95 * len(compress(bitmap.SerializeToString()))


def test_low_opset_is_refused_for_sub_byte_codes():
    model = _matmul_model(np.ones((2, 2), np.float32), opset=10)
    with pytest.raises(CompressionError, match="opset"):
        encode_weight(model, "W", np.zeros((2, 2)), 1, codebook=np.array([1.0], np.float32))


def test_measure_counts_packed_weights_and_entropy_coded_bytes(lenet, tmp_path):
    model, data = lenet
    q = apply_step({"method": "quantize", "scheme": "cluster", "bits": 2}, model, data, tmp_path).model
    ev = EvalData(data.holdout.inputs, data.holdout.labels)
    paths = []
    for name, m in (("o.onnx", model), ("q.onnx", q)):
        onnx.save_model(m, str(tmp_path / name))
        paths.append(tmp_path / name)
    mo, mq = (measure(m, [p], ev, latency_runs=5) for m, p in zip((model, q), paths))
    assert mq["params"] == mo["params"] == count_params(model)[0]
    assert mq["compressed_bytes"] == len(compress(paths[1].read_bytes())) < mq["zip_bytes"] < mq["file_bytes"]
    r = ratios(mq, mo)
    assert r["file_to_compressed"] == pytest.approx(mo["file_bytes"] / mq["compressed_bytes"], rel=1e-3)
    assert r["file_to_compressed"] > 16
