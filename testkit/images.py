"""Vision-data fixtures that the CLI's and the dashboard's image-folder tests share: a model with a fixed
``[N, 3, hw, hw]`` input, and JPEG crops of scikit-learn's two sample photos in one folder per photo."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def conv_model(path: Path, hw: int = 64) -> Path:
    """A small classifier whose input ``images`` is fixed at [N, 3, hw, hw] (as an exporter writes a vision model)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    k = numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "k")
    w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 2)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["images", "k"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["logits"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                            ["N", 3, hw, hw])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], [k, w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def photo_crops(folder: Path, n: int = 20, crop: int = 96, seed: int = 0) -> dict[Path, str]:
    """``n`` JPEG crops of ``crop``×``crop`` pixels of the two sample photos (china, flower), alternating, saved as
    ``folder/<photo>/cropNN.jpg``; returns each file's photo name (its class)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    rng = np.random.default_rng(seed)
    expected = {}
    for i in range(n):
        src, name = photos.images[i % 2], photos.filenames[i % 2].rsplit("/", 1)[-1].split(".")[0]
        y, x = int(rng.integers(0, src.shape[0] - crop)), int(rng.integers(0, src.shape[1] - crop))
        path = folder / name / f"crop{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(src[y:y + crop, x:x + crop]).save(path, quality=95)
        expected[path] = name
    return expected
