"""The recovery recipe every training step shares: validation slice, best epoch, early stopping, schedule,
augmentation, epochs sized by the data."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from compression.augment import Augmenter, augmenter_for
from compression.data import Arrays
from compression.spec import AugmentSpec, FinetuneSpec, auto_epochs
from compression.training import LossConfig, Recipe, Validation, carve_validation, loss_fn, predict, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits() -> tuple[Arrays, Arrays]:
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    return Arrays({"x": X[:1200]}, y[:1200].astype(np.int64)), Arrays({"x": X[1200:]}, y[1200:].astype(np.int64))


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


CE = LossConfig(use_labels=True, distill=False, temperature=1.0, alpha=1.0)


def _accuracy(net: nn.Module, arrays: Arrays) -> float:
    return float((predict(net, ["x"], arrays).argmax(1) == arrays.labels).mean())


def test_the_validation_slice_comes_from_the_training_split_only(digits):
    train_split, _ = digits
    tr, val = carve_validation(train_split, 0.1, seed=3)
    assert val is not None and (tr.samples, val.samples) == (1080, 120)
    rows = {r.tobytes() for r in train_split.inputs["x"]}
    seen = [r.tobytes() for r in tr.inputs["x"]] + [r.tobytes() for r in val.inputs["x"]]
    assert set(seen) <= rows and len(seen) == train_split.samples
    assert not {r.tobytes() for r in tr.inputs["x"]} & {r.tobytes() for r in val.inputs["x"]}
    again, val2 = carve_validation(train_split, 0.1, seed=3)
    np.testing.assert_array_equal(val.inputs["x"], val2.inputs["x"])  # seeded: the same slice every run
    assert carve_validation(train_split.take(np.arange(30)), 0.1, 0)[1] is None  # too few: no slice


def _wrecked_after(net: nn.Module, steps: int):
    """An ``after_step`` that lets the network learn for ``steps`` optimizer steps and then scrambles its first
    layer after every step: a run whose later epochs are far worse than its early ones."""
    count = [0]
    gen = torch.Generator().manual_seed(0)

    def after_step() -> None:
        count[0] += 1
        if count[0] > steps:
            with torch.no_grad():
                net[0].weight.add_(torch.randn(net[0].weight.shape, generator=gen))
    return after_step


def test_the_best_epoch_is_kept_and_a_run_that_turns_bad_stops_early(digits):
    train_split, _ = digits
    tr, val = carve_validation(train_split, 0.2, seed=0)
    validation = Validation(val, None)
    per_epoch = -(-tr.samples // 32)
    runs = {}
    for keep in ("best", "last"):
        net = _net()
        log = train(net, ["x"], tr, epochs=8, lr=3e-3, batch_size=32, loss=CE, teacher=None, seed=0,
                    after_step=_wrecked_after(net, 3 * per_epoch),
                    recipe=Recipe(epochs=8, lr=3e-3, batch_size=32, keep=keep, patience=None), validation=validation)
        runs[keep] = (net, log)
    best_net, best_log = runs["best"]
    last_net, last_log = runs["last"]
    assert best_log.metric == "accuracy" and len(best_log.validation) == 9  # epoch 0 (untrained) + 8
    kept = best_log.kept_epoch
    assert kept == int(np.argmax(best_log.validation)) == 3
    assert _accuracy(best_net, val) == pytest.approx(max(best_log.validation), abs=1e-6)
    assert _accuracy(best_net, val) > 0.85 and _accuracy(best_net, val) > _accuracy(last_net, val) + 0.2
    assert best_log.summary()["kept_epoch"] == 3 and last_log.kept_epoch is None
    # patience: the same run stops once the score has not improved for 2 epochs
    net = _net()
    log = train(net, ["x"], tr, epochs=8, lr=3e-3, batch_size=32, loss=CE, teacher=None, seed=0,
                after_step=_wrecked_after(net, 3 * per_epoch),
                recipe=Recipe(epochs=8, lr=3e-3, batch_size=32, keep="best", patience=2), validation=validation)
    assert len(log) == 5 and log.stopped.startswith("early stopping") and log.kept_epoch == 3


def test_cosine_schedule_warms_up_then_decays_to_zero():
    r = Recipe(epochs=10, lr=1e-3, batch_size=8, schedule="cosine", warmup=0.1)
    f = [r.lr_factor(s, 100) for s in range(100)]
    assert f[0] < f[5] < f[9] <= 1.0  # warm-up over the first 10 steps
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] < 0.01
    assert Recipe(epochs=1, lr=1.0, batch_size=1).lr_factor(50, 100) == 1.0  # constant


def test_auto_epochs_give_small_datasets_more_passes():
    assert auto_epochs(60_000, 64) == 2 and auto_epochs(300, 64) == 100 and auto_epochs(4000, 64) == 8
    spec = FinetuneSpec()
    assert spec.epochs == "auto" and spec.planned_epochs(4000) == 8 and FinetuneSpec(epochs=3).planned_epochs(9) == 3
    assert spec.patience_for(100) == 25 and spec.patience_for(8) == 5


def test_image_shifts_move_the_picture_and_keep_shape_and_dtype():
    x = np.zeros((64, 1, 14, 14), np.float32)
    x[:, :, 6:8, 6:8] = 1.0
    aug = Augmenter.build(AugmentSpec(shift=2 / 14), Arrays({"img": x}))
    out, mix = aug(Arrays({"img": x}), np.random.default_rng(0))
    y = out.inputs["img"]
    assert mix is None and y.shape == x.shape and y.dtype == np.float32
    assert np.allclose(y.sum((1, 2, 3)), 4.0)  # the blob moved, whole (edges replicate zeros)
    centres = {tuple(np.argwhere(y[i, 0])[0]) for i in range(64)}
    assert len(centres) > 10 and all(4 <= r <= 8 and 4 <= c <= 8 for r, c in centres)
    np.testing.assert_array_equal(x[:, :, 6:8, 6:8], 1.0)  # the input itself is untouched


def test_mixup_mixes_inputs_and_labels_in_one_proportion():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 8)).astype(np.float32)
    aug = Augmenter.build(AugmentSpec(mixup=1.0), Arrays({"f": x}))
    out, mix = aug(Arrays({"f": x}, np.arange(16)), np.random.default_rng(2))
    assert mix is not None and 0 < mix.lam < 1
    np.testing.assert_allclose(out.inputs["f"], mix.lam * x + (1 - mix.lam) * x[mix.perm], rtol=1e-6)
    logits = torch.randn(16, 16)
    ya, yb = torch.arange(16), torch.from_numpy(mix.perm)
    mixed = loss_fn(logits, ya, None, LossConfig(True, False, 1.0, 1.0), mixed=(yb, mix.lam))
    expect = mix.lam * nn.functional.cross_entropy(logits, ya) + (1 - mix.lam) * nn.functional.cross_entropy(logits, yb)
    assert float(mixed) == pytest.approx(float(expect), rel=1e-6)


def test_auto_augments_only_long_distillation_runs_and_leaves_ids_alone():
    img = Arrays({"img": np.zeros((8, 3, 16, 16), np.float32)})
    assert augmenter_for("auto", img, distilling=False, epochs=50) is None  # labels alone: off
    assert augmenter_for("auto", img, distilling=True, epochs=4) is None  # too short a run to pay
    auto = augmenter_for("auto", img, distilling=True, epochs=50)
    assert auto.describe() == {"img": {"shift": round(1 / 14, 4)}, "mixup": 0.2}
    ids = Arrays({"ids": np.arange(40).reshape(2, 20) + 1, "mask": np.ones((2, 20), np.int64)})
    tok = augmenter_for("auto", ids, distilling=True, epochs=50)
    assert not tok.mixes  # a mixed token id means nothing
    out, mix = tok(ids, np.random.default_rng(0))
    assert mix is None and (out.inputs["ids"][:, 0] == ids.inputs["ids"][:, 0]).all()
    assert augmenter_for("none", img, distilling=True, epochs=50) is None
