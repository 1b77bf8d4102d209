"""Service settings: the one place that reads the environment (prefix ``NETCOMPRESS_``)."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every tunable of the API and the worker, typed and bounded."""

    model_config = SettingsConfigDict(env_prefix="NETCOMPRESS_", extra="ignore")

    home: Path = Field(Path("var"), description="Folder for the embedded default: SQLite, broker, artifacts.")
    database_url: str | None = Field(
        None, description="postgresql://user@host:port/db or sqlite:///path; default SQLite under home."
    )
    broker_url: str | None = Field(
        None, description="redis://host:port/n; default: kombu's filesystem transport under home."
    )
    artifact_url: str | None = Field(
        None, description="file:///path or s3://bucket/prefix; default: home/artifacts."
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, moto, Ceph); default: AWS. Credentials come from the "
                          "standard AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY variables (boto3 reads them)."
    )
    s3_region: str | None = Field(None, max_length=64, description="S3 region; default: boto3's (AWS_DEFAULT_REGION).")
    s3_part_bytes: int = Field(
        8 * 1024**2, ge=5 * 1024**2, le=5 * 1024**3, description="Multipart upload part size (S3's minimum is 5 MiB)."
    )
    max_upload_bytes: int = Field(512 * 1024**2, ge=1024, le=64 * 1024**3, description="Upload size cap.")
    max_npz_uncompressed_bytes: int = Field(
        2 * 1024**3, ge=1024, description="Cap on the total uncompressed size of an uploaded .npz."
    )
    max_model_params: int = Field(2_000_000_000, ge=1, description="Largest accepted model, in parameters.")
    model_inline_max_bytes: int = Field(
        16 * 1024**2, ge=0, description="A .zip upload whose external data is larger is validated without loading its "
                                        "weights into the API and stored as the zip; smaller ones become one .onnx.")
    external_data_above_bytes: int = Field(
        1_900_000_000, ge=0, le=1_900_000_000,
        description="Models whose weights exceed this are written as .onnx + .onnx.data (each model a job writes: "
                    "the measured original, each step's, the result); an upload over it is large, and only steps "
                    "that handle large models run on it (others: 413 too_large at submit). At most protobuf's "
                    "2 GiB; lowered in tests so a small model takes the same road.")
    job_time_limit_s: int = Field(6 * 3600, ge=10, le=7 * 24 * 3600, description="Wall-clock limit of one job.")
    max_attempts: int = Field(3, ge=1, le=20, description="Attempts before a repeatedly lost job fails.")
    heartbeat_s: float = Field(10.0, gt=0, le=600, description="How often a worker touches its job row.")
    worker_threads: int = Field(0, ge=0, le=256, description="torch/ORT threads in the worker (0 = all cores).")
    queue: str = Field(
        "netcompress", min_length=1, max_length=200, description="Celery queue jobs are sent to (routing off)."
    )
    route_by_device: bool = Field(
        False, description="Send jobs that train to gpu_queue and the others to cpu_queue (instead of queue)."
    )
    gpu_queue: str = Field("gpu", min_length=1, max_length=200, description="Queue of training jobs when routing.")
    cpu_queue: str = Field("cpu", min_length=1, max_length=200, description="Queue of the other jobs when routing.")
    team_max_running_jobs: int = Field(4, ge=1, le=10_000, description="Default per-team concurrency quota.")
    resend_after_s: float = Field(
        300.0, ge=1, le=86_400, description="Re-send a job still queued this long after it was sent (lost message)."
    )
    db_retry_s: float = Field(
        600.0, ge=0, le=86_400, description="How long a worker keeps retrying its final writes while the DB is down."
    )
    max_json_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024**2, description="Cap on a JSON request body.")
    # --- sandbox: limits of the child processes that load and run uploaded models ---
    sandbox_memory_bytes: int = Field(
        4 * 1024**3, ge=256 * 1024**2, description="Address-space cap of the API's model checks (upload, "
                                                   "preflight) in their sandboxed child process.")
    sandbox_cpu_s: int = Field(120, ge=1, le=86_400, description="CPU-seconds cap of one sandboxed model check.")
    sandbox_wall_s: float = Field(300.0, ge=1, le=86_400, description="Wall-clock cap of one sandboxed model check.")
    sandbox_probe_cpu_s: int = Field(
        20, ge=1, le=86_400, description="CPU-seconds cap of preflight's MAC probe (one forward pass of the model); "
                                         "past it MACs are estimated from the parameters.")
    sandbox_job_memory_bytes: int = Field(
        0, ge=0, description="Memory cap of a job's sandboxed pipeline (address space on CPU, data segment with "
                             "CUDA); 0: three quarters of this machine's memory.")
    sandbox_drop_privileges: bool = Field(
        True, description="When the service runs as root, sandboxed children run as a fresh unprivileged uid.")
    # --- API policy ---
    metrics_token: SecretStr | None = Field(
        None, description="Bearer token /metrics requires; unset: /metrics is off (404) unless metrics_public."
    )
    metrics_public: bool = Field(
        False, description="Serve /metrics without a token (it sums every team's jobs: only on a private network)."
    )
    # --- fair queues and deterministic tests ---
    max_queued_per_team: int = Field(
        20, ge=1, le=100_000, description="Jobs a team may have queued at once; one more POST /v1/jobs is a 429."
    )
    test_pause_file: Path | None = Field(
        None, description="Test-only: while this file exists and its text matches a progress message (a substring, "
                          "or phase:<name>), the worker holds the job there and writes <file>.reached. Off in production.",
    )
    # --- cheap refusals ---
    max_unzipped_ratio: int = Field(
        100, ge=2, le=100_000, description="Most a zip member (and a whole uploaded zip or .npz) may inflate, as "
                                           "uncompressed / compressed size; checked before anything is inflated.")
    max_json_elements: int = Field(
        20_000, ge=100, le=10_000_000, description="Most nodes (objects, arrays, scalars) in a JSON request body; "
                                                   "counted before validation (413 past it).")
    max_layers_entries: int = Field(
        1024, ge=1, le=1_000_000, description="Most entries in a spec's per-layer `layers` map (422 past it).")
    max_zip_directory_bytes: int = Field(
        1024 * 1024, ge=4096, le=1024**3, description="Largest central directory (the member list) of an uploaded "
                                                      "zip or .npz: each entry costs the API memory to parse.")
    max_form_fields: int = Field(16, ge=1, le=1000, description="Most non-file fields in a multipart upload.")
    max_form_field_bytes_total: int = Field(
        256 * 1024, ge=1024, le=64 * 1024**2, description="Most bytes of all non-file fields (and part headers) "
                                                          "of a multipart upload together.")

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL with the driver this project uses (psycopg 3 for PostgreSQL)."""
        url = self.database_url or f"sqlite:///{self.home / 'netcompress.db'}"
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix):]
        return url

    def sandbox_limits(self, kind: str) -> dict[str, Any]:
        """Keyword arguments of :class:`compression.sandbox.Limits` for ``kind``: ``check`` (an upload),
        ``probe`` (preflight: the analysis, then a MAC forward pass on its own CPU budget) or ``job`` (a pipeline)."""
        if kind == "job":
            memory = self.sandbox_job_memory_bytes or int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 3 / 4)
            cores = self.worker_threads or os.cpu_count() or 1
            return {"memory_bytes": memory, "cpu_seconds": self.job_time_limit_s * cores,
                    "wall_seconds": self.job_time_limit_s + 60.0, "threads": self.worker_threads,
                    "drop_privileges": self.sandbox_drop_privileges}
        cpu = self.sandbox_cpu_s + (self.sandbox_probe_cpu_s if kind == "probe" else 0)
        return {"memory_bytes": self.sandbox_memory_bytes, "cpu_seconds": cpu,
                "wall_seconds": self.sandbox_wall_s, "threads": 1, "drop_privileges": self.sandbox_drop_privileges}

    def job_queue(self, trains: bool) -> str:
        """The queue of a job that ``trains`` or not (``ParsedSpec.trains``): ``queue``, or with
        ``route_by_device`` the GPU queue when it trains and the CPU queue when it does not."""
        if not self.route_by_device:
            return self.queue
        return self.gpu_queue if trains else self.cpu_queue

    @property
    def is_sqlite(self) -> bool:
        return self.sqlalchemy_url.startswith("sqlite")

    @property
    def broker_folder(self) -> Path:
        return self.home / "broker"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @field_validator("artifact_url")
    @classmethod
    def _known_artifact_scheme(cls, v: str | None) -> str | None:
        if v is not None and not (v.startswith("file://") or (v.startswith("s3://") and len(v) > len("s3://"))):
            raise ValueError("NETCOMPRESS_ARTIFACT_URL must be file:///path or s3://bucket[/prefix]")
        return v

    @property
    def artifact_is_s3(self) -> bool:
        return bool(self.artifact_url and self.artifact_url.startswith("s3://"))

    @property
    def s3_bucket_prefix(self) -> tuple[str, str]:
        """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
        assert self.artifact_url and self.artifact_is_s3
        bucket, _, prefix = self.artifact_url[len("s3://"):].partition("/")
        return bucket, prefix.strip("/")

    @property
    def artifact_root(self) -> Path:
        if self.artifact_url is None:
            return self.home / "artifacts"
        if self.artifact_url.startswith("file://"):
            return Path(self.artifact_url[len("file://"):]).expanduser().resolve()
        raise ValueError(f"NETCOMPRESS_ARTIFACT_URL {self.artifact_url!r} is not a local folder")

    @property
    def upload_root(self) -> Path:
        """Uploaded models and datasets live beside the artifacts, under the same store."""
        return self.artifact_root

    @property
    def relative_dirs(self) -> list[str]:
        """The local working folders as a library may name them relative to the current directory (``var``),
        for scrubbing paths out of error messages (absolute paths are scrubbed whatever they name)."""
        dirs = [self.home] + ([] if self.artifact_is_s3 else [self.artifact_root])
        return [rel for rel in (os.path.relpath(d) for d in dirs) if not rel.startswith("..")]


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
