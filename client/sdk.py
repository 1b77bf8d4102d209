"""The netcompress Python SDK: upload, submit, wait (live events), read metrics, download.

It speaks HTTP only (no server code is imported), so it works against any netcompress deployment.

Example:
    >>> from client import Client
    >>> nc = Client("http://127.0.0.1:8000", "nc_...")          # or NETCOMPRESS_URL / NETCOMPRESS_API_KEY
    >>> job = nc.submit("cnn.onnx", {"steps": [{"method": "prune", "sparsity": 0.5},
    ...                                        {"method": "quantize", "scheme": "int8", "mode": "dynamic"}]})
    >>> job.wait()                                                # progress bar from live events
    >>> job.metrics["result"]["ratios"]["file_bytes"]             # doctest: +SKIP
    >>> job.download("out/")                                      # model.onnx, report.json, ...
"""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from client.errors import (
    JobCancelled, JobFailed, NetcompressError, Unavailable, WaitTimeout, error_for,
)

TERMINAL = ("succeeded", "failed", "cancelled")
RETRY_STATUSES = (502, 503, 504)
ProgressFn = Callable[["Job"], None]


def load_spec(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A spec from a dict, a ``.yaml``/``.yml``/``.json`` file, or a JSON/YAML string."""
    if isinstance(source, Mapping):
        return dict(source)
    text = str(source)
    path = Path(text)
    if len(text) < 4096 and "\n" not in text and path.is_file():
        text = path.read_text()
    import yaml

    try:
        spec = json.loads(text)
    except json.JSONDecodeError:
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"the spec is neither JSON nor YAML: {e}") from None
    if not isinstance(spec, dict):
        raise ValueError("a spec is a mapping with 'steps' (and optionally 'eval')")
    return spec


@dataclass
class Model:
    """An uploaded model (``id``, ``name``, ``format``, ``params``, ``inputs``, ``outputs`` …)."""

    data: dict[str, Any]

    @property
    def id(self) -> str:
        return self.data["id"]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class Dataset(Model):
    """An uploaded ``.npz`` dataset (``id``, ``arrays``, ``samples`` …)."""


@dataclass
class Job:
    """A job; ``refresh()`` re-reads it, ``wait()`` follows it to the end."""

    client: "Client"
    data: dict[str, Any] = field(repr=False)

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, status={self.status!r})"

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def status(self) -> str:
        return self.data["status"]

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def progress(self) -> dict[str, Any]:
        return self.data.get("progress") or {}

    @property
    def metrics(self) -> dict[str, Any] | None:
        """``{"original": {...}, "steps": [...], "result": {..., "ratios": {...}}}`` once succeeded."""
        return self.data.get("metrics")

    @property
    def artifacts(self) -> list[dict[str, Any]]:
        return self.data.get("artifacts") or []

    @property
    def error(self) -> dict[str, Any] | None:
        return self.data.get("error")

    def refresh(self) -> "Job":
        self.data = self.client._json("GET", f"/v1/jobs/{self.id}")
        return self

    def cancel(self) -> "Job":
        self.data = self.client._json("POST", f"/v1/jobs/{self.id}/cancel")
        return self

    def events(self, *, read_timeout: float = 60.0) -> Iterator[tuple[str, dict[str, Any]]]:
        """Server-Sent Events of this job: ``(event, data)`` pairs until the job ends (then the stream closes)."""
        yield from self.client._events(self.id, read_timeout=read_timeout)

    def wait(self, timeout: float | None = None, *, progress: bool | ProgressFn = False, check: bool = True,
             poll_interval: float = 1.0) -> "Job":
        """Block until the job ends; follows live events, falling back to polling when they are unavailable.

        Args:
            timeout: seconds to wait at most (None: no limit); raises WaitTimeout.
            progress: True for a progress bar on stderr, or a callable receiving this Job at each update.
            check: raise JobFailed / JobCancelled when the job did not succeed.
            poll_interval: seconds between polls when events are unavailable.

        Returns:
            this Job, refreshed to its final state.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        reporter = _make_reporter(progress)
        try:
            if not self.done:
                self._follow(deadline, reporter, poll_interval)
        finally:
            reporter.close()
        if check and self.status == "failed":
            raise JobFailed(self)
        if check and self.status == "cancelled":
            raise JobCancelled(self)
        return self

    def _follow(self, deadline: float | None, reporter: "_Reporter", poll_interval: float) -> None:
        reporter.update(self)
        failures = 0
        while failures < 3:  # events first; a dropped stream is re-opened, a server without them is polled
            try:
                for event, payload in self.client._events(self.id, read_timeout=30.0, deadline=deadline):
                    if event in ("state", "done"):
                        self.data = {**self.data, **payload}
                        reporter.update(self)
                    elif event == "gone":
                        self.refresh()  # raises NotFound: the job was deleted with its model
                    if self.done:
                        if event != "done":
                            self.refresh()
                        return
                    if deadline is not None and time.monotonic() > deadline:
                        raise WaitTimeout(f"job {self.id} still {self.status}")
                self.refresh()  # the stream ended early (server restart, proxy timeout)
                if self.done:
                    return
                failures += 1
            except NetcompressError as e:
                if e.status == 401:
                    raise
                if e.status == 404:  # the job is gone (refresh raises), or a server without /events
                    self.refresh()
                    break
                failures += 1
            except httpx.HTTPError:
                failures += 1
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"job {self.id} still {self.status}")
        while not self.done:
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"job {self.id} still {self.status}")
            time.sleep(poll_interval)
            self.refresh()
            reporter.update(self)

    def download(self, dest: str | os.PathLike, names: list[str] | None = None) -> list[Path]:
        """Download the job's artifacts (all, or ``names``) into folder ``dest``; returns the paths."""
        folder = Path(dest)
        folder.mkdir(parents=True, exist_ok=True)
        if not self.artifacts:
            self.refresh()
        wanted = [a["name"] for a in self.artifacts if names is None or a["name"] in names]
        missing = set(names or []) - set(wanted)
        if missing:
            raise error_for(404, {"code": "not_found", "title": "artifact not found",
                                  "detail": ", ".join(sorted(missing))})
        return [self.client.download_artifact(self.id, n, folder / n) for n in wanted]

    def report(self) -> dict[str, Any] | None:
        """The job's ``report.json`` (settings used and per-layer facts of every step, the manifest), or None
        while the job has not written one."""
        if not any(a["name"] == "report.json" for a in self.artifacts):
            return None
        return self.client._json("GET", f"/v1/jobs/{self.id}/artifacts/report.json")


class Client:
    """A connection to a netcompress API.

    Args:
        url: base URL (default: ``NETCOMPRESS_URL``, else ``http://127.0.0.1:8000``).
        api_key: the team's key (default: ``NETCOMPRESS_API_KEY``).
        timeout: seconds for connect/read of ordinary requests.
        retries: how many times a 502/503/504 or a connection error is retried (with exponential backoff
            and the server's ``Retry-After``); non-idempotent requests are retried only when they carry
            an ``Idempotency-Key`` or never reached the server.
        backoff: first delay in seconds (doubles each retry, with jitter, capped at 30 s).
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 retries: int = 5, backoff: float = 0.5, transport: httpx.BaseTransport | None = None) -> None:
        self.url = (url or os.environ.get("NETCOMPRESS_URL") or "http://127.0.0.1:8000").rstrip("/")
        self.api_key = api_key or os.environ.get("NETCOMPRESS_API_KEY")
        if not self.api_key:
            raise ValueError("no API key: pass api_key= or set NETCOMPRESS_API_KEY")
        self.retries, self.backoff = retries, backoff
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport,
                                  headers={"Authorization": f"Bearer {self.api_key}",
                                           "User-Agent": "netcompress-sdk/1"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- HTTP with retries -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, retry_post: bool = False,
                 body: Callable[[], dict[str, Any]] | None = None, **kw: Any) -> httpx.Response:
        """Send a request; 502/503/504 and connection errors are retried with backoff.

        ``body`` builds fresh keyword arguments for each attempt (a file upload re-opens its file).
        """
        idempotent = method in ("GET", "HEAD", "DELETE") or retry_post
        delay = self.backoff
        for attempt in range(self.retries + 1):
            extra = body() if body else {}
            try:
                resp = self._http.request(method, path, **kw, **extra)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:  # never reached the server: safe to resend
                if attempt == self.retries:
                    raise Unavailable(503, {"code": "unavailable", "title": "cannot connect",
                                            "detail": f"{self.url}: {e}"}) from e
                retry_after = None
            except (httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.ReadError):
                if not idempotent or attempt == self.retries:
                    raise
                retry_after = None
            else:
                if resp.status_code not in RETRY_STATUSES or not idempotent or attempt == self.retries:
                    return self._check(resp)
                retry_after = _retry_after(resp)
            finally:
                for v in extra.get("files", {}).values():
                    if hasattr(v[1], "close"):
                        v[1].close()
            wait = retry_after if retry_after is not None else delay * (1 + random.random() * 0.25)
            time.sleep(min(wait, 30.0))
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    @staticmethod
    def _check(resp: httpx.Response) -> httpx.Response:
        if resp.status_code < 400:
            return resp
        try:
            problem = resp.json()
        except ValueError:
            problem = {"detail": resp.text[:500]}
        raise error_for(resp.status_code, problem if isinstance(problem, dict) else {"detail": str(problem)})

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self._request(method, path, **kw).json()

    # -- models and datasets -----------------------------------------------------------------------------

    def _upload(self, route: str, path: Path, name: str | None) -> dict[str, Any]:
        def body() -> dict[str, Any]:
            return {"files": {"file": (path.name, open(path, "rb"))}, "data": {"name": name or path.name}}

        # An upload is retried on 503 too: a refused upload stored nothing, a resend makes one model.
        return self._json("POST", route, body=body, retry_post=True)

    def upload_model(self, path: str | os.PathLike, *, name: str | None = None) -> Model:
        """Upload ONNX, a ``.zip`` of ONNX + external data, or a ``torch.export`` ``.pt2`` (streamed)."""
        return Model(self._upload("/v1/models", Path(path), name))

    def upload_dataset(self, data: str | os.PathLike | Mapping[str, Any], *, name: str | None = None) -> Dataset:
        """Upload an ``.npz`` path, or a mapping of arrays (named after the model inputs, optional ``labels``)."""
        if isinstance(data, Mapping):
            import numpy as np

            with tempfile.TemporaryDirectory(prefix="netcompress-") as d:
                p = Path(d) / "data.npz"
                np.savez(p, **{k: np.asarray(v) for k, v in data.items()})
                return Dataset(self._upload("/v1/datasets", p, name or "arrays.npz"))
        return Dataset(self._upload("/v1/datasets", Path(data), name))

    def upload_texts(self, path: str | os.PathLike, *, seq_len: int = 128, tokenizer: str | os.PathLike | None = None,
                     byte_level: bool = False, limit: int | None = None, attention_mask: bool | None = None,
                     stride: int | None = None, model: Model | str | None = None,
                     name: str | None = None) -> Dataset:
        """Upload a text file as a language-model dataset: windows of ``seq_len`` token ids
        (:func:`client.datasets.text_windows`), tokenized by a local ``tokenizer.json`` or byte-level.

        Args:
            model: the model (or its id) the data is for: the ids array is named after its token input and,
                with ``attention_mask=None``, the mask is included exactly when the model takes one. Without a
                model the ids are ``input_ids`` and ``None`` includes the mask.
            attention_mask: True: ``attention_mask`` (ones; 0 on a short last window's padding); False: none
                (the last window then ends where the text does); None: as the model takes it.
            stride: tokens between window starts (default ``seq_len``); limit: at most this many windows.

        Raises:
            client.datasets.TextDataError: a mistake in the arguments or the text, before anything is uploaded.
        """
        from client.datasets import IDS, lm_inputs, read_tokens, windows

        ids, pad = read_tokens(path, tokenizer=tokenizer, byte_level=byte_level)
        ids_name, takes_mask = IDS, True
        if model is not None:
            record = model if isinstance(model, Model) else self.model(str(model))
            ids_name, takes_mask = lm_inputs(record.inputs)
        arrays = windows(ids, seq_len=seq_len, stride=stride, limit=limit, pad_id=pad, source=str(path),
                         attention_mask=takes_mask if attention_mask is None else attention_mask)
        arrays[ids_name] = arrays.pop(IDS)
        return self.upload_dataset(arrays, name=name or f"{Path(path).name} ({seq_len}-token windows)")

    def upload_images(self, root: str | os.PathLike, *, model: Model | str | None = None,
                      size: tuple[int, int] | None = None, layout: str | None = None, order: str = "rgb",
                      scale: float = 1 / 255, mean: list[float] | None = None, std: list[float] | None = None,
                      labels_from_folders: bool = False, limit: int | None = None,
                      name: str | None = None) -> Dataset:
        """Upload a folder of pictures (JPEG/PNG/BMP/WebP, recursively) as a vision dataset
        (:func:`client.images.image_dataset`): resized to the model's static input size (or ``size``, H×W),
        in its layout, scaled by ``scale`` then ``(x - mean) / std``; with ``labels_from_folders`` each
        sub-folder is a class (sorted names → 0, 1, ...; the mapping is in the dataset's name and the
        returned ``Dataset``'s ``classes``).

        Args:
            model: the model (or its id) the data is for: its image input names the array and gives layout,
                channels and size. Without one the array is ``input``, ``layout`` defaults to nchw, RGB.

        Raises:
            client.images.ImageDataError: no pictures, mixed sizes without ``size``, a model without an image
                input..., before anything is uploaded.
        """
        from client.images import find_images, image_arrays, image_dataset

        if model is not None:
            record = model if isinstance(model, Model) else self.model(str(model))
            arrays, classes = image_dataset(root, record.inputs, size=size, layout=layout, order=order, scale=scale,
                                            mean=mean, std=std, labels_from_folders=labels_from_folders, limit=limit)
        else:
            arrays, classes = image_arrays(find_images(root, limit=limit), size=size, layout=layout or "nchw",
                                           order=order, scale=scale, mean=mean, std=std,
                                           labels_from_folders=labels_from_folders, root=root)
        n = len(next(iter(arrays.values())))
        label = name or f"{Path(root).name} ({n} images" + (f", classes {classes}" if classes else "") + ")"
        ds = self.upload_dataset(arrays, name=label[:200])
        ds.data["classes"] = classes
        return ds

    def model(self, model_id: str) -> Model:
        return Model(self._json("GET", f"/v1/models/{model_id}"))

    def models(self, limit: int | None = None) -> list[Model]:
        """The team's models, newest first (all pages, or the first ``limit``)."""
        return [Model(m) for m in self._paginate("/v1/models", limit, {})]

    def datasets(self, limit: int | None = None) -> list[Dataset]:
        return [Dataset(d) for d in self._paginate("/v1/datasets", limit, {})]

    def download_model(self, model_id: str, dest: str | os.PathLike) -> Path:
        return self._download(f"/v1/models/{model_id}/file", Path(dest))

    # -- jobs --------------------------------------------------------------------------------------------

    def _job_body(self, model: Model | str | os.PathLike, spec: Any, dataset: Any, name: str | None) -> dict:
        model_id = self._resolve(model, self.upload_model)
        body: dict[str, Any] = {"model_id": model_id, "spec": load_spec(spec)}
        if dataset is not None:
            body["dataset_id"] = self._resolve(dataset, self.upload_dataset)
        if name:
            body["name"] = name
        return body

    @staticmethod
    def _resolve(ref: Any, upload: Callable[[Any], Model]) -> str:
        """A Model/Dataset, an id, an existing file (uploaded), or a mapping of arrays (uploaded)."""
        if isinstance(ref, Model):
            return ref.id
        if isinstance(ref, Mapping):
            return upload(ref).id
        if isinstance(ref, os.PathLike) or (isinstance(ref, str) and Path(ref).is_file()):
            return upload(ref).id
        return str(ref)

    def submit(self, model: Model | str | os.PathLike, spec: Any, dataset: Any = None, *, name: str | None = None,
               idempotency_key: str | None = None) -> Job:
        """Queue a job. ``model``/``dataset`` may be objects, ids, or files to upload first; ``spec`` a dict
        or a YAML/JSON file. Resending after a 503 is safe: the request carries an ``Idempotency-Key``."""
        body = self._job_body(model, spec, dataset, name)
        key = idempotency_key or uuid.uuid4().hex
        data = self._json("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key}, retry_post=True)
        return Job(self, data)

    def preflight(self, model: Model | str | os.PathLike, spec: Any, dataset: Any = None) -> dict[str, Any]:
        """What a job would do, without running it: per step whether it applies, blocking ops, rough cost."""
        return self._json("POST", "/v1/jobs/preflight", json=self._job_body(model, spec, dataset, None),
                          retry_post=True)

    def job(self, job_id: str) -> Job:
        return Job(self, self._json("GET", f"/v1/jobs/{job_id}"))

    def jobs(self, *, status: str | None = None, model: Model | str | None = None,
             limit: int | None = None) -> list[Job]:
        """The team's jobs, newest first, optionally by status and model."""
        params: dict[str, Any] = {}
        if status:
            params["status"] = status
        if model is not None:
            params["model_id"] = model.id if isinstance(model, Model) else model
        return [Job(self, j) for j in self._paginate("/v1/jobs", limit, params)]

    def _paginate(self, path: str, limit: int | None, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        cursor, seen = None, 0
        while True:
            page_size = 100 if limit is None else max(1, min(100, limit - seen))
            page = self._json("GET", path, params={**params, "limit": page_size, **({"cursor": cursor} if cursor else {})})
            for item in page["items"]:
                yield item
                seen += 1
                if limit is not None and seen >= limit:
                    return
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def download_artifact(self, job_id: str, name: str, dest: str | os.PathLike) -> Path:
        """Stream one artifact to ``dest`` (a temp name, renamed when complete)."""
        return self._download(f"/v1/jobs/{job_id}/artifacts/{name}", Path(dest))

    def _download(self, path: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        for attempt in range(self.retries + 1):
            with self._http.stream("GET", path) as resp:
                if resp.status_code in RETRY_STATUSES and attempt < self.retries:
                    time.sleep(_retry_after(resp) or self.backoff * 2 ** attempt)
                    continue
                if resp.status_code >= 400:
                    resp.read()
                    self._check(resp)
                with open(tmp, "wb") as out:
                    for chunk in resp.iter_bytes(1 << 20):
                        out.write(chunk)
            tmp.replace(dest)
            return dest
        raise AssertionError("unreachable")

    def _events(self, job_id: str, *, read_timeout: float = 60.0,
                deadline: float | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """Parse ``text/event-stream`` from ``/v1/jobs/{id}/events``."""
        timeout = httpx.Timeout(10.0, read=read_timeout)
        with self._http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout,
                               headers={"Accept": "text/event-stream"}) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._check(resp)
            event, data = "message", []
            for line in resp.iter_lines():
                if line == "":
                    if data:
                        yield event, json.loads("\n".join(data))
                    event, data = "message", []
                    if deadline is not None and time.monotonic() > deadline:
                        return
                elif line.startswith(":"):
                    continue
                else:
                    name, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if name == "event":
                        event = value
                    elif name == "data":
                        data.append(value)


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


# -- progress display ------------------------------------------------------------------------------------

class _Reporter:
    def update(self, job: Job) -> None:
        pass

    def close(self) -> None:
        pass


class _Callback(_Reporter):
    def __init__(self, fn: ProgressFn) -> None:
        self.fn = fn

    def update(self, job: Job) -> None:
        self.fn(job)


def describe_progress(job: Job) -> str:
    """``running · pruning · step 1/2 · 37% · fine-tuning epoch 1/2``."""
    p = job.progress
    parts = [job.status]
    if p.get("phase") and p.get("phase") not in (job.status, "queued"):
        parts.append(str(p["phase"]))
    if p.get("steps"):
        parts.append(f"step {min((p.get('step') or 0) + 1, p['steps'])}/{p['steps']}")
    if p.get("fraction") is not None:
        parts.append(f"{100 * float(p['fraction']):.0f}%")
    if p.get("message"):
        parts.append(str(p["message"]))
    return " · ".join(parts)


class _Lines(_Reporter):
    """Not a terminal (CI logs, pipes): one line per change of status, phase or step, or 10% of progress."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.last = stream, None

    def update(self, job: Job) -> None:
        p = job.progress
        key = (job.status, p.get("phase"), p.get("step"), int(10 * float(p.get("fraction") or 0)))
        if key != self.last:
            self.last = key
            print(f"[{job.id[:8]}] {describe_progress(job)}", file=self.stream, flush=True)


class _Bar(_Reporter):
    """A live rich progress bar (phase, step, fraction, message)."""

    def __init__(self, stream: Any) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold]{task.fields[head]}"), BarColumn(), TaskProgressColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[msg]}"),
                                 console=Console(file=stream), transient=False)
        self.task = self.progress.add_task("job", total=1.0, head="queued", msg="")
        self.progress.start()

    def update(self, job: Job) -> None:
        p = job.progress
        head = job.status if job.status != "running" else (p.get("phase") or "running")
        if p.get("steps"):
            head += f" {min((p.get('step') or 0) + 1, p['steps'])}/{p['steps']}"
        frac = 1.0 if job.status == "succeeded" else float(p.get("fraction") or 0.0)
        self.progress.update(self.task, completed=frac, head=head, msg=(p.get("message") or "")[:60])

    def close(self) -> None:
        self.progress.stop()


def _make_reporter(progress: bool | ProgressFn, stream: BinaryIO | Any = None) -> _Reporter:
    if callable(progress):
        return _Callback(progress)
    if not progress:
        return _Reporter()
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        try:
            return _Bar(stream)
        except ImportError:
            pass
    return _Lines(stream)
