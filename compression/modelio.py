"""Reading uploads into ONNX (plain, zipped with external data, or a ``torch.export`` program) and saving.

Everything a user sends is hostile until checked: zip members may not leave the extraction folder,
external-data paths may not leave the upload, pickles are refused, and the result must load in
ONNX Runtime before it is accepted.
"""
from __future__ import annotations

import os
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from compression.analysis import graph_io, param_counts
from compression.archives import ZIP_ERRORS, check_zip_sizes
from compression.errors import InvalidModel, UnsupportedModelFormat

# ONNX protobuf cannot exceed 2 GiB in one file; above this we keep weights as external data (the service's
# ``external_data_above_bytes`` setting, lowered in tests so a small model takes the same road).
PROTOBUF_LIMIT = 1_900_000_000
EXTERNAL_TENSOR_MIN_BYTES = 1024  # smaller tensors (shapes, scales) stay in the graph
EXTERNAL_ALIGN = 4096  # a page: ONNX Runtime maps page-aligned external data rather than copying it


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    format: str  # "onnx" | "onnx_zip" | "pt2"


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _is_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and head[1] <= 5


def read_upload(path: Path, filename: str, workdir: Path, *, max_unpacked_bytes: int,
                lazy_above: int | None = None, max_ratio: float | None = None) -> LoadedModel:
    """Turn an uploaded file into a validated ONNX model.

    Args:
        path: the uploaded bytes on disk.
        filename: the client's file name (only its suffix is used as a hint).
        workdir: an empty private folder for unpacking.
        max_unpacked_bytes: cap on what a zip may unpack to (zip bombs).
        max_ratio: cap on a zip member's uncompressed / compressed size, checked before inflating (see
            :func:`safe_extract`); None: only the size cap.
        lazy_above: for a ``.zip`` whose external data exceeds this many bytes, validate without loading
            the weights into this process (the API: a 1 GiB model must not cost it gigabytes); the graph
            comes back with its external references, and the zip itself is what gets stored
            (:func:`load_stored` opens it later). None: always load.

    Returns:
        LoadedModel; every external tensor loaded into memory unless ``lazy``.

    Raises:
        UnsupportedModelFormat: pickled checkpoints (``torch.save``), never unpickled.
        InvalidModel: anything else we cannot read safely.
    """
    suffix = PurePosixPath(filename or "").suffix.lower()
    if _is_pickle(path):
        raise UnsupportedModelFormat("pickled files are refused; upload ONNX or a torch.export .pt2 program")
    if _is_zip(path):
        names = _zip_names(path)
        if any(n.endswith("data.pkl") for n in names) and not any(n.endswith("archive_format") for n in names):
            raise UnsupportedModelFormat(
                "this is a pickled torch.save checkpoint, which is never unpickled; "
                "upload ONNX or a torch.export .pt2 program (torch.export.save)"
            )
        if suffix == ".pt2" or any(n.endswith("archive_format") for n in names):
            return LoadedModel(pt2_to_onnx(path, workdir), "pt2")
        return LoadedModel(_load_onnx_zip(path, workdir, max_unpacked_bytes, lazy_above=lazy_above,
                                          max_ratio=max_ratio), "onnx_zip")
    if suffix in (".pt", ".pth", ".ckpt", ".bin", ".pkl"):
        raise UnsupportedModelFormat(f"{suffix} checkpoints are refused; upload ONNX or a torch.export .pt2")
    model = _parse_onnx(path)
    if any(external_data_helper.uses_external_data(t) for t in _all_tensors(model)):
        raise InvalidModel("this ONNX refers to external data files: upload a .zip holding the .onnx and its data")
    validate(model)
    return LoadedModel(model, "onnx")


def _parse_onnx(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise InvalidModel(f"not a readable ONNX model: {type(e).__name__}") from None
    if len(model.graph.node) == 0 or not model.graph.output:
        raise InvalidModel("not an ONNX model: empty graph")
    return model


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except zipfile.BadZipFile as e:
        raise InvalidModel(f"corrupt zip: {e}") from None


def safe_extract(path: Path, dest: Path, *, max_unpacked_bytes: int, max_ratio: float | None = None) -> list[Path]:
    """Extract a zip refusing traversal, absolute paths, links and bombs; returns extracted files.

    The whole central directory is checked first (names, links, declared sizes, compression ratios), so a
    refused zip has had nothing inflated; then members are extracted counting real bytes (lying headers).

    Args:
        max_unpacked_bytes: cap on the total uncompressed size.
        max_ratio: cap on uncompressed / compressed size (per member and for the whole zip, see
            :func:`compression.archives.check_zip_sizes`); None for zips this service stored itself.

    Raises:
        InvalidModel: an unsafe member, a bomb, or a corrupt zip.
    """
    dest = dest.resolve()
    try:
        with zipfile.ZipFile(path) as zf:
            members = _checked_members(zf, dest)
            check_zip_sizes(zf, archive_bytes=path.stat().st_size, max_total=max_unpacked_bytes,
                            max_ratio=max_ratio, error=InvalidModel)
            return _extract_counting(zf, members, max_unpacked_bytes)
    except ZIP_ERRORS as e:
        raise InvalidModel(f"corrupt zip: {type(e).__name__}: {e}") from None


def _checked_members(zf: zipfile.ZipFile, dest: Path) -> list[tuple[zipfile.ZipInfo, Path]]:
    """Every file member with its target under ``dest``; raises on traversal, absolute paths and links."""
    out = []
    for info in zf.infolist():
        name = info.filename
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts or "\\" in name or (p.parts and p.parts[0].endswith(":")):
            raise InvalidModel(f"zip member {name!r} points outside the upload")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise InvalidModel(f"zip member {name!r} is a link; links are refused")
        if info.is_dir():
            continue
        target = dest.joinpath(*p.parts)
        if not str(target.resolve()).startswith(str(dest) + os.sep):
            raise InvalidModel(f"zip member {name!r} points outside the upload")
        out.append((info, target))
    return out


def _extract_counting(zf: zipfile.ZipFile, members: list[tuple[zipfile.ZipInfo, Path]],
                      max_unpacked_bytes: int) -> list[Path]:
    """Inflate checked members, counting real bytes: a header that lies about a size stops here."""
    out: list[Path] = []
    total = 0
    for info, target in members:
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with zf.open(info) as src, open(target, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                written += len(chunk)
                if written > info.file_size or total + written > max_unpacked_bytes:
                    raise InvalidModel("zip member is larger than declared")
                dst.write(chunk)
        total += written
        out.append(target)
    return out


def _load_onnx_zip(path: Path, workdir: Path, max_unpacked_bytes: int, *,
                   lazy_above: int | None = None, max_ratio: float | None = None) -> onnx.ModelProto:
    root = workdir / "unzipped"
    root.mkdir(parents=True, exist_ok=True)
    files = safe_extract(path, root, max_unpacked_bytes=max_unpacked_bytes, max_ratio=max_ratio)
    onnx_files = [f for f in files if f.suffix == ".onnx"]
    preferred = [f for f in onnx_files if f.name == "model.onnx"]
    if len(preferred) == 1:
        onnx_path = preferred[0]
    elif len(onnx_files) == 1:
        onnx_path = onnx_files[0]
    else:
        raise InvalidModel(f"the zip must hold one .onnx (or one named model.onnx), found {len(onnx_files)}")
    model = _parse_onnx(onnx_path)
    base = onnx_path.parent.resolve()
    external_bytes = 0
    for t in _all_tensors(model):
        if external_data_helper.uses_external_data(t):
            info = external_data_helper.ExternalDataInfo(t)
            loc = info.location
            p = PurePosixPath(loc)
            if not loc or p.is_absolute() or ".." in p.parts or "\\" in loc or ":" in loc:
                raise InvalidModel(f"tensor {t.name!r}: external data path {loc!r} leaves the upload")
            target = base.joinpath(*p.parts)
            if target.is_symlink() or not target.is_file():
                raise InvalidModel(f"tensor {t.name!r}: external data file {loc!r} is missing")
            if not str(target.resolve()).startswith(str(base) + os.sep):
                raise InvalidModel(f"tensor {t.name!r}: external data path {loc!r} leaves the upload")
            if info.offset is not None and info.length is not None:
                if info.offset < 0 or info.length < 0 or info.offset + info.length > target.stat().st_size:
                    raise InvalidModel(f"tensor {t.name!r}: external data range is out of the file")
            external_bytes += _check_external_size(t, info, target)
    if lazy_above is not None and external_bytes > lazy_above:
        validate_on_disk(model, onnx_path)
        shutil.rmtree(root, ignore_errors=True)
        return model
    try:
        external_data_helper.load_external_data_for_model(model, str(base))
    except Exception as e:
        raise InvalidModel(f"could not load external data: {e}") from None
    validate(model)
    shutil.rmtree(root, ignore_errors=True)
    return model


def _check_external_size(t: onnx.TensorProto, info: external_data_helper.ExternalDataInfo, target: Path) -> int:
    """The bytes an external tensor points at must be exactly what its shape and type need."""
    numel = int(np.prod([int(d) for d in t.dims], dtype=np.float64)) if t.dims else 1
    if any(d < 0 for d in t.dims) or numel > 2**34:
        raise InvalidModel(f"tensor {t.name!r} declares an impossible shape {list(t.dims)}")
    if t.data_type == onnx.TensorProto.STRING:
        raise InvalidModel(f"tensor {t.name!r}: string tensors cannot be external data")
    want = _tensor_nbytes(t)
    offset = info.offset or 0
    have = info.length if info.length is not None else target.stat().st_size - offset
    if have != want or offset + want > target.stat().st_size:
        raise InvalidModel(f"tensor {t.name!r}: external data holds {have} bytes, shape {list(t.dims)} needs {want}")
    return want


def validate_on_disk(model: onnx.ModelProto, onnx_path: Path) -> None:
    """:func:`validate` for a model whose weights stay in their files: the checker reads the path (it checks
    external references without loading them) and ONNX Runtime loads the model from the path. Callers run
    this in the sandbox (:mod:`compression.sandbox`), so the weights never enter the API's memory."""
    for t in _all_tensors(model):
        if any(d < 0 for d in t.dims):
            raise InvalidModel(f"tensor {t.name!r} declares an impossible shape {list(t.dims)}")
    try:
        onnx.checker.check_model(str(onnx_path))
    except Exception as e:
        raise InvalidModel(f"ONNX checker: {str(e)[:500]}") from None
    _ort_load(str(onnx_path))


def _ort_load(model: str | bytes) -> None:
    """An ONNX Runtime session from the model (a path or bytes); a readable error when it cannot be made.

    Allocation failures propagate as they are (the sandbox turns them into its memory limit)."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    except Exception as e:
        text = str(e)
        if "bad_alloc" in text or "Failed to allocate" in text:
            raise MemoryError(text[:200]) from None
        raise InvalidModel(f"ONNX Runtime cannot load it: {text[:500]}") from None


def load_stored(path: Path, workdir: Path, *, max_unpacked_bytes: int = 1 << 40) -> onnx.ModelProto:
    """Open a stored model: a plain ``.onnx``, or a validated ``.zip`` of ONNX + external data (unpacked
    into ``workdir``, weights loaded). The worker's and preflight's way in."""
    if not _is_zip(path):
        return onnx.load_model(str(path))
    root = workdir / "unzipped-stored"
    root.mkdir(parents=True, exist_ok=True)
    files = safe_extract(path, root, max_unpacked_bytes=max_unpacked_bytes)  # checked at upload; checked again
    onnx_files = [f for f in files if f.suffix == ".onnx"]
    onnx_path = next((f for f in onnx_files if f.name == "model.onnx"), onnx_files[0] if onnx_files else None)
    if onnx_path is None:
        raise InvalidModel("the stored zip holds no .onnx")
    model = onnx.load_model(str(onnx_path), load_external_data=False)
    external_data_helper.load_external_data_for_model(model, str(onnx_path.parent))
    shutil.rmtree(root, ignore_errors=True)
    return model


def pt2_to_onnx(path: Path, workdir: Path) -> onnx.ModelProto:
    """Read a ``torch.export`` program without pickle (:func:`compression.pt2.load_program`), export it to ONNX."""
    import torch  # heavy: only the .pt2 road needs it

    from compression.pt2 import load_program

    ep, args = load_program(path)
    out = workdir / "from_pt2.onnx"
    try:
        torch.onnx.export(ep, args, str(out), dynamo=True, external_data=False)
    except Exception as e:
        raise InvalidModel(f"torch.onnx.export failed on this program: {type(e).__name__}: {str(e)[:300]}") from None
    model = onnx.load_model(str(out))
    validate(model)
    return model


def all_tensors(model: onnx.ModelProto):  # an iterator of TensorProto
    """Every tensor of the model: initializers, Constant attributes, subgraphs'."""
    yield from external_data_helper._get_all_tensors(model)


_all_tensors = all_tensors


def uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether some tensor's bytes live in a file beside the graph (not loaded)."""
    return any(external_data_helper.uses_external_data(t) for t in all_tensors(model))


def validate(model: onnx.ModelProto) -> None:
    """onnx's checker, tensor sizes that agree with their declared shapes, and an ONNX Runtime load."""
    for t in _all_tensors(model):
        numel = int(np.prod([int(d) for d in t.dims], dtype=np.float64)) if t.dims else 1
        if any(d < 0 for d in t.dims) or numel > 2**34:
            raise InvalidModel(f"tensor {t.name!r} declares an impossible shape {list(t.dims)}")
        if t.HasField("raw_data") and t.data_type not in (onnx.TensorProto.STRING,):
            itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(t.data_type)
            want = (numel * bits + 7) // 8 if bits else numel * itemsize
            if len(t.raw_data) != want:
                raise InvalidModel(f"tensor {t.name!r}: {len(t.raw_data)} bytes for shape {list(t.dims)}")
    try:
        if model.ByteSize() < PROTOBUF_LIMIT:
            onnx.checker.check_model(model)
    except Exception as e:
        raise InvalidModel(f"ONNX checker: {e}") from None
    _ort_load(serialize(model))


def serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def save(model: onnx.ModelProto, path: Path, *, external_above: int = PROTOBUF_LIMIT) -> list[Path]:
    """Write a model; one of more than ``external_above`` bytes keeps its weights in ``<name>.data`` beside
    it (protobuf cannot hold 2 GiB in one file). Returns the files written, the ``.onnx`` first.

    ``model`` is left as it was: onnx's own external-data save strips the weights out of the proto it writes,
    which would leave the caller (the pipeline goes on with the same model) holding references to a file.
    Here a skeleton of the model (every field but the initializers, which get only their name, type, shape
    and external reference) is what gets written, each weight's bytes streamed to ``data`` one tensor at a
    time. Clearing and restoring the weights in place, as first written, cost a whole second copy: protobuf
    keeps a cleared field's bytes in its arena until the message is freed, and the restored bytes are new.

    Example:
        >>> [p.name for p in save(model, tmp / "model.onnx", external_above=0)]  # doctest: +SKIP
        ['model.onnx', 'model.onnx.data']
    """
    path = Path(path)
    if weight_bytes(model) <= external_above:  # not model.ByteSize(): protobuf raises on a model over 2 GiB
        onnx.save_model(model, str(path))
        return [path]
    data = path.with_name(path.name + ".data")
    skeleton = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            _copy_field(skeleton, fd, value)
    for fd, value in model.graph.ListFields():
        if fd.name != "initializer":
            _copy_field(skeleton.graph, fd, value)
    with open(data, "wb") as f:
        for t in model.graph.initializer:
            if not t.HasField("raw_data") or _tensor_nbytes(t) < EXTERNAL_TENSOR_MIN_BYTES:
                skeleton.graph.initializer.add().CopyFrom(t)  # small, or typed fields: kept inline
                continue
            ref = skeleton.graph.initializer.add()
            ref.name, ref.data_type, ref.doc_string = t.name, t.data_type, t.doc_string
            ref.dims.extend(t.dims)
            _write_external(f, ref, t.raw_data, data.name)
        for t in all_tensors(skeleton):  # big tensors elsewhere (Constant nodes, subgraphs): the skeleton's own
            if t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_TENSOR_MIN_BYTES:
                _write_external(f, t, t.raw_data, data.name)
                t.ClearField("raw_data")
    onnx.save_model(skeleton, str(path))  # the graph alone: its big tensors point into ``data``
    return [path, data]


def _copy_field(dst: Any, fd: Any, value: Any) -> None:
    """Copy one set field of a protobuf message (``ListFields``' pair) into ``dst``."""
    repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
    if repeated:
        getattr(dst, fd.name).extend(value)
    elif fd.message_type is not None:
        getattr(dst, fd.name).CopyFrom(value)
    else:
        setattr(dst, fd.name, value)


def _write_external(f: Any, t: onnx.TensorProto, raw: bytes, location: str) -> None:
    """Append ``raw`` to the open data file at a page-aligned offset (so ONNX Runtime may map it instead of
    copying) and point ``t`` there."""
    pos = f.tell()
    offset = pos + (-pos) % EXTERNAL_ALIGN
    f.seek(offset)
    f.write(raw)
    del t.external_data[:]  # not onnx's set_external_data: it insists on raw_data, which a reference lacks
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    t.data_location = onnx.TensorProto.EXTERNAL


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's tensors, loaded or still in external files (what :func:`save` measures against
    its limit, without serializing anything).

    Example:
        >>> weight_bytes(onnx.load("lenet.onnx"))  # doctest: +SKIP
        1066440
    """
    total = 0
    for t in all_tensors(model):
        if external_data_helper.uses_external_data(t) or t.HasField("raw_data"):
            total += _tensor_nbytes(t)  # from its shape: its raw bytes are not copied to count them
        else:
            total += t.ByteSize()  # typed fields (float_data, ...): one tensor is under 2 GiB
    return total


def _tensor_nbytes(t: onnx.TensorProto) -> int:
    numel = int(np.prod([int(d) for d in t.dims], dtype=np.float64)) if t.dims else 1
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(t.data_type)
    return (numel * bits + 7) // 8 if bits else numel * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def describe(model: onnx.ModelProto) -> dict[str, Any]:
    """Inputs and outputs (name, shape, dtype) and the parameter count, for the model's API record.

    The count is :func:`compression.analysis.param_counts`'s, the one the job's metrics report too.
    """
    return {**graph_io(model), "params": param_counts(model)[0]}


def array_of(t: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(t)
