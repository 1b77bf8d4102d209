"""POST /v1/jobs/preflight: what a job would do, without running it.

Same body as ``POST /v1/jobs`` and the same checks (``validate_job``). Then the model's structure and MACs
from a sandboxed probe, and the analysis (:mod:`compression.preflight`): per step whether it applies to this
model, trains, needs torch or data, and a rough cost. Nothing is queued; a spec that submit would refuse for
a reason preflight can still explain (a missing dataset) comes back as ``rejection`` rather than an error.
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
from compression.data import LABELS
from compression.errors import InvalidSpec
from compression.preflight import PRUNABLE_OPS, QUANTIZABLE_OPS, ModelFacts, analyse
from compression.spec import parse_spec
from store.artifacts import ArtifactStore, private_copy
from store.models import DatasetRecord, ModelRecord
from store.settings import Settings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=COMMON_PROBLEMS)

MACS_PROBE_MAX_PARAMS = 300_000_000  # above this, MACs are estimated from parameters (no forward in the API)


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


class PreflightGate(BaseModel):
    enabled: bool
    max_drop_pt: float
    min_cosine: float
    max_perplexity_ratio: float = Field(description="language models: the most a step's perplexity may be, as a "
                                                    "multiple of the original's")
    summary: str = Field(description="the budget every step's model is held to, in words")


class PreflightReport(BaseModel):
    model: PreflightModel
    dataset_samples: int | None
    steps: list[PreflightStep]
    runnable: bool = Field(description="every step applies and submit would accept the request")
    queue: str = Field(description="the queue the job would be sent to")
    cost: PreflightCost
    quality_gate: PreflightGate = Field(description="eval.gate / eval.max_drop / eval.min_cosine / "
                                                          "eval.max_perplexity_ratio as they apply here")
    rejection: PreflightRejection | None = Field(
        None, description="why POST /v1/jobs would refuse this body (422), when preflight could still analyse it")


@router.post("/preflight", response_model=PreflightReport, responses=problem_responses(413))
def preflight(body: JobCreate, team: TeamDep, session: SessionDep, settings: SettingsDep,
              store: StoreDep) -> dict[str, Any]:
    """Dry run: per step whether it applies, which ops block training or structured pruning, a rough cost."""
    rejection = None
    try:
        model, dataset, _ = validate_job(session=session, team=team, body=body, settings=settings)
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
    samples = dataset.samples if dataset is not None else None
    labels = dataset is not None and LABELS in (dataset.arrays or {})
    session.close()  # the analysis below needs no connection
    facts, probe_note = _probe(settings, store, model_info)  # parses the model, may run one forward
    report = analyse(spec, facts, model_params=model_info["params"], dataset_samples=samples, probe_note=probe_note,
                     labels=labels)
    report["model"]["id"] = model_info["id"]
    report["runnable"] = report["runnable"] and rejection is None
    report["queue"] = settings.job_queue(spec.trains)
    report["rejection"] = rejection
    return report


def _probe(settings: Settings, store: ArtifactStore, model: dict[str, Any]) -> tuple[ModelFacts, str | None]:
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
        path = private_copy(store, key, tmp / key.rsplit("/", 1)[-1])  # a copy the sandbox may own
        args = {"path": str(path), "workdir": str(tmp), "probe_macs": model["params"] <= MACS_PROBE_MAX_PARAMS,
                "probe_cpu_seconds": settings.sandbox_probe_cpu_s,
                "prunable_ops": sorted(PRUNABLE_OPS), "quantizable_ops": sorted(QUANTIZABLE_OPS)}
        try:
            return ModelFacts(**sandbox.run("preflight_probe", args, workdir=tmp, on_ask=on_ask,
                                            limits=sandbox.Limits(**settings.sandbox_limits("probe")))), None
        except sandbox.LimitExceeded as e:
            if not got:
                raise
            limit = (f"its CPU-time limit of {settings.sandbox_probe_cpu_s} s" if e.limit == "cpu_seconds"
                     else f"a limit: {e}")
            note = f"MACs estimated from parameters: the probe run stopped at {limit}"
            return ModelFacts(**{**got, "macs": None}), note
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tmp_root(settings: Any) -> Path:
    root = Path(settings.home) / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return root
