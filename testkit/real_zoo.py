"""The zoo of real architectures, with shipped data, and exported the ways other tools export them.

``build(name, form, folder)`` gives ``(model path, inputs, labels)``: the architecture from
:mod:`testkit.architectures`, trained for a few steps where that is cheap (so fidelity numbers mean
something: an untrained classifier's near-uniform scores make every rewrite look faithful or make
every argmax flip), exported in one of the :data:`FORMS`:

- ``dynamo``     torch's default exporter (opset 18+), dynamic batch;
- ``legacy17``   the TorchScript exporter at opset 17, dynamic batch;
- ``legacy12``   the TorchScript exporter at opset 12 (what older tools and paddle2onnx write);
- ``fixed1``     opset 11, batch fixed to 1 (a detector as many export it);
- ``constants``  opset 12 with every weight a ``Constant`` node and no initializers (paddle2onnx's form);
- ``int32``      integer inputs declared ``int32`` and cast inside (tf2onnx's form).

The data is real and ships with packages: digits (scikit-learn) upscaled to 16×16 RGB for the
classifiers, crops of scikit-learn's two sample photos for the detector and the UNet, digit strings
rendered into text lines for the CRNN, Python's own help text and Debian's license texts for the
language models, and the first bytes of files on this machine for the file-type classifier.

Everything is cached per ``(name, form)`` under the folder given, so a test session builds each once.
"""
from __future__ import annotations

import functools
import glob
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper

from testkit import architectures as A
from testkit.refdata import torch_threads
from testkit.zoo import export_onnx

FORMS = ("dynamo", "legacy17", "legacy12", "fixed1", "constants", "int32")
SAMPLES = 256  # per model: enough to calibrate, fine-tune briefly and measure; small enough for CI


# ----------------------------------------------------------------------------- data

@functools.cache
def digit_images(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8×8 digits, upscaled to ``size``², three channels, in [0, 1]; and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return x.numpy(), d.target.astype(np.int64)


@functools.cache
def photo_crops(size: int, n: int = SAMPLES, seed: int = 0) -> np.ndarray:
    """``n`` random ``size``² crops of scikit-learn's two sample photos (at half resolution), in [0, 1]."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [img[::2, ::2].astype(np.float32) / 255.0 for img in load_sample_images().images]
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - size), rng.integers(0, p.shape[1] - size)
        out[i] = p[y:y + size, x:x + size].transpose(2, 0, 1)
    return out


@functools.cache
def text_lines(n: int = SAMPLES, digits: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Lines of ``digits`` handwritten digits side by side, ``[n, 1, 16, 16·digits]``, and their strings
    (class ``d + 1``; 0 is CTC's blank)."""
    images, labels = digit_images(16)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(images), (n, digits))
    lines = np.concatenate([images[pick[:, j], :1] for j in range(digits)], axis=3)
    return np.ascontiguousarray(lines), labels[pick] + 1


@functools.cache
def text_corpus() -> list[bytes]:
    """Four sources of English: Python's help topics and three of Debian's license texts."""
    import pydoc_data.topics as topics

    sources = [" ".join(topics.topics.values()).encode()]
    for name in ("GPL-3", "Apache-2.0", "Artistic"):
        path = Path("/usr/share/common-licenses") / name
        sources.append(path.read_bytes() if path.exists() else sources[0][len(sources) * 50000:][:40000])
    return sources


@functools.cache
def text_windows(n: int = SAMPLES, length: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` byte windows (int64 ids) from the four sources, and which source each came from."""
    rng = np.random.default_rng(seed)
    corpus = text_corpus()
    ids = np.empty((n, length), np.int64)
    source = np.arange(n) % len(corpus)
    for i, s in enumerate(source):
        text = corpus[s]
        start = rng.integers(0, len(text) - length)
        ids[i] = np.frombuffer(text[start:start + length], np.uint8)
    return ids, source.astype(np.int64)


def _file_kinds() -> list[list[str]]:
    """Files of four kinds found on every machine that runs this: Python source, shared objects,
    gzip'd documents, plain-text licenses."""
    lib = os.path.dirname(os.__file__)
    kinds = [sorted(glob.glob(f"{lib}/*.py"))[:40],
             sorted(glob.glob(f"{lib}/lib-dynload/*.so") + glob.glob(f"{sys.base_prefix}/lib/*.so*"))[:40],
             sorted(glob.glob("/usr/share/doc/*/changelog*.gz"))[:40],
             sorted(glob.glob("/usr/share/common-licenses/*"))[:40]]
    return [k for k in kinds if k]


@functools.cache
def file_heads(n: int = SAMPLES, length: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` windows of ``length`` bytes (int32) of real files, and the file's kind."""
    rng = np.random.default_rng(seed)
    kinds = _file_kinds()
    out = np.zeros((n, length), np.int32)
    labels = np.arange(n) % len(kinds)
    for i, k in enumerate(labels):
        files = kinds[k]
        blob = Path(files[rng.integers(0, len(files))]).read_bytes()
        start = 0 if i % 2 == 0 or len(blob) <= length else int(rng.integers(0, len(blob) - length))
        chunk = np.frombuffer(blob[start:start + length], np.uint8)
        out[i, :len(chunk)] = chunk
    return out, labels.astype(np.int64)


# ----------------------------------------------------------------------------- training

def _train(module: torch.nn.Module, inputs: tuple[np.ndarray, ...], loss: Callable[..., torch.Tensor], *,
           steps: int, batch: int = 32, lr: float = 3e-3, seed: int = 0) -> None:
    """A few Adam steps on ``loss(module, *batch_tensors)``: cheap, and enough to leave random init."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    module.train()
    n = len(inputs[0])
    for _ in range(steps):
        idx = rng.integers(0, n, batch)
        value = loss(module, *(torch.from_numpy(a[idx]) for a in inputs))
        opt.zero_grad()
        value.backward()
        opt.step()
    module.eval()


def _ce(module, x, y):
    return F.cross_entropy(module(x), y)


def _ce_tokens(module, ids, mask, y):
    return F.cross_entropy(module(ids, mask), y)


def _next_byte(module, ids):
    logits = module(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _ctc(module, x, y):
    probs = module(x)  # [N, T, C] probabilities
    logp = probs.clamp_min(1e-8).log().transpose(0, 1)
    t = torch.full((len(x),), logp.shape[0], dtype=torch.long)
    return F.ctc_loss(logp, y, t, torch.full((len(x),), y.shape[1], dtype=torch.long))


def _pseudo_detections(module, x):
    """Detector: no boxes ship, so it learns a made-up but input-dependent task from the photos — per
    anchor cell, which of R, G, B dominates or whether it is dark (classes), and boxes as wide as the
    cell's brightness says. Enough that its outputs respond to the image, as a trained detector's do
    (an untrained head's outputs are near-constant, and every rewrite would look faithful)."""
    out = module(x)
    nc = out.shape[1] - 4
    cls_t, box_t = [], []
    for s in (8, 16, 32):
        cell = F.avg_pool2d(x, s).flatten(2)  # [N, 3, A_s]
        bright = cell.mean(1, keepdim=True)
        kind = torch.cat([cell, 0.35 - bright], 1).argmax(1)  # R, G, B dominant, or dark
        cls_t.append(F.one_hot(kind, 4).transpose(1, 2)[:, :nc].float())
        box_t.append(torch.cat([torch.zeros_like(bright).repeat(1, 2, 1), s * (0.5 + 2 * bright).repeat(1, 2, 1)], 1))
    cls_t, box_t = torch.cat(cls_t, 2), torch.cat(box_t, 2)
    box, cls = out[:, :4], out[:, 4:]
    wh_loss = F.smooth_l1_loss(box[:, 2:] / 16, box_t[:, 2:] / 16)
    return F.binary_cross_entropy(cls.clamp(1e-6, 1 - 1e-6), cls_t) + wh_loss


def _bright_mask(module, x):
    """UNet: segment the bright parts of a photo (a real, input-dependent dense target)."""
    target = (x.mean(1, keepdim=True) > 0.5).float()
    return F.binary_cross_entropy_with_logits(module(x), target)


@dataclass(frozen=True)
class Entry:
    """One zoo model: how to make it, its data (inputs in graph order, labels or None), how to train it."""

    make: Callable[[], torch.nn.Module]
    data: Callable[[], tuple[dict[str, np.ndarray], np.ndarray | None]]
    loss: Callable[..., torch.Tensor] | None
    steps: int
    output: str = "logits"
    kind: str = "vision"  # vision | detector | dense | sequence | text | lm | bytes


def _images():
    x, y = digit_images(16)
    idx = np.random.default_rng(0).permutation(len(x))[:SAMPLES * 2]
    return {"input": x[idx]}, y[idx]


def _tokens():
    ids, y = text_windows(SAMPLES * 2)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}, y


ZOO: dict[str, Entry] = {
    "resnet18": Entry(A.resnet18, _images, _ce, 40),
    "resnet50": Entry(A.resnet50, _images, _ce, 60),
    "mobilenetv2": Entry(lambda: A.MobileNet("v2"), _images, _ce, 60),
    "mobilenetv3": Entry(lambda: A.MobileNet("v3"), _images, _ce, 60),
    "efficientnet": Entry(lambda: A.MobileNet("efficientnet"), _images, _ce, 60),
    "convnext": Entry(A.ConvNeXt, _images, _ce, 40),
    "vit": Entry(A.ViT, _images, _ce, 40),
    "yolov8": Entry(A.YOLOv8, lambda: ({"images": photo_crops(64)}, None), None, 0, "output0", "detector"),
    "unet": Entry(A.UNet, lambda: ({"input": photo_crops(32)}, None), None, 0, "mask", "dense"),
    "crnn": Entry(A.CRNN, lambda: ({"image": text_lines()[0]}, None), None, 0, "probs", "sequence"),
    "bert": Entry(A.BertClassifier, _tokens, _ce_tokens, 60, kind="text"),
    "gpt": Entry(A.GPT, lambda: ({"input_ids": text_windows(SAMPLES)[0]}, None), None, 0, kind="lm"),
    "filetype": Entry(A.ByteClassifier, lambda: ({"data": file_heads(SAMPLES * 2)[0]}, file_heads(SAMPLES * 2)[1]),
                      _ce, 60, kind="bytes"),
}
# what each model's training loss needs besides its inputs (and which models train on something else)
_TRAIN_EXTRA = {"crnn": (_ctc, 40, lambda: text_lines()), "gpt": (_next_byte, 40, lambda: (text_windows(SAMPLES)[0],)),
                "yolov8": (_pseudo_detections, 40, lambda: (photo_crops(64),)),
                "unet": (_bright_mask, 40, lambda: (photo_crops(32),))}


@contextmanager
def _flush_denormals() -> Iterator[None]:
    """Denormal floats flushed to zero inside the block (torch's default, off, restored after): SiLU and
    sigmoid gates make them, and they made EfficientNet's few training steps 2.5× slower here."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@functools.cache
def trained(name: str) -> torch.nn.Module:
    """The zoo model ``name``, seeded, trained for its few steps (two threads, so it is the same model
    whichever test asks first)."""
    entry = ZOO[name]
    torch.manual_seed(0)
    module = entry.make().eval()
    inputs, labels = entry.data()
    with torch_threads(2), _flush_denormals():
        if name in _TRAIN_EXTRA:
            loss, steps, data = _TRAIN_EXTRA[name]
            _train(module, tuple(data()), loss, steps=steps)
        elif entry.loss is not None and labels is not None:
            _train(module, (*inputs.values(), labels), entry.loss, steps=entry.steps)
    return module


# ----------------------------------------------------------------------------- foreign forms

def initializers_as_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every initializer moved into a ``Constant`` node in front of the graph (paddle2onnx's form)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    consts = [helper.make_node("Constant", [], [t.name], name=f"const_{i}", value=t) for i, t in enumerate(g.initializer)]
    names = {t.name for t in g.initializer}
    keep_inputs = [i for i in g.input if i.name not in names]
    del g.input[:]
    g.input.extend(keep_inputs)
    del g.initializer[:]
    nodes = consts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return out


def integer_inputs_as_int32(model: onnx.ModelProto) -> onnx.ModelProto:
    """int64 graph inputs declared int32 and cast to int64 inside (tf2onnx's form)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    casts = []
    for inp in g.input:
        if inp.type.tensor_type.elem_type != onnx.TensorProto.INT64:
            continue
        inp.type.tensor_type.elem_type = onnx.TensorProto.INT32
        inner = inp.name + "_int64"
        for node in g.node:
            for j, name in enumerate(node.input):
                if name == inp.name:
                    node.input[j] = inner
        casts.append(helper.make_node("Cast", [inp.name], [inner], name=f"{inp.name}_cast", to=onnx.TensorProto.INT64))
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return out


@dataclass(frozen=True)
class Built:
    """A built zoo model: its ONNX file, the inputs it takes (as its graph declares them), labels or None."""

    path: Path
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    kind: str


def forms(name: str) -> tuple[str, ...]:
    """The forms that make sense for ``name``: ``int32`` only for models that take int64 ids (the
    file-type classifier takes int32 bytes in every form, as tf2onnx writes it)."""
    integer = ZOO[name].kind in ("text", "lm")
    return tuple(f for f in FORMS if f != "int32" or integer)


def build(name: str, form: str, folder: Path) -> Built:
    """Export zoo model ``name`` in ``form`` under ``folder`` (cached there), with its data.

    Raises:
        KeyError: unknown name or form.
    """
    if form not in forms(name):
        raise KeyError(f"unknown form {form!r} for {name}; forms: {forms(name)}")
    entry = ZOO[name]
    inputs, labels = entry.data()
    if form == "int32" or name == "filetype":
        inputs = {k: v.astype(np.int32) if v.dtype.kind == "i" else v for k, v in inputs.items()}
    path = Path(folder) / f"{name}-{form}.onnx"
    if not path.exists():
        module = trained(name)
        example = tuple(torch.from_numpy(v[:1 if form == "fixed1" else 2]) for v in inputs.values())
        if form == "int32":
            example = tuple(e.long() for e in example)
        opset = {"legacy17": 17, "legacy12": 12, "fixed1": 11, "constants": 12, "int32": 17}.get(form)
        tmp = path.with_suffix(".tmp.onnx")
        export_onnx(module, example, tmp, dynamo=form == "dynamo", input_names=list(inputs),
                    output_names=[entry.output], dynamic_batch=form != "fixed1", opset=opset)
        model = onnx.load(str(tmp))
        if form == "constants":
            model = initializers_as_constants(model)
        elif form == "int32":
            model = integer_inputs_as_int32(model)
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
        tmp.unlink()
    return Built(path, inputs, labels, entry.kind)


def all_weights_constant(model: onnx.ModelProto) -> bool:
    """True when the graph has no initializers (every weight in a Constant node)."""
    return len(model.graph.initializer) == 0 and any(n.op_type == "Constant" for n in model.graph.node)


__all__ = ["FORMS", "ZOO", "Built", "build", "forms", "trained", "initializers_as_constants", "integer_inputs_as_int32",
           "digit_images", "photo_crops", "text_lines", "text_windows", "file_heads"]
