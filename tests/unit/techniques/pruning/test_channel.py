"""Channel (structured) pruning: the exported graph really has fewer channels, runs in ONNX Runtime with a
dynamic batch, and keeps accuracy within bounds."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from compression.analysis import count_params, macs
from compression.data import Arrays, split
from compression.errors import InvalidSpec
from compression.techniques.pruning.channel import choose, rounded_prune
from testkit.helpers import accuracy, apply_step, run_ort
from testkit.zoo import TinyResNet, export_onnx


def _weights(model, op: str) -> list[list[int]]:
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    return [inits[n.input[1]] for n in model.graph.node if n.op_type == op and n.input[1] in inits]


@pytest.fixture(scope="module")
def cnn_data(mnist_data):
    """Fine-tune on 2,000 of the images the CNN was trained on; measure on 500 it never saw."""
    from compression.data import DataSplit

    X, y = mnist_data
    return DataSplit(Arrays({"input": X[2000:4000]}, y[2000:4000]), Arrays({"input": X[4500:5000]}, y[4500:5000]))


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_channel_pruning_removes_filters_and_keeps_accuracy(exporter, cnn_onnx, cnn_data, tmp_path):
    model = onnx.load(str(cnn_onnx[exporter]))
    base = accuracy(model, cnn_data)
    res = apply_step({"method": "prune", "granularity": "channel", "sparsity": 0.5, "scope": "layer",
                      "finetune": {"epochs": 3, "lr": 2e-3, "distill": True}}, model, cnn_data, tmp_path)
    out = res.model
    onnx.checker.check_model(out)
    assert [w[0] for w in _weights(out, "Conv")] == [8, 16]  # 16 -> 8 and 32 -> 16 filters
    gemms = _weights(out, "Gemm")
    assert gemms[0] == [64, 784] and gemms[1] == [10, 64]  # flatten input follows the filters; 10 classes kept
    assert count_params(out)[0] < 0.3 * count_params(model)[0]
    sample = {"input": cnn_data.holdout.inputs["input"][:1]}
    assert macs(out, sample) * 3 < macs(model, sample)
    # The batch stays dynamic: a baked [-1, 1568] reshape was rewritten, not specialised to one batch size.
    for n in (1, 7):
        assert run_ort(out, cnn_data.holdout.inputs["input"][:n]).shape == (n, 10)
    assert accuracy(out, cnn_data) >= base - 0.03
    assert res.report["channels_after"] < res.report["channels_before"]
    assert res.report["ignored"][0]["reason"].startswith("feeds a graph output")
    assert res.report["export_max_abs_error"] < 1e-4


def test_global_scope_prunes_layers_unevenly_and_overrides_apply(cnn_onnx, cnn_data, tmp_path):
    model = onnx.load(str(cnn_onnx["legacy"]))
    glob = apply_step({"method": "prune", "granularity": "channel", "sparsity": 0.5}, model, cnn_data, tmp_path)
    kept = [la["channels_after"] / la["channels_before"] for la in glob.report["layers"][:3]]
    assert max(kept) - min(kept) > 0.05
    first = glob.report["layers"][0]["layer"]
    layer = apply_step({"method": "prune", "granularity": "channel", "sparsity": 0.5, "scope": "layer",
                        "layers": {first: 0.25}, "round_to": 1}, model, cnn_data, tmp_path)
    assert [w[0] for w in _weights(layer.model, "Conv")] == [12, 16]
    with pytest.raises(InvalidSpec, match="unknown layers"):
        apply_step({"method": "prune", "granularity": "channel", "layers": {"nope": 0.3}}, model, cnn_data, tmp_path)


def test_iterative_taylor_with_finetune(cnn_onnx, cnn_data, tmp_path):
    from compression.data import DataSplit

    model = onnx.load(str(cnn_onnx["dynamo"]))
    small = DataSplit(cnn_data.train.take(np.arange(1000)), cnn_data.holdout)
    res = apply_step({"method": "prune", "granularity": "channel", "sparsity": 0.5, "importance": "taylor",
                      "iterations": 2, "finetune": {"epochs": 1, "lr": 2e-3}}, model, small, tmp_path)
    rounds = res.report["rounds"]
    assert len(rounds) == 2 and rounds[0]["channels"] > rounds[1]["channels"]
    assert accuracy(res.model, cnn_data) > 0.85


@pytest.fixture(scope="module")
def resnet_bn(tmp_path_factory):
    """An untrained TinyResNet exported with BatchNorm kept (structure is what is tested)."""
    torch.manual_seed(0)
    net = TinyResNet(width=8).eval()
    with torch.no_grad():  # non-trivial BN scales so bn_scale has something to rank
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # (distinct biases too: the legacy exporter shares equal ones)
                m.weight.uniform_(0.1, 1.0)
                m.bias.uniform_(-0.1, 0.1)
    d = tmp_path_factory.mktemp("resnet")
    ex = torch.zeros(2, 1, 28, 28)
    return {"bn": onnx.load(str(export_onnx(net, ex, d / "bn.onnx", dynamo=True, optimize=False))),
            "folded": onnx.load(str(export_onnx(net, ex, d / "f.onnx", dynamo=False)))}


def test_residual_network_with_batchnorm_bn_scale(resnet_bn, mnist_data, tmp_path):
    X, y = mnist_data
    data = split(Arrays({"input": X[:200]}, y[:200]), holdout=0.5, seed=0, max_eval=100)
    model = resnet_bn["bn"]
    res = apply_step({"method": "prune", "granularity": "channel", "sparsity": 0.5, "importance": "bn_scale",
                      "scope": "layer"}, model, data, tmp_path)
    inits = {t.name: t for t in res.model.graph.initializer}
    before = {t.name: t for t in model.graph.initializer}
    bn_before = sum(int(before[n.input[1]].dims[0]) for n in model.graph.node if n.op_type == "BatchNormalization")
    bn_after = sum(int(inits[n.input[1]].dims[0]) for n in res.model.graph.node if n.op_type == "BatchNormalization")
    assert bn_after <= 0.55 * bn_before
    # Residual adds stay consistent: the block input and its shortcut lose the same channels.
    out = run_ort(res.model, X[:3])
    assert out.shape == (3, 10) and np.isfinite(out).all()
    sample = {"input": X[:1]}
    assert macs(res.model, sample) * 2.5 < macs(model, sample)
    with pytest.raises(InvalidSpec, match="bn_scale"):
        apply_step({"method": "prune", "granularity": "channel", "importance": "bn_scale"}, resnet_bn["folded"], data,
                   tmp_path)


class _SplitNet(torch.nn.Module):
    """conv1's channels go through a Split with constant sizes, the halves concatenated the other way round."""

    def __init__(self, twice: bool = False) -> None:
        super().__init__()
        self.twice = twice
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16 if twice else 8, 16, 3, padding=1)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(torch.relu(self.conv1(x)), [3, 5], dim=1)
        y = torch.cat([b, a, b, a] if self.twice else [b, a], 1)
        return self.head(torch.relu(self.conv2(y)).mean((2, 3)))


def test_split_sizes_follow_the_pruned_channels(mnist_data, tmp_path):
    X, y = mnist_data
    torch.manual_seed(0)
    model = onnx.load(str(export_onnx(_SplitNet().eval(), torch.zeros(2, 1, 28, 28), tmp_path / "s.onnx", dynamo=False)))
    res = apply_step({"method": "prune", "granularity": "channel", "sparsity": 0.5, "scope": "layer"}, model, None,
                     tmp_path)
    assert [i["layer"] for i in res.report["ignored"]] == ["/head/Gemm"]
    assert [w[0] for w in _weights(res.model, "Conv")] == [4, 8]  # conv1 (8, not rounded to 8) halved
    split_node = next(n for n in res.model.graph.node if n.op_type == "Split")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert int(inits[split_node.input[1]].sum()) == 4
    assert run_ort(res.model, X[:4]).shape == (4, 10)


def test_concat_of_one_split_output_twice_is_pruned(mnist_data, tmp_path):
    """A Concat that reads each half of a split twice: one dependency carries two channel ranges."""
    X, y = mnist_data
    torch.manual_seed(0)
    path = export_onnx(_SplitNet(twice=True).eval(), torch.zeros(2, 1, 28, 28), tmp_path / "split.onnx", dynamo=False)
    model = onnx.load(str(path))
    res = apply_step({"method": "prune", "granularity": "channel", "sparsity": 0.5, "scope": "layer"}, model, None,
                     tmp_path)
    assert [i["layer"] for i in res.report["ignored"]] == ["/head/Gemm"]
    assert [w[0] for w in _weights(res.model, "Conv")] == [4, 8]
    assert [w[1] for w in _weights(res.model, "Conv")] == [1, 8]  # conv2 reads the 4 kept channels twice
    assert run_ort(res.model, X[:4]).shape == (4, 10) and res.report["export_max_abs_error"] < 1e-4


# ------------------------------------------------------------------------------------ transformers
@pytest.mark.slow
def test_minilm_heads_and_ffn_neurons_pruned_and_recovered_by_distillation(tmp_path):
    """all-MiniLM-L6-v2: half the heads and FFN neurons go; distillation on sentences recovers cosine."""
    from compression.metrics import session
    from testkit.zoo import export_minilm, minilm_example_inputs

    path = export_minilm(tmp_path / "minilm.onnx", dynamo=False)
    model = onnx.load(str(path))
    sentences = [f"{a} {b} the {c}." for a in ("A cat", "The committee", "My neighbour", "This model")
                 for b in ("watched", "approved", "painted", "ignored") for c in ("river", "budget", "fence")]
    data = split(Arrays(minilm_example_inputs(sentences, seq_len=10), None), holdout=0.25, seed=0, max_eval=100)
    res = apply_step({"method": "prune", "granularity": "channel", "sparsity": 0.5, "scope": "layer",
                      "finetune": {"epochs": 2, "lr": 3e-4, "batch_size": 12}}, model, data, tmp_path)
    assert [h["heads_after"] for h in res.report["heads"]] == [6] * 6
    assert [f["neurons_after"] for f in res.report["ffn"]] == [768] * 6
    shapes = _weights(res.model, "MatMul")
    assert [384, 192] in shapes and [768, 384] in shapes  # Q/K/V columns and FFN-down rows
    assert count_params(res.model)[0] < count_params(model)[0] - 5_000_000
    hold = data.holdout.inputs
    ref = session(model).run(None, hold)[0]

    def cosine(m) -> float:
        got = session(m).run(None, hold)[0]
        return float(((ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)).mean())

    untuned = apply_step({"method": "prune", "granularity": "channel", "sparsity": 0.5, "scope": "layer"}, model, data,
                         tmp_path)
    assert cosine(res.model) > cosine(untuned.model) + 0.05
    one = {k: v[:1] for k, v in hold.items()}
    assert macs(res.model, one) < 0.6 * macs(model, one)


class _Depthwise(torch.nn.Module):
    """conv → depthwise → pointwise → grouped (groups=4) conv → head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = torch.nn.Conv2d(8, 16, 1)
        self.g = torch.nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.pw(torch.relu(self.dw(torch.relu(self.c1(x))))))
        return self.fc(torch.relu(self.g(y)).mean((2, 3)))


@pytest.mark.parametrize("dynamo", [True, False])
def test_depthwise_follows_its_input_and_grouped_conv_is_reported(dynamo, tmp_path):
    torch.manual_seed(0)
    model = onnx.load(str(export_onnx(_Depthwise().eval(), torch.zeros(2, 1, 28, 28), tmp_path / "dw.onnx",
                                      dynamo=dynamo)))
    res = apply_step({"method": "prune", "granularity": "channel", "sparsity": 0.5, "scope": "layer"}, model, None,
                     tmp_path)  # no dataset: weight magnitudes only
    convs = _weights(res.model, "Conv")
    assert convs[:2] == [[4, 1, 3, 3], [4, 1, 3, 3]]  # c1 and its depthwise conv lose the same channels
    groups = [next(a.i for a in n.attribute if a.name == "group") for n in res.model.graph.node if n.op_type == "Conv"]
    assert groups[1] == 4
    reasons = " ".join(i["reason"] for i in res.report["ignored"])
    assert "grouped convolution (groups=4)" in reasons
    assert run_ort(res.model, np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)).shape == (3, 10)


def test_round_to_keeps_channel_counts_multiples_of_8(cnn_onnx, cnn_data, tmp_path):
    model = onnx.load(str(cnn_onnx["legacy"]))
    odd = apply_step({"method": "prune", "granularity": "channel", "sparsity": 0.3, "scope": "layer", "round_to": 1},
                     model, None, tmp_path)
    assert [w[0] for w in _weights(odd.model, "Conv")] == [11, 22]
    assert any("round_to at 8" in n for n in odd.report["notes"])
    even = apply_step({"method": "prune", "granularity": "channel", "sparsity": 0.3, "scope": "layer"},
                      model, None, tmp_path)  # the default: multiples of 8
    # the nearest multiples of 8: 11 kept -> 8, 22 kept -> 24
    assert [w[0] for w in _weights(even.model, "Conv")] == [8, 24] and not even.report["notes"]
    assert even.report["round_to"] == 8


def test_rounding_never_removes_a_small_layer():
    assert rounded_prune(80, 160, 8) == 80 and rounded_prune(81, 160, 8) == 80  # 79 kept -> 80 (nearest)
    assert rounded_prune(85, 160, 8) == 88  # 75 kept -> 72
    assert rounded_prune(2, 16, 8) == 0  # a 10% prune of 16 channels keeps 16, it does not halve them
    assert rounded_prune(3, 12, 8) == 4  # 12 is no multiple of 8: 9 kept -> 8
    assert rounded_prune(5, 8, 8) == 5 and rounded_prune(1, 6, 8) == 1  # at or below 8: not rounded
    assert rounded_prune(10, 12, 8) == 4  # never below 8 kept
    assert rounded_prune(7, 20, 1) == 7


def test_choose_heads_and_neurons_by_scope():
    scores = {"a": [float(i) for i in range(16)], "b": [10.0 * i for i in range(16)]}
    totals = {"a": 16, "b": 16}
    layer = choose(scores, totals, {"a": 0.5, "b": 0.25}, "layer", 0.9)
    assert sorted(layer["a"]) == list(range(8)) and sorted(layer["b"]) == list(range(4))
    assert len(choose(scores, totals, {"a": 0.3, "b": 0.3}, "layer", 0.9, round_to=8)["a"]) == 8  # keeps 8
    glob = choose(scores, totals, {"a": 0.5, "b": 0.5}, "global", 0.9)
    assert len(glob["a"]) + len(glob["b"]) == 16  # mean-normalised: both lose their weakest half
