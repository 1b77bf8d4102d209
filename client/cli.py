"""Client commands of the ``netcompress`` CLI: submit, preflight, jobs list|show|cancel|wait, models list, download.

They talk to a running API over HTTP (``--url`` / ``NETCOMPRESS_URL``, ``--api-key`` / ``NETCOMPRESS_API_KEY``).
Exit codes: 0 done, 1 the job failed or was cancelled, 2 bad arguments, 3 the API refused the request.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from client.errors import JobFailed, NetcompressError, WaitTimeout
from client.sdk import Client, Job, describe_progress, load_spec


class UsageError(Exception):
    pass


def _client(args: argparse.Namespace) -> Client:
    try:
        return Client(args.url, args.api_key)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


# -- spec from shorthand flags ---------------------------------------------------------------------------

def spec_from_flags(args: argparse.Namespace, has_data: bool) -> dict[str, Any] | None:
    """``--prune 0.5 --distill --quantize int8`` -> steps in the usual order: prune → distill → quantize."""
    steps: list[dict[str, Any]] = []
    finetune = {"epochs": args.finetune_epochs} if args.finetune_epochs and has_data else None
    if args.prune is not None:
        step: dict[str, Any] = {"method": "prune", "granularity": args.granularity, "sparsity": args.prune}
        if finetune:
            step["finetune"] = finetune
        steps.append(step)
    if args.distill:
        steps.append({"method": "distill", "epochs": args.finetune_epochs or 5})
    if args.quantize is not None:
        q: dict[str, Any] = {"method": "quantize", "scheme": args.quantize}
        if args.quantize == "int8":
            q["mode"] = "static" if has_data else "dynamic"  # static needs calibration data
        elif args.quantize == "cluster" and args.bits:
            q["bits"] = args.bits
        steps.append(q)
    return {"steps": steps} if steps else None


def _spec(args: argparse.Namespace, has_data: bool) -> dict[str, Any]:
    flags = spec_from_flags(args, has_data)
    if args.spec and flags:
        raise UsageError("give --spec or the shorthand flags (--prune/--distill/--quantize), not both")
    if args.spec:
        try:
            return load_spec(args.spec)
        except (OSError, ValueError) as e:
            raise UsageError(f"--spec {args.spec}: {e}") from None
    if not flags:
        raise UsageError("say what to do: --spec FILE (YAML or JSON), or --prune/--distill/--quantize")
    return flags


# -- metrics table ---------------------------------------------------------------------------------------

def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _fmt_count(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "–" if v is None else format(v, spec)


ROWS: list[tuple[str, Any, Any, str | None]] = [
    # label, value getter, formatter, ratio key (original / result: >1 is better)
    ("file size", lambda m: m.get("file_bytes"), _fmt_bytes, "file_bytes"),
    ("zip size", lambda m: m.get("zip_bytes"), _fmt_bytes, "zip_bytes"),
    ("params", lambda m: m.get("params"), _fmt_count, "params"),
    ("nonzero params", lambda m: m.get("nonzero_params"), _fmt_count, "nonzero_params"),
    ("MACs / sample", lambda m: m.get("macs"), _fmt_count, "macs"),
    ("latency p50 (ms)", lambda m: (m.get("latency_ms") or {}).get("p50"), lambda v: _fmt(v, ".3f"),
     "latency_p50_speedup"),
    ("throughput (/s)", lambda m: m.get("throughput"), lambda v: _fmt(v, ".1f"), "throughput"),
    ("accuracy", lambda m: m.get("accuracy"), _fmt, None),
    ("agreement", lambda m: m.get("agreement"), _fmt, None),
    ("output cosine", lambda m: m.get("output_cosine"), _fmt, None),
    ("perplexity", lambda m: m.get("perplexity"), _fmt, None),
    ("token agreement", lambda m: m.get("token_agreement"), _fmt, None),
    ("KL to original (nats)", lambda m: m.get("kl"), lambda v: _fmt(v, ".5f"), None),
]


def metrics_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """``(metric, original, result, ratio)`` rows; the ratio is how many times smaller/faster (>1 is better)."""
    orig, res = metrics.get("original") or {}, metrics.get("result") or {}
    ratios = res.get("ratios") or {}
    rows = []
    for label, get, fmt, rkey in ROWS:
        o, r = get(orig), get(res)
        if o is None and r is None:
            continue
        if rkey and ratios.get(rkey) is not None:
            ratio = f"{ratios[rkey]:.2f}×"
        elif label == "accuracy" and ratios.get("accuracy_delta") is not None:
            ratio = f"{ratios['accuracy_delta']:+.4f}"
        elif label == "perplexity" and ratios.get("perplexity_ratio") is not None:
            ratio = f"×{ratios['perplexity_ratio']:.3f} (result/original)"  # > 1 is worse, unlike the rest
        else:
            ratio = ""
        rows.append((label, fmt(o), fmt(r), ratio))
    return rows


def verdict_line(metrics: dict[str, Any] | None) -> str | None:
    """The result's plain verdict (the server's ``metrics.result.verdict.summary``), or None before there is one."""
    v = ((metrics or {}).get("result") or {}).get("verdict") or {}
    return f"verdict  {v['summary']}" if v.get("summary") else None


def print_metrics(job: Job, *, verdict: bool = True) -> None:
    """The verdict first (unless the caller printed it already), then the metrics table."""
    from rich.markup import escape
    from rich.table import Table

    if not job.metrics:
        return
    line = verdict_line(job.metrics)
    if verdict and line:
        _console().print(f"[bold]{escape(line)}[/bold]")
    table = Table(title=f"job {job.id} · {job.status}")
    for col, just in (("metric", "left"), ("original", "right"), ("result", "right"), ("ratio", "right")):
        table.add_column(col, justify=just)
    for row in metrics_rows(job.metrics):
        table.add_row(*row)
    _console().print(table)
    if job.metrics.get("search"):
        print_search(job.metrics["search"])


def print_search(s: dict[str, Any]) -> None:
    """A search job: every candidate (front members starred, the best marked), and how the search ended."""
    from rich.table import Table

    t = s["target"]
    bar = (f"perplexity ≤ ×{t['max_perplexity_ratio']:.2f} the original's" if t["metric"] == "perplexity"
           else f"{t['metric']} drop ≤ {t['max_accuracy_drop']}")
    table = Table(title=f"search · {s['finished']}/{s['grid_size']} candidates · stopped by {s['stopped_by']}"
                        + (" · partial" if s["partial"] else "") + f" · target {bar}")
    drop = "perplexity rise" if t["metric"] == "perplexity" else f"{t['metric']} drop"
    for col in ("candidate", drop, t["optimize"], "meets", "front"):
        table.add_column(col)
    front = set(s["front"])
    for c in s["candidates"]:
        if c.get("status") != "done":
            table.add_row(", ".join(f"{k}={v}" for k, v in c["values"].items()), "failed", c.get("error", ""), "", "")
            continue
        label = ", ".join(f"{k}={v}" for k, v in c["values"].items()) or c["id"]
        if c["id"] == s["best"]["id"]:
            label = f"[bold]{label} (best)[/bold]"
        table.add_row(label, f"{c['drop']:+.4f}", f"{c['objective']:.6g}", "yes" if c["meets_target"] else "no",
                      "*" if c["id"] in front else "")
    _console().print(table)
    if not s["target_met"]:
        _console().print("[yellow]no candidate met the target: the result is the closest one[/yellow]")


def print_job(job: Job) -> None:
    from rich.markup import escape

    c = _console()
    d = job.data
    c.print(f"[bold]{d['id']}[/bold]  {d.get('name') or ''}")
    line = verdict_line(job.metrics)
    if line:  # what a reader wants first: smaller, faster, within budget?
        c.print(f"[bold]{escape(line)}[/bold]")
    c.print(f"status   {describe_progress(job)}")
    c.print(f"model    {d['model_id']}   dataset {d.get('dataset_id') or '–'}   attempts {d.get('attempts')}")
    c.print(f"created  {d.get('created_at')}   finished {d.get('finished_at') or '–'}")
    c.print("steps    " + " → ".join(_step_label(s) for s in d.get("spec", {}).get("steps", [])))
    if d.get("error"):
        c.print(f"[red]error    {d['error'].get('code')}: {d['error'].get('message')}[/red]")
    if job.artifacts:
        c.print("artifacts " + ", ".join(f"{a['name']} ({_fmt_bytes(a['size_bytes'])})" for a in job.artifacts))
    print_metrics(job, verdict=False)
    for line in layer_bits_lines(job.report() if job.artifacts else None):
        c.print(line)


def layer_bits_lines(report: dict[str, Any] | None) -> list[str]:
    """One line per step whose report gives bits per layer (int4, cluster, binary...): how many layers at
    each width, e.g. ``step 1 quantize int4: 12 layers at 4 bits, 1 at 8 bits, 2 left float (block 32)``."""
    out = []
    for i, step in enumerate((report or {}).get("steps") or []):
        layers = (step.get("report") or {}).get("layers") or []
        widths = [layer["bits"] for layer in layers if isinstance(layer.get("bits"), int)]
        if not widths:
            continue
        counts = {b: widths.count(b) for b in sorted(set(widths))}
        parts = [f"{n} at {b} bits" if b < 32 else f"{n} left float" for b, n in counts.items()]
        blocks = sorted({layer["block_size"] for layer in layers if layer.get("block_size")})
        label = f"{step.get('method')} {(step.get('spec') or {}).get('scheme') or ''}".strip()
        out.append(f"layers   step {i + 1} {label}: " + ", ".join(parts)
                   + (f" (block {', '.join(map(str, blocks))})" if blocks else ""))
    return out


def _step_label(step: dict[str, Any]) -> str:
    m = step.get("method", "?")
    if m == "prune":
        return f"prune {step.get('granularity', '')} {step.get('sparsity')}"
    if m == "quantize":
        return f"quantize {step.get('scheme')}" + (f" {step['mode']}" if step.get("mode") else "")
    return str(m)


# -- commands --------------------------------------------------------------------------------------------

def _text_tokens(args: argparse.Namespace) -> tuple[Any, int] | None:
    """``--texts``: the file's token ids and pad id, every mistake a UsageError before anything is uploaded
    (the windows are cut here too, to check ``--seq-len``/``--stride``/``--limit``); None without it."""
    from client.datasets import TextDataError, read_tokens, windows

    if args.texts is None:
        if args.tokenizer or args.bytes:
            raise UsageError("--tokenizer and --bytes go with --texts FILE")
        return None
    if args.data is not None:
        raise UsageError("give --data or --texts, not both")
    if not args.tokenizer and not args.bytes:
        raise UsageError("--texts needs --tokenizer tokenizer.json or --bytes (byte-level ids 0-255)")
    if args.tokenizer and args.bytes:
        raise UsageError("give --tokenizer or --bytes, not both")
    try:
        ids, pad = read_tokens(args.texts, tokenizer=args.tokenizer, byte_level=args.bytes)
        windows(ids, seq_len=args.seq_len, stride=args.stride, limit=args.limit, pad_id=pad, source=args.texts,
                attention_mask=args.attention_mask != "no")
    except TextDataError as e:
        raise UsageError(f"--texts: {e}") from None
    return ids, pad


def _text_dataset(nc: Client, model: Any, tokens: tuple[Any, int], args: argparse.Namespace) -> Any:
    """The ``--texts`` windows uploaded for ``model`` (a Model): the ids named after its token input, the
    attention mask included when it takes one (``--attention-mask auto``, from the inputs the API lists)."""
    from client.datasets import TextDataError, lm_inputs, windows

    ids_name, takes_mask = lm_inputs(model.inputs)
    mask = takes_mask if args.attention_mask == "auto" else args.attention_mask == "yes"
    try:
        arrays = windows(tokens[0], seq_len=args.seq_len, stride=args.stride, limit=args.limit, pad_id=tokens[1],
                         source=args.texts, attention_mask=mask)
    except TextDataError as e:
        raise UsageError(f"--texts: {e}") from None
    arrays[ids_name] = arrays.pop("input_ids")
    print(f"{args.texts}: {len(arrays[ids_name])} windows of {args.seq_len} tokens as {ids_name!r}"
          + (" + attention_mask" if mask else ""), file=sys.stderr)
    return nc.upload_dataset(arrays, name=f"{Path(args.texts).name} ({args.seq_len}-token windows)")


def _image_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--images``: its options checked and the folder searched before anything is uploaded; None without it."""
    from client.images import ImageDataError, find_images, parse_size

    image_flags = (args.size, args.layout, args.mean, args.std, args.labels_from_folders)
    if args.images is None:
        if any(v not in (None, False) for v in image_flags):
            raise UsageError("--size, --layout, --mean, --std and --labels-from-folders go with --images DIR")
        return None
    if args.data is not None or args.texts is not None:
        raise UsageError("give one of --data, --texts, --images")

    def floats(text: str | None, flag: str) -> list[float] | None:
        if text is None:
            return None
        try:
            return [float(v) for v in text.split(",")]
        except ValueError:
            raise UsageError(f"{flag} takes comma-separated numbers, e.g. 0.485,0.456,0.406, not {text!r}") from None

    try:
        find_images(args.images, limit=args.limit)
        size = parse_size(args.size) if args.size else None
    except ImageDataError as e:
        raise UsageError(f"--images: {e}") from None
    return {"size": size, "layout": args.layout, "order": args.channels, "scale": args.scale,
            "mean": floats(args.mean, "--mean"), "std": floats(args.std, "--std"),
            "labels_from_folders": args.labels_from_folders, "limit": args.limit}


def _image_dataset(nc: Client, model: Any, options: dict[str, Any], args: argparse.Namespace) -> Any:
    """The ``--images`` folder uploaded for ``model`` (a Model): named after its image input, in its layout and
    size; every mistake a one-line UsageError before the dataset is uploaded."""
    from client.images import ImageDataError

    try:
        ds = nc.upload_images(args.images, model=model, **options)
    except ImageDataError as e:
        raise UsageError(f"--images: {e}") from None
    classes = ds.data.get("classes")
    print(f"{args.images}: {ds.samples} images as {', '.join(ds.arrays)}"
          + (f"; labels from folders: {', '.join(f'{i}={c}' for i, c in enumerate(classes))}" if classes else ""),
          file=sys.stderr)
    return ds


def cmd_submit(args: argparse.Namespace) -> int:
    spec = _spec(args, has_data=args.data is not None or args.texts is not None or args.images is not None)
    tokens = _text_tokens(args)
    images = _image_options(args)
    nc = _client(args)
    model, data = args.model, args.data
    if not Path(model).is_file() and (os.sep in model or model.endswith((".onnx", ".zip", ".pt2"))):
        raise UsageError(f"no such model file: {model}")
    if args.data is not None and not Path(args.data).is_file() and args.data.endswith(".npz"):
        raise UsageError(f"no such dataset file: {args.data}")
    if tokens is not None or images is not None:  # the arrays are named after the model's inputs: the model first
        model = nc.upload_model(model) if Path(model).is_file() else nc.model(model)
        data = _text_dataset(nc, model, tokens, args) if tokens is not None else _image_dataset(nc, model, images, args)
    if args.dry_run:
        report = nc.preflight(model, spec, data)
        print_preflight(report) if not args.json else _print_json(report)
        return 0
    job = nc.submit(model, spec, data, name=args.name)
    print(f"job {job.id} queued", file=sys.stderr)
    if not (args.wait or args.out):
        _print_json(job.data) if args.json else print(job.id)
        return 0
    return _wait_and_report(job, args)


def _wait_and_report(job: Job, args: argparse.Namespace) -> int:
    try:
        job.wait(timeout=args.timeout, progress=not args.no_progress, check=False)
    except WaitTimeout as e:
        print(f"timed out: {e}", file=sys.stderr)
        return 1
    if args.json:
        _print_json(job.data)
    else:
        print_job(job) if job.status != "succeeded" else print_metrics(job)
    if job.status != "succeeded":
        return 1
    if getattr(args, "out", None):
        paths = job.download(args.out)
        print(f"downloaded {len(paths)} artifacts to {args.out}: " + ", ".join(p.name for p in paths),
              file=sys.stderr)
    return 0


def print_preflight(report: dict[str, Any]) -> None:
    from rich.table import Table

    c = _console()
    table = Table(title=f"preflight · model {report['model']['id']} · {_fmt_count(report['model']['params'])} params")
    for col in ("#", "method", "applies", "trains", "needs data", "blocked by / notes"):
        table.add_column(col)
    for s in report["steps"]:
        notes = ", ".join(s.get("blocking_ops") or []) or "; ".join(s.get("notes") or [])
        table.add_row(str(s["index"]), s["method"], "yes" if s["applies"] else "[red]no[/red]",
                      "yes" if s["trains"] else "no", "yes" if s["needs_data"] else "no", notes)
    c.print(table)
    cost = report.get("cost") or {}
    c.print(f"rough cost: ~{cost.get('seconds_cpu', '?')} s on CPU, ~{cost.get('seconds_gpu', '?')} s with a GPU "
            f"({cost.get('size', '?')}); queue: {report.get('queue')}")
    if report.get("rejection"):
        r = report["rejection"]
        c.print(f"[red]submit would be refused: {r.get('code')}: {r.get('detail')}[/red]")


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    jobs = _client(args).jobs(status=args.status, model=args.model, limit=args.limit)
    if args.json:
        _print_json([j.data for j in jobs])
        return 0
    table = Table()
    for col in ("id", "name", "status", "progress", "steps", "created"):
        table.add_column(col)
    for j in jobs:
        frac = j.progress.get("fraction")
        table.add_row(j.id, j.data.get("name") or "", j.status, "" if frac is None else f"{100 * frac:.0f}%",
                      " → ".join(_step_label(s) for s in j.data.get("spec", {}).get("steps", [])),
                      str(j.data.get("created_at", ""))[:19])
    _console().print(table)
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    job = _client(args).job(args.job_id)
    _print_json(job.data) if args.json else print_job(job)
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    job = _client(args).job(args.job_id).cancel()
    print(f"job {job.id}: {job.status}" + (" (cancel requested)" if job.data.get("cancel_requested") else ""))
    return 0


def cmd_jobs_wait(args: argparse.Namespace) -> int:
    return _wait_and_report(_client(args).job(args.job_id), args)


def cmd_models_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    models = _client(args).models(limit=args.limit)
    if args.json:
        _print_json([m.data for m in models])
        return 0
    table = Table()
    for col in ("id", "name", "format", "params", "size", "inputs", "created"):
        table.add_column(col)
    for m in models:
        ins = ", ".join(f"{i['name']}{i['shape']}" for i in m.inputs)
        table.add_row(m.id, m.name, m.format, _fmt_count(m.params), _fmt_bytes(m.size_bytes), ins,
                      str(m.created_at)[:19])
    _console().print(table)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    job = _client(args).job(args.job_id)
    paths = job.download(args.out, names=args.name or None)
    for p in paths:
        print(p)
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    args.dry_run, args.name = True, None
    return cmd_submit(args)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="API base URL (default: $NETCOMPRESS_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="API key (default: $NETCOMPRESS_API_KEY)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _wait_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")


def _submit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model file (.onnx, .zip, .pt2) to upload, or an uploaded model's id")
    p.add_argument("--data", default=None, help=".npz dataset to upload, or an uploaded dataset's id")
    p.add_argument("--spec", default=None, help="spec file, YAML or JSON ({steps: [...], eval: {...}})")
    t = p.add_argument_group("text dataset (instead of --data): a text file cut into windows of token ids")
    t.add_argument("--texts", default=None, metavar="FILE", help="text file to tokenize and upload")
    t.add_argument("--tokenizer", default=None, metavar="JSON", help="a local tokenizer.json (needs 'tokenizers')")
    t.add_argument("--bytes", action="store_true", help="byte-level ids 0-255 (no tokenizer)")
    t.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
    t.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: --seq-len)")
    t.add_argument("--limit", type=int, default=None, help="at most this many windows (or, with --images, pictures)")
    t.add_argument("--attention-mask", default="auto", choices=["auto", "yes", "no"],
                   help="include attention_mask (0 on a short last window's padding); auto: when the model has "
                        "that input (read from the uploaded model's inputs)")
    i = p.add_argument_group("image dataset (instead of --data): a folder of JPEG/PNG/BMP/WebP, recursively")
    i.add_argument("--images", default=None, metavar="DIR", help="folder of pictures to upload as the dataset")
    i.add_argument("--size", default=None, metavar="HxW", help="resize to this (default: the model's fixed input size)")
    i.add_argument("--layout", default=None, choices=["nchw", "nhwc"], help="default: from the model's input shape")
    i.add_argument("--scale", type=float, default=1 / 255, help="pixel values times this (default 1/255)")
    i.add_argument("--mean", default=None, help="then minus this per channel, e.g. 0.485,0.456,0.406")
    i.add_argument("--std", default=None, help="then divided by this per channel, e.g. 0.229,0.224,0.225")
    i.add_argument("--channels", default="rgb", choices=["rgb", "bgr"], help="channel order (default rgb)")
    i.add_argument("--labels-from-folders", action="store_true",
                   help="each sub-folder is a class (sorted names -> 0, 1, ...), as torchvision's ImageFolder")
    g = p.add_argument_group("shorthand recipe (instead of --spec): prune → distill → quantize")
    g.add_argument("--prune", type=float, default=None, metavar="SPARSITY", help="prune this fraction")
    g.add_argument("--granularity", default="weight", choices=["weight", "channel"])
    g.add_argument("--distill", action="store_true", help="distill from the original after pruning")
    g.add_argument("--quantize", default=None, choices=["int8", "int4", "fp16", "cluster", "binary", "ternary"],
                   help="int8 is static with --data (calibrated), dynamic without; int4 is weight-only "
                        "(MatMulNBits, for transformers and language models)")
    g.add_argument("--bits", type=int, default=None, help="cluster: bits per weight")
    g.add_argument("--finetune-epochs", type=int, default=None, help="fine-tune pruning for N epochs (needs --data)")
    _common(p)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the client commands on the ``netcompress`` parser."""
    s = sub.add_parser("submit", help="upload a model (and data) and submit a job; --wait shows progress")
    _submit_flags(s)
    s.add_argument("--name", default=None, help="job name")
    s.add_argument("--wait", action="store_true", help="wait for the job, with a progress bar and a metrics table")
    s.add_argument("--out", default=None, help="download the artifacts here when done (implies --wait)")
    s.add_argument("--dry-run", action="store_true", help="preflight only: what would run, what blocks, rough cost")
    _wait_flags(s)
    s.set_defaults(fn=cmd_submit)

    pf = sub.add_parser("preflight", help="check a model + spec without running anything")
    _submit_flags(pf)
    pf.set_defaults(fn=cmd_preflight)

    j = sub.add_parser("jobs", help="list, show, wait for or cancel jobs")
    jsub = j.add_subparsers(dest="jobs_command", required=True)
    jl = jsub.add_parser("list", help="the team's jobs, newest first")
    jl.add_argument("--status", default=None, choices=["queued", "running", "succeeded", "failed", "cancelled"])
    jl.add_argument("--model", default=None, help="only jobs of this model id")
    jl.add_argument("--limit", type=int, default=20)
    _common(jl)
    jl.set_defaults(fn=cmd_jobs_list)
    js = jsub.add_parser("show", help="a job's status, steps, artifacts and metrics")
    js.add_argument("job_id")
    _common(js)
    js.set_defaults(fn=cmd_jobs_show)
    jc = jsub.add_parser("cancel", help="cancel a queued or running job")
    jc.add_argument("job_id")
    _common(jc)
    jc.set_defaults(fn=cmd_jobs_cancel)
    jw = jsub.add_parser("wait", help="wait for a job (progress bar), then print its metrics")
    jw.add_argument("job_id")
    jw.add_argument("--out", default=None, help="download the artifacts here when done")
    _wait_flags(jw)
    _common(jw)
    jw.set_defaults(fn=cmd_jobs_wait)

    m = sub.add_parser("models", help="uploaded models")
    msub = m.add_subparsers(dest="models_command", required=True)
    ml = msub.add_parser("list", help="the team's models, newest first")
    ml.add_argument("--limit", type=int, default=50)
    _common(ml)
    ml.set_defaults(fn=cmd_models_list)

    d = sub.add_parser("download", help="download a job's artifacts")
    d.add_argument("job_id")
    d.add_argument("--out", default=".", help="folder (default: current)")
    d.add_argument("--name", action="append", default=[], help="only this artifact (repeatable)")
    _common(d)
    d.set_defaults(fn=cmd_download)


def run(fn, args: argparse.Namespace) -> int:
    """Run a client command, turning API and usage errors into messages and exit codes."""
    try:
        return int(fn(args) or 0)
    except UsageError as e:
        print(f"netcompress: {e}", file=sys.stderr)
        return 2
    except JobFailed as e:
        print(f"netcompress: {e}", file=sys.stderr)
        return 1
    except NetcompressError as e:
        print(f"netcompress: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


CLIENT_COMMANDS = {cmd_submit, cmd_preflight, cmd_jobs_list, cmd_jobs_show, cmd_jobs_cancel, cmd_jobs_wait,
                   cmd_models_list, cmd_download}
