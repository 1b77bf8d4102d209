"""Low-rank factorisation (SVD of Linear/MatMul weights, spatial SVD of convs): the exported graph holds the
factored nodes with the stated ranks, full rank reproduces the original in ONNX Runtime, the reported errors and
parameter counts are the real ones, fine-tuning raises accuracy, and bad specs are refused."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from compression.analysis import count_params
from compression.data import Arrays, DataSplit
from compression.errors import InvalidSpec
from compression.spec import parse_spec
from compression.techniques.factorization.layers import find_layers, initializers, name_nodes
from compression.techniques.factorization.surgery import Rewrite, depthwise_rewrite, lowrank_rewrite, reconstruct
from compression.techniques.factorization.svd import relative_error, singular_values, spatial_matrix
from testkit.helpers import accuracy, apply_step, run_ort
from testkit.zoo import export_onnx

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inits(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {t.name: list(t.dims) for t in model.graph.initializer}


def _full_ranks(model: onnx.ModelProto) -> dict[str, int]:
    inits = initializers(model)
    return {la.name: min(la.matrix(inits).shape) for la in find_layers(model) if la.reason is None}


def _conv_model(w: np.ndarray, *, bias: bool = True, **attrs) -> onnx.ModelProto:
    """One Conv node on a [N, Cin, 11, 9] input, weight ``w`` as an initializer."""
    cout, cin = w.shape[:2]
    inits = [numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(np.linspace(-1, 1, cout).astype(np.float32), "b"))
        inputs.append("b")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", kernel_shape=list(w.shape[2:]), **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, 11, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cout, "H", "W"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_lowrank_lenet_graph_has_the_stated_ranks(exporter, lenet, tmp_path):
    models, data = lenet
    model = models[exporter]
    # every layer, the classifier too, at exactly the ratio's rank (no floor): the rewrite's arithmetic
    res = apply_step({"method": "lowrank", "rank_ratio": 0.2, "keep_classifier": False, "min_rank": 1}, model, data,
                     tmp_path)
    out = res.model
    onnx.checker.check_model(out)
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Gemm", "Relu"] * 2 + ["MatMul", "Gemm"]
    inits = _inits(out)
    ranks = [la["rank"] for la in res.report["layers"]]
    assert ranks == [60, 20, 2]  # ⌈0.2 · min(M, N)⌉ of 784×300, 300×100, 100×10
    for la, (n_in, n_out) in zip(res.report["layers"], [(784, 300), (300, 100), (100, 10)]):
        first = next(n for n in out.graph.node if n.name == f"{la['layer']}.lowrank.in")
        second = next(n for n in out.graph.node if n.name == la["layer"])
        assert inits[first.input[1]] == [n_in, la["rank"]]
        assert inits[second.input[1]] == [n_out, la["rank"]]  # Gemm transB=1 keeps the [out, K] layout
        assert la["params_after"] == la["rank"] * (n_in + n_out) and la["params_before"] == n_in * n_out
    # Parameters counted: the whole model's count falls by exactly the reported saving (biases unchanged).
    t = res.report["totals"]
    assert count_params(model)[0] - count_params(out)[0] == t["params_before"] - t["params_after"]
    assert t["params_ratio"] == round(266200 / (60 * 1084 + 20 * 400 + 2 * 110), 4)
    X = data.holdout.inputs["input"]
    assert run_ort(out, X[:7]).shape == (7, 10)  # batch stays dynamic
    assert res.report["holdout_accuracy"]["factored"] == pytest.approx(accuracy(out, data), abs=1e-6)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_full_rank_rewrite_matches_the_original_in_ort(exporter, lenet, cnn_onnx, mnist_data):
    X, _ = mnist_data
    models, _ = lenet
    for model, x in ((models[exporter], X[:16].reshape(16, -1)), (onnx.load(str(cnn_onnx[exporter])), X[:16])):
        model = name_nodes(model)
        full = _full_ranks(model)
        out, rewrites = lowrank_rewrite(model, full)
        assert len(rewrites) == len(full) >= 3
        assert float(np.abs(run_ort(out, x) - run_ort(model, x)).max()) <= 1e-4
        assert all(rw.relative_error < 1e-5 for rw in rewrites)


@pytest.mark.parametrize("attrs", [
    {"strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [2, 1]},
    {"strides": [1, 3], "pads": [0, 2, 0, 2], "dilations": [1, 2]},
    {"auto_pad": "VALID", "strides": [2, 2]},
])
def test_spatial_svd_keeps_strides_pads_dilations(attrs):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 4, 3, 5)).astype(np.float32)
    model = _conv_model(w, **attrs)
    x = rng.normal(size=(2, 4, 11, 9)).astype(np.float32)
    out, (rw,) = lowrank_rewrite(name_nodes(model), {"conv": min(4 * 3, 6 * 5)})
    first, second = out.graph.node
    assert numpy_helper.to_array(out.graph.initializer[-2]).shape == (12, 4, 3, 1)  # vertical kh×1, Cin -> K
    assert list(second.input[2:]) == ["b"]  # bias on the second (horizontal) conv
    assert float(np.abs(run_ort(out, x) - run_ort(model, x)).max()) <= 1e-4
    # A lower rank is an approximation whose reported error is the real one of the stored factors.
    out, (rw,) = lowrank_rewrite(name_nodes(model), {"conv": 4})
    assert abs(relative_error(w, reconstruct(out, rw)) - rw.relative_error) < 1e-6
    s = singular_values(spatial_matrix(w))
    assert abs(rw.relative_error - np.sqrt((s[4:] ** 2).sum() / (s ** 2).sum())) < 1e-5  # Eckart–Young
    assert rw.params_after == 4 * (4 * 3 + 6 * 5)


def test_gemm_attributes_survive_and_3d_convs_are_refused():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(12, 3)).astype(np.float32)  # transA: x is [K, N] = [12, batch 3]
    w = rng.normal(size=(12, 7)).astype(np.float32)
    c = rng.normal(size=(7,)).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="gemm", transA=1, alpha=0.5, beta=2.0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [12, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 7])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(c, "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    out, (rw,) = lowrank_rewrite(model, {"gemm": 7})
    assert [n.op_type for n in out.graph.node] == ["Gemm", "Gemm"] and rw.kind == "linear"
    assert float(np.abs(run_ort(out, a) - run_ort(model, a)).max()) <= 1e-4
    conv3d = helper.make_node("Conv", ["x", "w3"], ["y"], name="c3", kernel_shape=[3, 3, 3])
    graph = helper.make_graph([conv3d], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3, 3, 3])],
                              [numpy_helper.from_array(rng.normal(size=(4, 2, 3, 3, 3)).astype(np.float32), "w3")])
    (layer,) = find_layers(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert layer.reason == "3-D convolution"
    with pytest.raises(ValueError, match="3-D convolution"):
        depthwise_rewrite(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), ["c3"])


def test_reported_errors_are_real_and_energy_picks_the_smallest_rank(lenet, tmp_path):
    models, data = lenet
    model = name_nodes(models["legacy"])
    res = apply_step({"method": "lowrank", "energy": 0.8}, model, data, tmp_path)
    inits = initializers(model)
    weights = {la.name: la.matrix(inits) for la in find_layers(model)}
    for la in res.report["layers"]:
        w = weights[la["layer"]]
        s = singular_values(w)
        kept = np.cumsum(s ** 2) / (s ** 2).sum()
        k = la["rank"]
        assert kept[k - 1] >= 0.8 - 1e-9 and (k == 1 or kept[k - 2] < 0.8)
        rw = Rewrite(la["layer"], la["kind"], f"{la['layer']}.lowrank.in", la["layer"],
                        (f"{la['layer']}.lowrank.P", f"{la['layer']}.lowrank.Q"), k, 0, 0, 0.0)
        real = relative_error(w, reconstruct(res.model, rw).T)  # Gemm transB: reconstruct is [out, in]
        assert abs(real - la["relative_error"]) < 1e-5
        assert la["relative_error"] <= np.sqrt(1 - 0.8) + 1e-6


def test_minilm_style_matmul_graph_is_factored_exactly_and_trains(tmp_path):
    """x[N, S, 32] -> Linear (MatMul + Add, as transformers export) -> GELU -> Linear: the MatMul weights."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    model = onnx.load(str(export_onnx(net, torch.zeros(2, 5, 32), tmp_path / "ffn.onnx", dynamo=True)))
    assert [n.op_type for n in model.graph.node].count("MatMul") == 2
    x = np.random.default_rng(0).normal(size=(3, 5, 32)).astype(np.float32)
    named = name_nodes(model)
    out, _ = lowrank_rewrite(named, _full_ranks(named))
    assert float(np.abs(run_ort(out, x) - run_ort(model, x)).max()) <= 1e-4
    spec = {"method": "lowrank", "rank_ratio": 0.25, "keep_classifier": False}  # an FFN block: no classifier
    res = apply_step(spec, model, None, tmp_path)
    assert [la["rank"] for la in res.report["layers"]] == [8, 8]
    assert [n.op_type for n in res.model.graph.node].count("MatMul") == 4
    first = res.report["layers"][0]  # per token: 32·64 MACs -> 32·8 + 8·64; 5 tokens per sample
    assert (first["macs_before"], first["macs_after"]) == (5 * 32 * 64, 5 * (32 * 8 + 8 * 64))
    # Recovery by distillation on an unlabelled dataset (the original's outputs are the target).
    data = DataSplit(Arrays({"input": np.random.default_rng(1).normal(size=(256, 5, 32)).astype(np.float32)}),
                     Arrays({"input": x}))
    tuned = apply_step({**spec, "finetune": {"epochs": 3, "lr": 3e-3}}, model, data, tmp_path)
    err0 = float(np.abs(run_ort(res.model, x) - run_ort(model, x)).mean())
    err1 = float(np.abs(run_ort(tuned.model, x) - run_ort(model, x)).mean())
    assert err1 < err0 and any("distillation" in n for n in tuned.report["notes"])


def test_layers_that_cannot_be_factored_are_skipped_with_reasons(tmp_path):
    rng = np.random.default_rng(0)
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (f(8, 1, 3, 3), "w_group"), (f(8, 8, 3, 3), "w_same"), (f(8, 8, 1, 1), "w_1x1"), (f(8 * 11 * 9, 4), "w_fc"),
        (f(4, 4), "w_small"))]
    nodes = [
        helper.make_node("Conv", ["x", "w_group"], ["a"], name="grouped", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         group=8),
        helper.make_node("Conv", ["a", "w_same"], ["b"], name="same", kernel_shape=[3, 3], auto_pad="SAME_UPPER"),
        helper.make_node("Conv", ["b", "w_1x1"], ["c"], name="pointwise", kernel_shape=[1, 1]),
        helper.make_node("Flatten", ["c"], ["d"], name="flatten"),
        helper.make_node("MatMul", ["d", "w_fc"], ["e"], name="fc"),
        helper.make_node("Identity", ["w_small"], ["m"], name="copy"),
        helper.make_node("MatMul", ["e", "m"], ["g"], name="dynamic"),
        helper.make_node("MatMul", ["g", "w_small"], ["y"], name="small"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 11, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    res = apply_step({"method": "lowrank", "rank_ratio": 0.5, "exclude": ["fc"], "keep_classifier": False}, model,
                     None, tmp_path)
    reasons = {s["layer"]: s["reason"] for s in res.report["skipped"]}
    assert reasons["grouped"].startswith("grouped convolution")
    assert reasons["same"].startswith("auto_pad SAME_UPPER")
    assert reasons["pointwise"].startswith("1×1 kernel")
    assert reasons["fc"] == "excluded by the spec"
    assert reasons["dynamic"].startswith("weight is computed at run time")
    # rank 2 of a 4×4 raised to the floor (min_rank 8, clipped to 4): 4·8 = 32 ≥ 16
    assert reasons["small"].startswith("rank 2 raised to the floor 4 (min_rank 8) saves nothing")
    assert res.report["layers"] == [] and res.report["notes"]
    assert res.model.graph.node[0].op_type == "Conv" and len(res.model.graph.node) == len(model.graph.node)
    # Depthwise-separable handles the auto_pad conv exactly when its per-channel slices are rank 1.
    w_same = numpy_helper.to_array(inits[1])
    w_rank1 = np.einsum("oc,cij->ocij", f(8, 8), f(8, 3, 3)).astype(np.float32)
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(w_rank1, "w_same"))
    dw = apply_step({"method": "depthwise_separable", "finetune": None}, model, None, tmp_path)
    assert [r["layer"] for r in dw.report["layers"]] == ["same"] and w_same.shape == w_rank1.shape
    assert dw.report["layers"][0]["rank1_relative_error"] < 1e-6
    x = f(2, 8, 11, 9)
    ref = run_ort(model, x)
    assert float(np.abs(run_ort(dw.model, x) - ref).max()) <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_lowrank_finetune_raises_accuracy(lenet, tmp_path):
    models, data = lenet
    model = models["dynamo"]
    # deliberately lossy (classifier and low ranks factored too) so there is something to win back
    spec = {"method": "lowrank", "energy": 0.5, "keep_classifier": False, "min_rank": 1}
    cut = apply_step(spec, model, data, tmp_path)
    tuned = apply_step({**spec, "finetune": {"epochs": 2, "lr": 1e-3, "distill": True}}, model, data, tmp_path)
    acc = tuned.report["holdout_accuracy"]
    assert acc["factored"] == pytest.approx(accuracy(cut.model, data), abs=1e-6)
    assert acc["finetuned"] == pytest.approx(accuracy(tuned.model, data), abs=1e-6)
    assert acc["finetuned"] > acc["factored"] + 0.02
    # the graph is still the factored one; the trained factors moved away from the SVD
    assert _inits(tuned.model) == _inits(cut.model)
    layer = tuned.report["layers"][0]
    assert layer["relative_error_after_finetune"] != layer["relative_error"]
    assert len(tuned.report["loss_per_epoch"]) == 2


@pytest.mark.parametrize("step", [
    {"method": "lowrank", "rank_ratio": 0.5, "energy": 0.9},
    {"method": "lowrank", "rank_ratio": 0},
    {"method": "lowrank", "energy": 1.5},
    {"method": "lowrank", "layers": {"fc": {"rank": 4, "energy": 0.5}}},
    {"method": "lowrank", "layers": {"fc": {}}},
    {"method": "lowrank", "layers": {"fc": {"rank": 0}}},
    {"method": "lowrank", "layers": {"fc": {"rank": 4}}, "exclude": ["fc"]},
    {"method": "lowrank", "finetune": {"epochs": -1}},
    {"method": "lowrank", "rank": 4},
])
def test_bad_specs_are_refused(step):
    with pytest.raises(InvalidSpec) as e:
        parse_spec({"steps": [step]})
    assert e.value.errors and e.value.errors[0]["loc"][:2] == ["steps", 0]


def test_defaults_and_unknown_layer_names(lenet, tmp_path):
    spec = parse_spec({"steps": [{"method": "lowrank"}]}).steps
    assert spec[0].criterion() == {"energy": 0.9} and not spec[0].needs_data
    models, data = lenet
    with pytest.raises(InvalidSpec, match="unknown layers") as e:
        apply_step({"method": "lowrank", "layers": {"nope": {"rank": 3}}}, models["dynamo"], data, tmp_path)
    assert e.value.errors[0]["loc"] == ["layers", "nope"]


def test_defaults_keep_the_classifier_dense_and_ranks_above_the_floor(lenet, tmp_path):
    """rank_ratio 0.2 on LeNet-300-100 once put the 100→10 classifier at rank 2 (89% → 37% after 3 epochs);
    by default the classifier stays dense and no rank falls below min_rank (8)."""
    models, data = lenet
    model = models["dynamo"]
    res = apply_step({"method": "lowrank", "rank_ratio": 0.01}, model, data, tmp_path)
    rows = res.report["layers"]
    assert [(la["shape"], la["rank"]) for la in rows] == [([784, 300], 8), ([300, 100], 8)]  # ⌈0.01·300⌉ = 3 → 8
    assert all(la["criterion"]["rank_from_criterion"] < 8 == la["criterion"]["raised_to_min_rank"] for la in rows)
    (head,) = res.report["skipped"]
    assert "feeds the graph output" in head["reason"] and "classifier" in head["reason"]
    gemms = [n for n in res.model.graph.node if n.name == head["layer"]]
    inits = _inits(res.model)
    assert len(gemms) == 1 and inits[gemms[0].input[1]] == [10, 100]  # still the dense 100→10 weight
    assert count_params(model)[0] - count_params(res.model)[0] == 266200 - (8 * 1084 + 8 * 400 + 1000)
    # the spec may ask for less: min_rank 1, or the classifier named in layers
    low = apply_step({"method": "lowrank", "rank_ratio": 0.01, "min_rank": 1,
                      "layers": {head["layer"]: {"rank": 2}}}, model, data, tmp_path)
    assert [la["rank"] for la in low.report["layers"]] == [3, 1, 2] and low.report["skipped"] == []


# ---------------------------------------------------------------- default ranks: the sensitivity scan
def _slice_predictions(model: onnx.ModelProto, data: DataSplit, rows: slice) -> np.ndarray:
    return run_ort(model, data.train.inputs["input"][rows]).argmax(1)


def test_default_ranks_come_from_the_scan_within_the_budget(lenet, tmp_path):
    """No rank_ratio/energy: each layer alone is tried at its candidate ranks on the last 20% of the training
    split, and the budget (max_drop) is spent over the layers; the chosen ranks, measured together on that
    slice in ONNX Runtime, disagree with the original on no more than max_drop % of it (so its accuracy
    falls by no more than that either)."""
    models, data = lenet
    model = models["dynamo"]
    res = apply_step({"method": "lowrank", "max_drop": 1.0}, model, data, tmp_path)
    scan = res.report["sensitivity"]
    assert res.report["criterion"] == {"sensitivity": {"max_drop": 1.0, "metric": "agreement"}}
    assert scan["validation"] == {"train_samples": 1000, "from": 800, "samples": 200}
    rows = {r["layer"]: r for r in scan["layers"]}
    assert len(rows) == 2  # the classifier stays dense (keep_classifier), so it is not scanned
    for la in res.report["layers"]:
        row = rows[la["layer"]]
        m, n = la["shape"]
        assert la["rank"] == row["chosen_rank"] and la["rank"] in row["ranks_tried"]
        assert all(k * (m + n) < m * n and k >= 8 for k in row["ranks_tried"])  # only ranks that save, ≥ min_rank
        assert row["ranks_tried"] == sorted(row["ranks_tried"], reverse=True)
        single = row["drop_pt"][row["ranks_tried"].index(la["rank"])]
        assert single <= row["budget_spent_pt"] + 1e-9 <= 1.0 + 1e-9  # the layer's share of the budget
    assert sum(r["budget_spent_pt"] for r in rows.values()) <= 1.0 + 1e-9
    # the joint drop, re-measured here on the same slice with the factored graph: within the budget
    rows_ = slice(800, 1000)
    ref, got, y = _slice_predictions(model, data, rows_), _slice_predictions(res.model, data, rows_), data.train.labels[rows_]
    assert 100 * (1 - (ref == got).mean()) == pytest.approx(scan["joint_drop_pt"], abs=1e-6)
    assert 100 * ((ref == y).mean() - (got == y).mean()) <= scan["joint_drop_pt"] <= 1.0
    assert scan["base"] == pytest.approx((ref == y).mean(), abs=1e-6)
    assert res.report["totals"]["params_ratio"] > 4
    # a zero budget keeps only the truncations that cost nothing on the slice, never a cheaper total
    tight = apply_step({"method": "lowrank", "max_drop": 0.0}, model, data, tmp_path)
    assert tight.report["sensitivity"]["joint_drop_pt"] <= 0.0
    assert all(r["budget_spent_pt"] == 0.0 for r in tight.report["sensitivity"]["layers"])
    assert np.array_equal(_slice_predictions(tight.model, data, rows_), ref)


def test_the_scan_never_reads_the_holdout(lenet, tmp_path):
    models, data = lenet
    rng = np.random.default_rng(0)
    garbage = Arrays({"input": rng.normal(size=(50, 784)).astype(np.float32)}, rng.integers(0, 10, 50))
    a = apply_step({"method": "lowrank"}, models["dynamo"], data, tmp_path).report["sensitivity"]
    b = apply_step({"method": "lowrank"}, models["dynamo"], DataSplit(data.train, garbage), tmp_path).report
    assert b["sensitivity"] == a
    # the slice is the training split's tail, capped and drawn by the seed
    from compression.techniques.factorization.sensitivity import VALIDATION_MAX, validation_slice
    big = Arrays({"input": np.arange(8000, dtype=np.float32)[:, None]}, np.zeros(8000, dtype=np.int64))
    s0, where = validation_slice(big, seed=0)
    s1, _ = validation_slice(big, seed=1)
    assert where == {"train_samples": 8000, "from": 6400, "samples": VALIDATION_MAX}
    assert s0.inputs["input"].min() >= 6400 and len(np.unique(s0.inputs["input"])) == VALIDATION_MAX
    assert not np.array_equal(s0.inputs["input"], s1.inputs["input"])
    assert np.array_equal(s0.inputs["input"], validation_slice(big, seed=0)[0].inputs["input"])


def test_rank_ratio_energy_and_layers_override_the_scan(lenet, tmp_path):
    models, data = lenet
    model = models["dynamo"]
    energy = apply_step({"method": "lowrank", "energy": 0.8}, model, data, tmp_path).report
    assert energy["sensitivity"] is None and energy["criterion"] == {"energy": 0.8}
    ratio = apply_step({"method": "lowrank", "rank_ratio": 0.1}, model, data, tmp_path).report
    assert ratio["sensitivity"] is None and [la["rank"] for la in ratio["layers"]] == [30, 10]
    # a layer named in layers keeps its rank; the others are scanned
    named = apply_step({"method": "lowrank", "layers": {"node_linear": {"rank": 40}}}, model, data, tmp_path).report
    assert [r["layer"] for r in named["sensitivity"]["layers"]] == ["node_linear_1"]
    assert named["layers"][0]["rank"] == 40 and named["layers"][0]["criterion"] == {"rank": 40}


def test_without_data_the_default_is_energy_09_with_a_note(lenet, tmp_path):
    models, _ = lenet
    model = models["dynamo"]
    res = apply_step({"method": "lowrank"}, model, None, tmp_path).report
    explicit = apply_step({"method": "lowrank", "energy": 0.9}, model, None, tmp_path).report
    assert res["sensitivity"] is None and res["criterion"] == {"energy": 0.9}
    assert [la["rank"] for la in res["layers"]] == [la["rank"] for la in explicit["layers"]]
    assert any(n.startswith("no dataset: ranks from energy 0.9") for n in res["notes"])
    assert not any("no dataset" in n for n in explicit["notes"])


def test_scan_without_labels_or_class_scores_measures_the_cosine(tmp_path):
    """An FFN block (outputs are features, no labels): the drop is 100·(1 − centred cosine) to the original."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    with torch.no_grad():  # weights of rank ~6 plus a little noise: a trained layer's fast-decaying spectrum
        for lin in (net[0], net[2]):
            o, i = lin.weight.shape
            lin.weight.copy_(torch.randn(o, 6) @ torch.randn(6, i) / 3 + 0.01 * torch.randn(o, i))
    model = onnx.load(str(export_onnx(net, torch.zeros(2, 5, 32), tmp_path / "ffn.onnx", dynamo=True)))
    x = np.random.default_rng(1).normal(size=(100, 5, 32)).astype(np.float32)
    data = DataSplit(Arrays({"input": x}), Arrays({"input": x[:4]}))
    res = apply_step({"method": "lowrank", "keep_classifier": False, "min_rank": 2, "max_drop": 5.0}, model, data,
                     tmp_path)
    scan = res.report["sensitivity"]
    assert scan["metric"] == "centered_cosine" and scan["base"] is None
    assert [r["ranks_tried"][0] for r in scan["layers"]] == [16, 16]  # ⌈32/2⌉
    ref, out = run_ort(model, x[80:]), run_ort(res.model, x[80:])
    mu = ref.reshape(20, -1).mean(0)
    da, db = out.reshape(20, -1) - mu, ref.reshape(20, -1) - mu
    cos = float((da * db).sum() / np.linalg.norm(da) / np.linalg.norm(db))
    assert 100 * (1 - cos) == pytest.approx(scan["joint_drop_pt"], abs=1e-3) and scan["joint_drop_pt"] <= 5.0
    assert [la["rank"] for la in res.report["layers"]] == [r["chosen_rank"] for r in scan["layers"]]
    assert all(la["rank"] >= 6 for la in res.report["layers"])  # not below the weights' true rank


def test_a_fixed_batch_graph_is_scanned_on_fewer_samples(lenet, tmp_path):
    """A batch-1 graph runs one sample per call: the scan caps its slice (128) so that it stays quick."""
    models, data = lenet
    model = onnx.ModelProto()
    model.CopyFrom(models["legacy"])
    for v in (*model.graph.input, *model.graph.output):
        v.type.tensor_type.shape.dim[0].dim_value = 1
    res = apply_step({"method": "lowrank"}, model, data, tmp_path)
    scan = res.report["sensitivity"]
    assert scan["validation"] == {"train_samples": 1000, "from": 800, "samples": 128}
    assert run_ort(res.model, data.holdout.inputs["input"][:1]).shape == (1, 10)
