"""Cut points: skip connections are never crossed, MACs are the analysis's, named exits must be cuts."""
from __future__ import annotations

import onnx
import pytest
import torch

from compression.analysis import macs
from compression.errors import InvalidSpec
from compression.techniques.early_exit.cuts import choose_cuts, find_cuts
from testkit.zoo import TinyResNet, export_onnx


@pytest.fixture(scope="module", params=[False, True], ids=["legacy", "dynamo"])
def resnet(request, tmp_path_factory) -> onnx.ModelProto:
    torch.manual_seed(0)
    path = export_onnx(TinyResNet(width=4), torch.zeros(2, 1, 28, 28), tmp_path_factory.mktemp("res") / "r.onnx",
                       dynamo=request.param)
    return onnx.load(str(path))



def test_skip_connections_are_never_cuts(resnet, x1):
    facts = find_cuts(resnet, x1)
    nodes = {n.name: n for n in resnet.graph.node}
    cut_ops = [nodes[c.node].op_type for c in facts.cuts]
    # Inside a residual block the block input is still live: only block outputs (Add → Relu), the stem and
    # the pooled features qualify.
    assert cut_ops.count("Add") == 3 and cut_ops.count("Relu") == 4 and cut_ops.count("Conv") == 1
    inner = [n.output[0] for n in resnet.graph.node if n.op_type == "Conv"][1:]
    assert not {c.value for c in facts.cuts} & set(inner)
    assert facts.total_macs == macs(resnet, x1)
    assert [c.macs for c in facts.cuts] == sorted(c.macs for c in facts.cuts)
    auto = choose_cuts(facts, "auto", 2)  # ~1/3 and ~2/3 of the MACs: after blocks 0 and 1
    assert [nodes[c.node].op_type for c in auto] == ["Relu", "Relu"]
    assert 0.2 < auto[0].macs / facts.total_macs < 0.5 < auto[1].macs / facts.total_macs < 0.85


def test_a_named_exit_must_be_a_cut(resnet, x1):
    facts = find_cuts(resnet, x1)
    inside = next(n.name for n in resnet.graph.node if n.op_type == "Relu")  # stem: fine
    block_inner = [n.name for n in resnet.graph.node if n.op_type == "Relu"][1]  # inside block 0
    assert [c.node for c in choose_cuts(facts, [inside])] == [inside]
    with pytest.raises(InvalidSpec, match="valid: ") as e:
        choose_cuts(facts, [inside, block_inner, "nope"])
    assert [err["loc"] for err in e.value.errors] == [["exits", 1], ["exits", 2]]
    assert facts.cuts[-1].node in str(e.value)
