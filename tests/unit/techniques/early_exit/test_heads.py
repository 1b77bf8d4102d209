"""Exit heads: the original output stays first and unchanged; the heads' layout and MACs are the stated ones."""
from __future__ import annotations

import numpy as np
import onnx

from compression.metrics import session
from compression.techniques.early_exit.cuts import choose_cuts, find_cuts
from compression.techniques.early_exit.heads import add_exit_heads


def test_heads_keep_the_original_output_first(cnn, x1):
    model, data = cnn
    facts = find_cuts(model, x1)
    assert len(choose_cuts(facts, "auto", 3)) == 2  # after fc1 too little work is left to be worth an exit
    cuts = choose_cuts(facts, ["/features/features.3/MaxPool", "/features/features.7/MaxPool",
                               "/classifier/classifier.2/Relu"])
    multi, layout = add_exit_heads(model, cuts, facts.classes, pool_size=4, hidden=16)
    onnx.checker.check_model(multi, full_check=True)
    assert [o.name for o in multi.graph.output] == ["logits", "exit_1", "exit_2", "exit_3"]
    x = data.holdout.inputs["input"][:50]
    outs = session(multi, 1, quiet=True).run(None, {"input": x})
    np.testing.assert_array_equal(outs[0], session(model, 1, quiet=True).run(None, {"input": x})[0])
    assert all(o.shape == (50, 10) for o in outs)
    heads = multi.graph.node[layout.backbone_nodes:]
    assert [n.op_type for n in heads[:5]] == ["AveragePool", "Flatten", "Gemm", "Relu", "Gemm"]
    # 14×14 pooled 3×3/3 → 4×4, 7×7 flattened as is (then hidden 16); the [N, 128] exit needs neither
    assert layout.head_macs == [16 * 4 * 4 * 16 + 16 * 10, 32 * 7 * 7 * 16 + 16 * 10, 128 * 16 + 16 * 10]
    ops = [n.op_type for n in heads]
    assert ops.count("AveragePool") == 1 and ops.count("Flatten") == 2 and ops.count("Gemm") == 6
