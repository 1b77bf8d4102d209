"""Image datasets built on the client: a folder of pictures as the ``.npz`` the API takes (one float32 array
named after the model's image input, optional integer ``labels``). The REST contract is unchanged: the server
only ever sees arrays.

What a vision model expects is read from its input as the API lists it: a 4-D float input, ``[N, C, H, W]``
(``nchw``) or ``[N, H, W, C]`` (``nhwc``) with C 1 or 3; a static H×W is the size every picture is resized to,
a dynamic one needs ``size``. Pixels are scaled by ``scale`` (default 1/255), then ``(x - mean) / std`` per
channel. ``labels_from_folders`` follows torchvision's ImageFolder: each sub-folder of ``root`` is a class,
numbered in sorted order.

Example:
    >>> arrays, classes = image_arrays(find_images("photos/"), size=(64, 64), labels_from_folders=True,
    ...                                root="photos/")                                     # doctest: +SKIP
    >>> arrays["input"].shape, classes                                                     # doctest: +SKIP
    ((20, 3, 64, 64), ['cats', 'dogs'])
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageDataError(ValueError):
    """An image dataset that cannot be built, in one line a user can act on (the CLI exits 2 with it)."""


def find_images(root: str | os.PathLike, *, limit: int | None = None) -> list[Path]:
    """Every JPEG/PNG/BMP/WebP under ``root`` (recursively, sorted: the same order on every run)."""
    base = Path(root)
    if not base.is_dir():
        raise ImageDataError(f"no such folder: {base}")
    found = sorted(p for p in base.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not found:
        raise ImageDataError(f"no images ({', '.join(e[1:] for e in EXTENSIONS)}) under {base}")
    return found[:limit] if limit else found


def parse_size(text: str) -> tuple[int, int]:
    """``"224x224"`` (H×W) → ``(224, 224)``."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ImageDataError(f"size must be HxW, e.g. 224x224, not {text!r}") from None
    if h < 1 or w < 1:
        raise ImageDataError(f"size must be positive, not {text!r}")
    return h, w


def image_input(inputs: Sequence[dict[str, Any]], layout: str | None = None,
                ) -> tuple[str, str | None, int, tuple[int, int] | None]:
    """The model's image input from the inputs the API lists: ``(name, layout, channels, (H, W) or None)``.

    ``layout`` None: read from the shape (channels 1 or 3 on axis 1 or axis 3); it stays None when the shape
    does not say (both could be channels, or neither is fixed)."""
    images = [i for i in inputs if len(i.get("shape") or []) == 4 and str(i.get("dtype", "")).startswith("float")]
    if len(images) != 1:
        names = [i["name"] for i in inputs]
        raise ImageDataError(f"the model has no single 4-D float image input (its inputs: {names})")
    spec = images[0]
    shape = spec["shape"]
    if layout is None:
        first, last = shape[1] in (1, 3), shape[3] in (1, 3)
        layout = "nchw" if first and not last else "nhwc" if last and not first else None
    if layout is None:
        return spec["name"], None, 3, None
    c = shape[1] if layout == "nchw" else shape[3]
    channels = c if c in (1, 3) else 3
    hw = (shape[2], shape[3]) if layout == "nchw" else (shape[1], shape[2])
    static = all(isinstance(v, int) and v > 0 for v in hw)
    return spec["name"], layout, int(channels), (int(hw[0]), int(hw[1])) if static else None


def image_arrays(paths: Sequence[Path], *, name: str = "input", size: tuple[int, int] | None = None,
                 layout: str = "nchw", channels: int = 3, order: str = "rgb", scale: float = 1 / 255,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 labels_from_folders: bool = False, root: str | os.PathLike | None = None,
                 ) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """The pictures as one float32 array (and ``labels`` with ``labels_from_folders``); returns the arrays and
    the class names (index = label) or None.

    Raises:
        ImageDataError: an unreadable picture, mixed sizes without ``size``, bad mean/std, one class only.
    """
    from PIL import Image, UnidentifiedImageError

    if layout not in ("nchw", "nhwc") or order not in ("rgb", "bgr") or channels not in (1, 3):
        raise ImageDataError(f"layout nchw|nhwc, channels rgb|bgr and 1 or 3 channels, not {layout}/{order}/{channels}")
    for what, v in (("mean", mean), ("std", std)):
        if v is not None and len(v) not in (1, channels):
            raise ImageDataError(f"{what} needs 1 or {channels} values, not {len(v)}")
    if std is not None and any(s == 0 for s in std):
        raise ImageDataError("std values must not be 0")
    pixels, sizes = [], set()
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                sizes.add((im.height, im.width))
                if size is not None and (im.height, im.width) != size:
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                pixels.append(np.asarray(im, np.float32))
        except (OSError, UnidentifiedImageError) as e:
            raise ImageDataError(f"{p}: not a readable image ({type(e).__name__})") from None
    if size is None and len(sizes) > 1:
        raise ImageDataError(f"the images have {len(sizes)} different sizes (e.g. {sorted(sizes)[:3]} as HxW) and "
                             "the model's input size is not fixed: give --size HxW")
    x = np.stack(pixels)
    if channels == 1:
        x = x[..., None]
    elif order == "bgr":
        x = x[..., ::-1]
    x = x * np.float32(scale)
    if mean is not None:
        x = x - np.asarray(mean, np.float32)
    if std is not None:
        x = x / np.asarray(std, np.float32)
    if layout == "nchw":
        x = x.transpose(0, 3, 1, 2)
    arrays = {name: np.ascontiguousarray(x, np.float32)}
    classes = None
    if labels_from_folders:
        base = Path(root) if root is not None else Path(os.path.commonpath([str(p.parent) for p in paths]))
        folder = [p.relative_to(base).parts[0] if len(p.relative_to(base).parts) > 1 else "" for p in paths]
        if "" in folder:
            raise ImageDataError(f"--labels-from-folders: pictures directly in {base} have no class folder")
        classes = sorted(set(folder))
        if len(classes) < 2:
            raise ImageDataError(f"--labels-from-folders: one class folder only ({classes[0]})")
        arrays["labels"] = np.asarray([classes.index(f) for f in folder], np.int64)
    return arrays, classes


def image_dataset(root: str | os.PathLike, inputs: Sequence[dict[str, Any]], *, size: tuple[int, int] | None = None,
                  layout: str | None = None, order: str = "rgb", scale: float = 1 / 255,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  labels_from_folders: bool = False, limit: int | None = None,
                  ) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """:func:`image_arrays` for a model: the array named after its image input, its layout and its static
    size (or ``size``; a static size that differs from ``size`` is refused, the model could not take it)."""
    name, layout, channels, model_size = image_input(inputs, layout)
    if layout is None:
        raise ImageDataError("the model's input does not say its layout: give --layout nchw or nhwc")
    if size is not None and model_size is not None and size != model_size:
        raise ImageDataError(f"--size {size[0]}x{size[1]}: the model's input is fixed at "
                             f"{model_size[0]}x{model_size[1]}")
    paths = find_images(root, limit=limit)
    return image_arrays(paths, name=name, size=size or model_size, layout=layout, channels=channels, order=order,
                        scale=scale, mean=mean, std=std, labels_from_folders=labels_from_folders, root=root)
