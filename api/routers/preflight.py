"""POST /v1/jobs/preflight: what a job would do, without running it.

Same body as ``POST /v1/jobs`` and the same checks (``validate_job``). Then, per step: whether it applies to
this model, whether it trains (and so which ops would block the ONNX→torch conversion), whether it needs
data, and a rough cost from the model's MACs (one batch-1 forward in ONNX Runtime; parameters when that
cannot run) and the dataset's size. Nothing is queued; a spec that submit would refuse for a reason
preflight can still explain (a missing dataset) comes back as ``rejection`` rather than an error.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import SessionDep, SettingsDep, StoreDep, TeamDep
from api.errors import COMMON_PROBLEMS, Problem, problem_responses
from api.schemas import JobCreate
from api.services import validate_job
from compression.errors import InvalidSpec
from compression.registry import get_technique
from compression.spec import parse_spec
from store.artifacts import ArtifactStore
from store.models import DatasetRecord, ModelRecord
from store.queue import queue_for, step_trains
from store.settings import Settings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=COMMON_PROBLEMS)

# Orders of magnitude, not benchmarks: effective multiply-accumulates per second of small-batch work.
CPU_TRAIN_MACS_S = 2e9
GPU_TRAIN_MACS_S = 1e11
CPU_INFER_MACS_S = 1e10
STEP_OVERHEAD_S = 2.0  # export, re-load in ONNX Runtime, file writes
MACS_PROBE_MAX_PARAMS = 300_000_000  # above this, MACs are estimated from parameters (no forward in the API)
PRUNABLE_OPS = {"Conv", "Gemm", "MatMul", "ConvTranspose"}
QUANTIZABLE_OPS = {"Conv", "Gemm", "MatMul", "ConvTranspose", "Gather", "Attention", "LSTM"}


class PreflightStep(BaseModel):
    index: int
    method: str
    phase: str
    applies: bool = Field(description="whether the step can run on this model with this request")
    trains: bool = Field(description="trains a network (PyTorch; routed to the GPU queue when routing is on)")
    needs_torch: bool = Field(description="needs the ONNX graph converted to a trainable torch module")
    needs_data: bool
    blocking_ops: list[str] = Field(description="op types the ONNX→torch converter lacks (block this step)")
    targets: int = Field(description="layers this step can act on (Conv/Gemm/MatMul weights, quantizable ops)")
    forward_passes: int = Field(description="rough sample forward passes this step runs (training counts 3×)")
    notes: list[str]


class PreflightModel(BaseModel):
    id: str
    params: int
    macs: int | None = Field(description="MACs per sample (None: could not be measured)")
    macs_source: str = Field(description="measured (one batch-1 forward) or estimated (from params)")
    op_types: dict[str, int]
    unsupported_ops: list[str] = Field(description="ops with no torch converter: training steps cannot run")


class PreflightCost(BaseModel):
    macs_total: int | None
    seconds_cpu: float
    seconds_gpu: float
    size: str = Field(description="small (< 1 min), medium (< 10 min), large")
    basis: str


class PreflightRejection(BaseModel):
    status: int
    code: str
    detail: str
    errors: list[dict[str, Any]] = Field(default_factory=list)


class PreflightReport(BaseModel):
    model: PreflightModel
    dataset_samples: int | None
    steps: list[PreflightStep]
    runnable: bool = Field(description="every step applies and submit would accept the request")
    queue: str = Field(description="the queue the job would be sent to")
    cost: PreflightCost
    rejection: PreflightRejection | None = Field(
        None, description="why POST /v1/jobs would refuse this body (422), when preflight could still analyse it")


@router.post("/preflight", response_model=PreflightReport, responses=problem_responses(413))
def preflight(body: JobCreate, team: TeamDep, session: SessionDep, settings: SettingsDep,
              store: StoreDep) -> dict[str, Any]:
    """Dry run: per step whether it applies, which ops block training or structured pruning, a rough cost."""
    rejection = None
    try:
        model, dataset, _ = validate_job(session=session, team=team, body=body)
        spec = parse_spec(body.spec)
    except Problem as p:
        if p.status != 422:
            raise
        try:  # a dataset missing or not fitting: still worth analysing; a malformed spec is not
            spec = parse_spec(body.spec)
        except InvalidSpec:
            raise p from None
        # validate_job checked ownership (404) before any 422, so these are the caller's own
        model = session.get(ModelRecord, body.model_id)
        dataset = session.get(DatasetRecord, body.dataset_id) if body.dataset_id else None
        rejection = {"status": p.status, "code": p.code, "detail": p.detail, "errors": p.errors}
    model_info = {"id": model.id, "params": model.params, "storage_key": model.storage_key}
    ds_info = {"samples": dataset.samples} if dataset is not None else None
    session.close()  # the analysis below needs no connection
    return analyse(settings=settings, store=store, model=model_info, dataset=ds_info, spec=spec,
                   rejection=rejection)


def analyse(*, settings: Settings, store: ArtifactStore, model: dict[str, Any], dataset: dict[str, Any] | None, spec: Any,
            rejection: dict[str, Any] | None) -> dict[str, Any]:
    """The preflight report (runs in a worker thread: it parses the model and may run one forward)."""

    structure, probe_note = _probe(settings, store, model)
    hist, missing = structure["op_types"], structure["unsupported_ops"]
    macs_value, source = structure.get("macs"), "measured"
    if macs_value is None or macs_value == 0:
        macs_value, source = model["params"], "estimated"  # dense layers: one MAC per weight per sample

    samples = dataset["samples"] if dataset else 0
    holdout = spec.eval.holdout
    train_n = int(samples * (1 - holdout))
    eval_n = min(int(samples * holdout), spec.eval.max_eval_samples) if samples else 64
    prunable, quantizable = structure["prunable"], structure["quantizable"]

    steps, train_passes, infer_passes = [], 0, 0
    for i, step in enumerate(spec.steps):
        raw = step.model_dump(mode="json")
        tech = get_technique(step.method)
        trains = step_trains(raw)
        structured = raw.get("method") == "prune" and raw.get("granularity") == "channel"
        needs_torch = trains or structured
        needs_data = bool(getattr(step, "needs_data", False))
        notes: list[str] = []
        blocking = missing if needs_torch else []
        targets = quantizable if step.method == "quantize" else prunable
        if blocking:
            notes.append("the ONNX→torch converter lacks these ops: training/structured steps cannot run")
        if needs_data and dataset is None:
            notes.append("needs a dataset (dataset_id)")
        if targets == 0 and step.method in ("prune", "quantize"):
            notes.append("no layers with weights held as initializers for this step to act on")
        if raw.get("method") == "prune" and raw.get("granularity") == "weight":
            notes.append("weight pruning: dense ONNX Runtime kernels do not skip zeros — expect smaller zip_bytes, "
                         "not lower latency")
        if i > 0:
            notes.append("checked against the uploaded model; earlier steps change the graph this step sees")
        if probe_note and i == 0:
            notes.append(probe_note)
        passes = _step_passes(raw, train_n)
        train_passes += passes["train"]
        infer_passes += passes["infer"]
        steps.append({"index": i, "method": step.method, "phase": tech.phase,
                      "applies": not blocking and not (needs_data and dataset is None) and
                      (targets > 0 or step.method not in ("prune", "quantize")),
                      "trains": trains, "needs_torch": needs_torch, "needs_data": needs_data,
                      "blocking_ops": blocking, "targets": targets,
                      "forward_passes": passes["train"] + passes["infer"], "notes": notes})

    # measurement: the original and every step's model on the held-out split, latency and throughput runs
    infer_passes += (len(spec.steps) + 1) * (eval_n + spec.eval.latency_runs + 5 + 32 * 5)
    total = macs_value * (train_passes + infer_passes)
    overhead = STEP_OVERHEAD_S * (len(spec.steps) + 1)
    cpu_s = macs_value * train_passes / CPU_TRAIN_MACS_S + macs_value * infer_passes / CPU_INFER_MACS_S + overhead
    gpu_s = macs_value * train_passes / GPU_TRAIN_MACS_S + macs_value * infer_passes / CPU_INFER_MACS_S + overhead
    size = "small" if cpu_s < 60 else "medium" if cpu_s < 600 else "large"
    raw_spec = {"steps": [s.model_dump(mode="json") for s in spec.steps]}
    return {
        "model": {"id": model["id"], "params": model["params"], "macs": macs_value, "macs_source": source,
                  "op_types": hist, "unsupported_ops": missing},
        "dataset_samples": samples if dataset else None,
        "steps": steps,
        "runnable": rejection is None and all(s["applies"] for s in steps),
        "queue": queue_for(raw_spec, settings),
        "cost": {"macs_total": int(total), "seconds_cpu": round(cpu_s, 1), "seconds_gpu": round(gpu_s, 1),
                 "size": size,
                 "basis": f"{source} MACs/sample × forward passes (training 3× per sample-epoch); "
                          "order of magnitude only"},
        "rejection": rejection,
    }


def _probe(settings: Settings, store: ArtifactStore, model: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The model's structure and MACs, from a sandboxed child (:mod:`compression.sandbox`).

    The structure arrives first; a MAC probe that then hits a limit (a ``Loop`` of 10^7 turns, say) leaves
    MACs to be estimated from the parameters, with a note naming the limit. A model whose structure alone is
    past the limits is a 422 ``model_too_costly``.
    """
    from compression import sandbox

    tmp = Path(tempfile.mkdtemp(prefix="preflight-", dir=_tmp_root(settings)))
    got: dict[str, Any] = {}

    def on_ask(msg: dict[str, Any]) -> None:
        if msg.get("type") == "structure":
            got.update(msg["structure"])

    try:
        key = model["storage_key"]
        path = store.local_file(key, tmp / key.rsplit("/", 1)[-1])
        args = {"path": str(path), "workdir": str(tmp), "probe_macs": model["params"] <= MACS_PROBE_MAX_PARAMS,
                "probe_cpu_seconds": settings.sandbox_probe_cpu_s,
                "prunable_ops": sorted(PRUNABLE_OPS), "quantizable_ops": sorted(QUANTIZABLE_OPS)}
        try:
            return sandbox.run("preflight_probe", args, limits=sandbox.Limits(**settings.sandbox_limits("probe")),
                               workdir=tmp, on_ask=on_ask), None
        except sandbox.LimitExceeded as e:
            if not got:
                raise
            limit = (f"its CPU-time limit of {settings.sandbox_probe_cpu_s} s" if e.limit == "cpu_seconds"
                     else f"a limit: {e}")
            return {**got, "macs": None}, f"MACs estimated from parameters: the probe run stopped at {limit}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _step_passes(step: dict[str, Any], train_n: int) -> dict[str, int]:
    """Rough forward passes (a training pass counts 3: forward, backward, update)."""
    train = infer = 0
    ft = step.get("finetune") if isinstance(step.get("finetune"), dict) else None
    rounds = int(step.get("iterations") or 1) if step.get("method") == "prune" else 1
    if ft and ft.get("epochs"):
        train += 3 * int(ft["epochs"]) * train_n * rounds
        if ft.get("distill"):
            infer += int(ft["epochs"]) * train_n * rounds  # the teacher's forward
    if step.get("method") == "distill":
        epochs = int(step.get("epochs") or 0)
        train += 3 * epochs * train_n
        infer += epochs * train_n * len(step.get("teachers") or [1])
    if step.get("calibration_samples"):
        infer += int(step["calibration_samples"])
    if step.get("importance") == "taylor":
        train += 2 * min(train_n, 512)
    return {"train": train, "infer": infer}


def _tmp_root(settings: Settings) -> Path:
    root = Path(settings.home) / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return root
