"""The quality gate and the verdict (compression/gate.py) on a trained LeNet and on measured numbers."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from compression.errors import QualityGateFailed
from compression.gate import check_gate, verdict
from compression.metrics import fidelity
from compression.pipeline import run_pipeline
from compression.spec import EvalSpec, parse_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BROKEN = {"method": "prune", "sparsity": 0.99}  # magnitude pruning, no fine-tuning: the model falls apart
EVAL = {"latency_runs": 5}


def test_a_broken_step_fails_the_gate_with_its_numbers(lenet, tmp_path):
    model, data = lenet
    with pytest.raises(QualityGateFailed) as err:
        run_pipeline(model, parse_spec({"steps": [BROKEN], "eval": EVAL}), data, tmp_path)
    e = err.value
    d = e.details
    assert e.code == "quality_gate"
    assert d["step"] == 0 and d["method"] == "prune" and d["metric"] == "accuracy" and not d["within"]
    assert d["original"] > 0.85 and d["value"] < d["original"] - 0.05  # the numbers are the measured ones
    assert d["drop_pt"] == pytest.approx((d["original"] - d["value"]) * 100, abs=1e-3) and d["max_drop_pt"] == 5.0
    msg = str(e)
    assert msg.startswith("step 1 (prune): accuracy ")
    assert f"drop {d['drop_pt']:.1f} pt > max_drop 5 pt" in msg and "eval.gate: false" in msg
    assert not (tmp_path / "model.onnx").exists()  # nothing was written to publish


def test_gate_false_publishes_and_the_verdict_says_over_budget(lenet, tmp_path):
    model, data = lenet
    res = run_pipeline(model, parse_spec({"steps": [BROKEN], "eval": {**EVAL, "gate": False}}), data, tmp_path)
    v = res.metrics["result"]["verdict"]
    assert v == res.metrics["steps"][0]["verdict"]
    assert v["within_budget"] is False and v["smaller"] is False  # weight zeros are stored dense: same file size
    assert "over budget" in v["summary"] and "accuracy −" in v["summary"]
    onnx.checker.check_model(onnx.load(tmp_path / "model.onnx"))


def test_a_wider_budget_lets_the_same_step_through(lenet, tmp_path):
    model, data = lenet
    res = run_pipeline(model, parse_spec({"steps": [BROKEN], "eval": {**EVAL, "max_drop": 100}}), data, tmp_path)
    assert res.metrics["result"]["verdict"]["within_budget"] is True


def test_without_labels_the_gate_asks_for_agreement(lenet, tmp_path):
    model, _ = lenet  # no dataset: synthetic inputs, no labels, class scores
    with pytest.raises(QualityGateFailed) as err:
        run_pipeline(model, parse_spec({"steps": [BROKEN], "eval": EVAL}), None, tmp_path)
    d = err.value.details
    assert d["metric"] == "agreement" and d["original"] == 1.0 and d["value"] < 0.95
    assert "top-1 agreement with the original" in str(err.value) and "no labels" in str(err.value)


ORIG_SCORES = {"accuracy": 0.93, "agreement": 1.0, "output_cosine": 1.0}
DETECTOR = {"output_cosine": 1.0}  # a [N, 4+C, anchors] map: no accuracy, no agreement


def test_outputs_that_are_not_class_scores_are_gated_by_cosine():
    ok = {"output_cosine": 0.95}
    assert check_gate(0, "quantize", ok, DETECTOR, EvalSpec())["within"]
    with pytest.raises(QualityGateFailed, match=r"step 2 \(prune\): output cosine to the original 0.6200 < "
                                                r"min_cosine 0.9; set eval.min_cosine"):
        check_gate(1, "prune", {"output_cosine": 0.62}, DETECTOR, EvalSpec())
    assert check_gate(1, "prune", {"output_cosine": 0.62}, DETECTOR, EvalSpec(min_cosine=0.5))["within"]


def test_a_changed_output_shape_fails_whatever_the_budget():
    m = {"accuracy": 0.93, "output_shape_mismatch": [[400, 5], [400, 10]]}
    with pytest.raises(QualityGateFailed, match=r"first output has shape \[400, 5\], the original's \[400, 10\]"):
        check_gate(0, "slim", m, ORIG_SCORES, EvalSpec(max_drop=100))
    assert check_gate(0, "slim", m, ORIG_SCORES, EvalSpec(gate=False))["within"] is False


def test_verdict_words_and_noise_margin():
    m = {"accuracy": 0.926, "ratios": {"file_bytes": 3.9, "latency_p50_speedup": 1.2, "throughput": 1.01}}
    v = verdict(m, ORIG_SCORES, EvalSpec())
    assert v == {"smaller": True, "faster_batch1": True, "faster_batchN": False, "within_budget": True,
                 "summary": "3.9× smaller, 1.20× faster at batch 1, same speed at batch 32 (1.01×), "
                            "accuracy −0.4 pt (budget 5 pt)"}
    slow = verdict({"accuracy": 0.93, "ratios": {"file_bytes": 0.5, "latency_p50_speedup": 0.8}}, ORIG_SCORES,
                   EvalSpec())
    assert slow["summary"] == "2.0× larger, 1.25× slower at batch 1, accuracy ±0.0 pt (budget 5 pt)"
    assert slow["faster_batch1"] is False and slow["faster_batchN"] is None and not slow["smaller"]


def test_the_centred_cosine_gates_outputs_with_a_constant_part():
    """A decoded detector output carries its anchor grid: the plain cosine stays high for a broken model,
    the centred one (deviations from the original's mean) does not, and the gate reads the centred one."""
    rng = np.random.default_rng(0)
    grid = np.tile(np.arange(84, dtype=np.float64) * 8.0, (32, 1))
    ref = grid + rng.normal(size=grid.shape)
    broken = grid + rng.normal(size=grid.shape)  # same grid, the signal gone
    m = fidelity([broken], [ref], None)
    assert m["output_cosine"] > 0.99 and abs(m["centered_cosine"]) < 0.3
    with pytest.raises(QualityGateFailed, match="centred"):
        check_gate(0, "prune", m, DETECTOR, EvalSpec())
    assert fidelity([ref + 0.01 * rng.normal(size=ref.shape)], [ref], None)["centered_cosine"] > 0.99


LM_ORIG = {"perplexity": 4.99, "output_cosine": 1.0, "token_agreement": 1.0, "kl": 0.0}


def test_language_models_are_gated_on_the_perplexity_ratio_alone():
    """Perplexity at most ×1.10 the original's (eval.max_perplexity_ratio), whatever the cosine says."""
    ok = {"perplexity": 5.02, "output_cosine": 0.5, "ratios": {"file_bytes": 3.9}}  # a low cosine does not fail it
    res = check_gate(0, "quantize", ok, LM_ORIG, EvalSpec())
    assert res == {"metric": "perplexity", "value": 5.02, "original": 4.99, "ratio": round(5.02 / 4.99, 6),
                   "max_ratio": 1.1, "within": True}
    assert verdict(ok, LM_ORIG, EvalSpec())["summary"] == "3.9× smaller, perplexity 5.02 vs 4.99 (×1.006, within ×1.10)"
    bad = {"perplexity": 5.6, "output_cosine": 0.999, "ratios": {"file_bytes": 3.9}}
    with pytest.raises(QualityGateFailed) as err:
        check_gate(1, "quantize", bad, LM_ORIG, EvalSpec())
    assert str(err.value) == ("step 2 (quantize): perplexity 5.6 vs 4.99 original (×1.122 > max_perplexity_ratio "
                              "×1.10); set eval.max_perplexity_ratio or eval.gate: false to publish anyway")
    d = err.value.details
    assert d["metric"] == "perplexity" and d["ratio"] == pytest.approx(5.6 / 4.99) and d["max_ratio"] == 1.1
    assert d["step"] == 1 and not d["within"]
    v = verdict(bad, LM_ORIG, EvalSpec())
    assert v["within_budget"] is False and v["summary"].endswith("perplexity 5.60 vs 4.99 (×1.122, over budget ×1.10)")
    assert check_gate(1, "quantize", bad, LM_ORIG, EvalSpec(max_perplexity_ratio=1.2))["within"]
    # a search's perplexity target wider than the gate wins; an accuracy target does not touch it
    wide = {"metric": "perplexity", "max_perplexity_ratio": 1.5, "max_accuracy_drop": 0.01}
    assert check_gate(1, "search", bad, LM_ORIG, EvalSpec(), target=wide)["max_ratio"] == 1.5
    with pytest.raises(QualityGateFailed):
        check_gate(1, "search", bad, LM_ORIG, EvalSpec(), target={**wide, "metric": "accuracy"})
    with pytest.raises(QualityGateFailed, match="perplexity is not measurable"):
        check_gate(0, "quantize", {"output_cosine": 1.0}, LM_ORIG, EvalSpec())


def test_a_perplexity_target_ranks_candidates_by_their_relative_rise():
    from compression.search import metric_drop
    from compression.search_space import TargetSpec

    assert metric_drop({"perplexity": 5.5}, {"perplexity": 5.0}, "perplexity") == pytest.approx(0.1)
    t = TargetSpec(metric="perplexity", max_perplexity_ratio=1.05)
    assert t.allowed_drop() == pytest.approx(0.05) and TargetSpec().allowed_drop() == 0.01
    with pytest.raises(Exception, match="needs a language model"):
        metric_drop({"accuracy": 0.9}, {"accuracy": 0.9}, "perplexity")
