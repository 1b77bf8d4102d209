"""Channel pruning over the real architectures of :mod:`testkit.real_zoo`: multi-branch CNNs (C2f splits and
concats, SPPF, depthwise convs, squeeze-excite, LayerNorm over channels, skip concats) prune, and the graph
that comes back is smaller and runs in ONNX Runtime."""
from __future__ import annotations

import onnx
import pytest

from compression.analysis import count_params, macs
from testkit.helpers import apply_step, run_ort
from testkit.real_zoo import build

CNNS = ["resnet18", "resnet50", "mobilenetv2", "mobilenetv3", "efficientnet", "convnext", "unet", "crnn", "yolov8"]
PRUNE = {"method": "prune", "granularity": "channel", "sparsity": 0.25}


def _prune(name: str, form: str, folder, tmp_path):
    built = build(name, form, folder)
    model = onnx.load(str(built.path))
    return built, model, apply_step(PRUNE, model, None, tmp_path)


@pytest.mark.parametrize("form", ["legacy17", "fixed1"])
def test_yolov8_prunes_through_c2f_sppf_and_the_head(form, zoo_folder, tmp_path):
    built, model, res = _prune("yolov8", form, zoo_folder, tmp_path)
    ignored = {i["layer"]: i["reason"] for i in res.report["ignored"]}
    assert all(r.startswith("feeds a graph output") for r in ignored.values())  # only the box/class/DFL convs
    assert len(res.report["layers"]) - len(ignored) >= 50
    feeds = {k: v[:1] for k, v in built.inputs.items()}
    assert count_params(res.model)[0] < 0.8 * count_params(model)[0]
    assert macs(res.model, feeds) < 0.8 * macs(model, feeds)
    assert run_ort(res.model, feeds).shape == run_ort(model, feeds).shape


@pytest.mark.parametrize("name", CNNS)
def test_every_zoo_cnn_prunes_or_says_why(name, zoo_folder, tmp_path):
    built, model, res = _prune(name, "legacy17", zoo_folder, tmp_path)
    assert res.report["channels_after"] < res.report["channels_before"]
    assert all(i["reason"] for i in res.report["ignored"])
    changed = [la["channels_after"] for la in res.report["layers"]
               if la["channels_after"] != la["channels_before"] and la["channels_before"] > 8]
    # round_to 8 by default; a layer coupled to one of 8 channels or fewer (not rounded) may end in between
    assert sum(c % 8 == 0 for c in changed) >= 0.8 * len(changed)
    feeds = {k: v[:3] for k, v in built.inputs.items()}
    assert run_ort(res.model, feeds).shape == run_ort(model, feeds).shape
