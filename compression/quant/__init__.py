"""Helpers of the ``quantize`` technique (``compression.techniques.quantization``).

Nothing here registers a technique: the registry imports every module of ``compression.techniques``,
so scheme implementations live in this package instead.

- ``layers``: which initializers are layer weights, and their output-channel axis.
- ``packing``: low-bit codes packed into bytes and decoded in-graph (``BitShift`` → ``Gather``/affine).
- ``kmeans``: 1-D k-means with a fixed zero centroid (pruned zeros survive clustering).
- ``fake``: torch parametrizations (cluster, sign, int8 fake-quant) and activation fake-quant.
- ``trainable``: the ONNX → torch round trip shared by the training-based schemes.
- ``cluster``, ``lowbit``, ``qat``, ``fp16``: the schemes.
"""
