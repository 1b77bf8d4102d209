"""Quantization building blocks: bit packing decoded by ONNX Runtime, k-means with a zero centroid, the
spec's per-scheme options, and the entropy-coded artifact."""
from __future__ import annotations

import lzma

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compression.errors import InvalidSpec
from compression.xz_artifact import compress, load_compressed, write_compressed
from compression.techniques.quantization.kmeans import kmeans_1d
from compression.techniques.quantization.packing import (
    computed_weights, container_bits, encode_weight, pack_codes, packed_param_counts, unpack_codes,
)
from compression.spec import parse_spec


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
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
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
    from compression.analysis import count_params

    params, nonzero = count_params(model)
    dp, dn = packed_param_counts(model)
    assert (params + dp, nonzero + dn) == (15, int(np.count_nonzero(w)))


def test_sparse_codebook_layout_decodes_and_is_smaller():
    from compression.techniques.quantization.packing import encode_sparse_codebook

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
    from compression.analysis import count_params

    params, nonzero = count_params(model)
    dp, dn = packed_param_counts(model)
    assert (params + dp, nonzero + dn) == (codes.size, enc.nonzero)


def test_low_opset_is_refused_for_sub_byte_codes():
    from compression.errors import CompressionError

    model = _matmul_model(np.ones((2, 2), np.float32), opset=10)
    with pytest.raises(CompressionError, match="opset"):
        encode_weight(model, "W", np.zeros((2, 2)), 1, codebook=np.array([1.0], np.float32))


def test_kmeans_keeps_zeros_as_their_own_centroid():
    rng = np.random.default_rng(0)
    w = rng.normal(size=5000).astype(np.float32)
    w[rng.random(5000) < 0.7] = 0.0
    cb, codes = kmeans_1d(w, 8)
    assert len(cb) <= 8 and cb[0] == 0.0
    np.testing.assert_array_equal(codes == 0, w == 0)  # zeros stay zeros, nothing else becomes zero
    nz = w != 0
    mse = float(((cb[codes] - w)[nz] ** 2).mean())
    assert mse < 0.06 * float(w[nz].var())  # Lloyd-Max with 7 levels on a Gaussian: ≈ 0.044·σ²
    cb_all, _ = kmeans_1d(w, 8, keep_zero=False)
    assert len(cb_all) == 8 and 0.0 not in cb_all.tolist()


def test_kmeans_fewer_values_than_clusters():
    cb, codes = kmeans_1d(np.array([1.0, 1.0, 2.0], np.float32), 16)
    assert sorted(cb.tolist()) == [1.0, 2.0]
    np.testing.assert_array_equal(cb[codes], [1.0, 1.0, 2.0])


# ------------------------------------------------------------------------------------------- spec
def _step(raw: dict):
    return parse_spec({"steps": [{"method": "quantize", **raw}]}).steps[0]


@pytest.mark.parametrize("raw, field", [
    ({"scheme": "int8", "bits": 4}, "bits"),
    ({"scheme": "cluster", "mode": "static"}, "mode"),
    ({"scheme": "fp16", "per_channel": True}, "per_channel"),
    ({"scheme": "binary", "threshold": 0.5}, "threshold"),
    ({"scheme": "int8", "keep_io_types": False}, "keep_io_types"),
    ({"mode": "dynamic", "calibration": "entropy"}, "calibration"),
    ({"mode": "static", "finetune": {"epochs": 1}}, "finetune"),
    ({"scheme": "cluster", "bits": 9}, "bits"),
    ({"scheme": "int4"}, "scheme"),
])
def test_options_that_do_not_apply_are_refused_at_their_path(raw, field):
    with pytest.raises(InvalidSpec) as e:
        _step(raw)
    assert e.value.errors[0]["loc"] == ["steps", 0, field]


def test_defaults_are_filled_per_scheme_and_survive_a_round_trip():
    for raw, want, needs in [
        ({}, {"mode": "static", "calibration": "minmax", "per_channel": True}, True),
        ({"mode": "dynamic"}, {"mode": "dynamic", "calibration": None}, False),
        ({"mode": "qat"}, {"finetune": {"epochs": 2, "lr": 1e-4}}, True),
        ({"scheme": "fp16"}, {"keep_io_types": True}, False),
        ({"scheme": "cluster"}, {"bits": 5, "finetune": None}, False),
        ({"scheme": "cluster", "finetune": {"epochs": 1}}, {"bits": 5}, True),
        ({"scheme": "ternary"}, {"threshold": 0.7, "finetune": {"epochs": 6}}, True),
        ({"scheme": "binary", "finetune": {"epochs": 0}}, {}, False),
    ]:
        step = _step(raw)
        dumped = step.model_dump(mode="json")
        for k, v in want.items():
            got = dumped[k]
            assert (got == v) if not isinstance(v, dict) else {kk: got[kk] for kk in v} == v, (raw, k, got)
        assert step.needs_data is needs, raw
        again = parse_spec({"steps": [dumped]}).steps[0]  # the worker re-parses the stored spec
        assert again.model_dump(mode="json") == dumped


# ---------------------------------------------------------------------------------- packaging
def test_compressed_artifact_round_trip(tmp_path):
    blob = np.repeat(np.arange(50, dtype=np.uint8), 2000).tobytes() + np.random.default_rng(0).bytes(3000)
    src = tmp_path / "model.onnx"
    src.write_bytes(blob)
    xz = write_compressed(src)
    assert xz.name == "model.onnx.xz" and xz.stat().st_size == len(compress(blob)) < len(blob) / 10
    assert load_compressed(xz) == blob


def test_compressed_size_is_not_measured_above_the_cap():
    from compression.xz_artifact import MAX_COMPRESS_BYTES, compressed_size

    assert compressed_size(bytes(1000)) == len(compress(bytes(1000)))
    assert compressed_size(bytes(MAX_COMPRESS_BYTES + 1)) is None


def test_loader_refuses_bombs_and_garbage(tmp_path):
    bomb = tmp_path / "bomb.xz"
    bomb.write_bytes(lzma.compress(bytes(10_000_000)))
    with pytest.raises(ValueError, match="inflates"):
        load_compressed(bomb, max_bytes=1_000_000)
    bad = tmp_path / "bad.xz"
    bad.write_bytes(b"not xz at all")
    with pytest.raises(ValueError, match="xz"):
        load_compressed(bad)
    cut = tmp_path / "cut.xz"
    cut.write_bytes(lzma.compress(np.random.default_rng(0).bytes(100_000))[:5000])
    with pytest.raises(ValueError, match="truncated"):
        load_compressed(cut)
