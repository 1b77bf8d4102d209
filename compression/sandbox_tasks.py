"""What the sandbox child runs (:mod:`compression.sandbox`): every piece of work that reads or runs a user's model.

Each task takes ``(args, channel, limits)``: plain JSON arguments whose paths lie in the run's folder, the pipe
to the parent (``channel.ask`` for progress, checkpoints and models the spec names), and the limits it runs
under. Each returns plain JSON; large outputs are files in the run's folder.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compression import errors

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


def read_upload(args: dict[str, Any], channel: Any, limits: dict[str, Any]) -> dict[str, Any]:
    """Validate an uploaded model (ONNX, zip of ONNX + external data, ``.pt2``) and describe it.

    Writes ``args["out"]`` when the stored form is not the upload itself (a converted ``.pt2``, a small zip
    inlined into one ``.onnx``). Returns ``{format, store: "upload" | "out", inputs, outputs, params, files,
    weight_bytes}`` (``weight_bytes``: the tensors' bytes, counted from their headers: nothing more is loaded).
    """
    from compression.modelio import describe, read_upload as read, save, uses_external_data, weight_bytes

    workdir = Path(args["workdir"])
    loaded = read(Path(args["path"]), args["filename"], workdir, max_unpacked_bytes=args["max_unpacked_bytes"],
                  lazy_above=args.get("lazy_above"), max_ratio=args.get("max_ratio"))
    info = describe(loaded.model)
    store, files = "upload", 1
    if loaded.format == "pt2" or (loaded.format == "onnx_zip" and not uses_external_data(loaded.model)):
        store, files = "out", len(save(loaded.model, Path(args["out"])))
    return {"format": loaded.format, "store": store, "files": files, "weight_bytes": weight_bytes(loaded.model),
            **info}


def preflight_probe(args: dict[str, Any], channel: Any, limits: dict[str, Any]) -> dict[str, Any]:
    """What preflight needs from the model: op histogram, ops the converter lacks, weighted layers, MACs.

    The structure is sent to the parent first (``ask``), so a MAC probe that hits a limit still leaves it.
    """
    from compression.analysis import macs
    from compression.modelio import load_stored
    from compression.preflight import model_structure, zero_sample

    model = load_stored(Path(args["path"]), Path(args["workdir"]))
    structure = model_structure(model, frozenset(args["prunable_ops"]), frozenset(args["quantizable_ops"]))
    channel.ask({"type": "structure", "structure": structure})
    value = None
    if args.get("probe_macs"):
        if args.get("probe_cpu_seconds"):
            _cpu_budget(args["probe_cpu_seconds"])
        try:
            value = int(macs(model, zero_sample(model)))
        except Exception as e:  # dynamic shapes a zero batch cannot satisfy: the parent estimates from params
            if "bad_alloc" in str(e) or "Failed to allocate" in str(e):
                raise MemoryError from None  # the run needed more than the limit: say so
            value = None
    return {**structure, "macs": value}


def _cpu_budget(seconds: int) -> None:
    """Lower this process's CPU limit to ``seconds`` more than it has used (a probe's own budget; the imports
    and the structure before it are not charged to it)."""
    import resource

    used = resource.getrusage(resource.RUSAGE_SELF)
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    want = int(used.ru_utime + used.ru_stime) + seconds
    if soft == resource.RLIM_INFINITY or want < soft:
        resource.setrlimit(resource.RLIMIT_CPU, (want, want + 1 if hard == resource.RLIM_INFINITY else min(want + 1, hard)))


def pipeline(args: dict[str, Any], channel: Any, limits: dict[str, Any]) -> dict[str, Any]:
    """One job's whole pipeline: load, split the data, run every step, measure, write the artifacts.

    ``channel`` carries progress (the parent may answer with a cancel or a time limit, raised here so that a
    search still publishes what it has), the search's checkpoint, and models the spec names by id.
    """
    import numpy as np

    from compression.data import load_npz, split
    from compression.modelio import describe, load_stored
    from compression.pipeline import run_pipeline
    from compression.spec import parse_spec

    workdir = Path(args["workdir"])
    if args.get("threads"):
        import torch

        torch.set_num_threads(args["threads"])
    spec = parse_spec(args["spec"])
    original = load_stored(Path(args["model_path"]), workdir / "inputs")
    data = None
    if args.get("dataset_path"):
        dtypes = {i["name"]: np.dtype(i["dtype"]) for i in describe(original)["inputs"]}
        arrays = load_npz(Path(args["dataset_path"]), dtypes)
        data = split(arrays, holdout=spec.eval.holdout, seed=spec.eval.seed, max_eval=spec.eval.max_eval_samples)

    def progress(p: dict[str, Any]) -> None:
        reply = channel.ask({"type": "progress", "progress": p})
        if reply.get("raise"):
            raise _error(reply["raise"])

    def load_model(model_id: str) -> Any:
        reply = channel.ask({"type": "load_model", "model_id": model_id})
        if not reply.get("path"):
            raise KeyError(model_id)
        return load_stored(inside(workdir, reply["path"]), workdir / "inputs" / model_id)

    from google.protobuf.message import EncodeError

    (workdir / "out").mkdir(exist_ok=True)
    try:
        result = run_pipeline(original, spec, data, workdir / "out", progress=progress,
                              input_sha256=args.get("input_sha256"), device=args.get("device", "cpu"),
                              threads=args.get("threads", 0), load_model=load_model,
                              checkpoint=ChannelCheckpoint(channel, workdir / "checkpoint") if spec.is_search else None,
                              **({"external_above": args["external_above"]} if args.get("external_above") is not None
                                 else {}))
    except EncodeError:  # an engine serialized a model over 2 GiB whole (the pipeline itself never does)
        raise errors.CompressionError(
            "a step serialized the model whole, which protobuf cannot do over 2 GiB: this step does not run on a "
            "model this large yet") from None
    return {"metrics": result.metrics,
            "files": [{"name": f.name, "path": str(f.path), "kind": f.kind} for f in result.files]}


class ChannelCheckpoint:
    """A search's checkpoint kept by the parent (in the artifact store): blobs pass as files in the run's folder."""

    def __init__(self, channel: Any, folder: Path) -> None:
        self.channel, self.folder = channel, folder
        folder.mkdir(parents=True, exist_ok=True)

    def get(self, name: str) -> bytes | None:
        reply = self.channel.ask({"type": "checkpoint_get", "name": checked_name(name)})
        return inside(self.folder, reply["path"]).read_bytes() if reply.get("path") else None

    def put(self, name: str, data: bytes) -> None:
        path = self.folder / checked_name(name)
        path.write_bytes(data)
        self.channel.ask({"type": "checkpoint_put", "name": name, "path": str(path)})


def checked_name(name: str) -> str:
    """A file name the child may choose (checkpoint entries): no folders, no dot-files, no oddities."""
    if not _SAFE_NAME.match(name or "") or ".." in name:
        raise ValueError(f"unsafe name {name!r}")
    return name



def inside(folder: Path, path: str | Path) -> Path:
    """``path`` resolved, refused unless it lies inside ``folder`` (the child names files; never trust it)."""
    p = Path(path).resolve()
    root = Path(folder).resolve()
    if p != root and root not in p.parents:
        raise ValueError("path outside the run's folder")
    return p



def _error(spec: dict[str, Any]) -> errors.CompressionError:
    cls = getattr(errors, spec.get("class", ""), errors.Cancelled)
    return cls(spec.get("message", "stopped"))


TASKS: dict[str, Callable[[dict[str, Any], Any, dict[str, Any]], Any]] = {
    "read_upload": read_upload, "preflight_probe": preflight_probe, "pipeline": pipeline,
}
