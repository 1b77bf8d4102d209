"""The ``netcompress`` command: serve (embedded), api, worker, migrate, keys; and, against a running API,
submit, preflight, jobs list|show|wait|cancel, models list, download."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys


def _migrate() -> None:
    from store.migrate import upgrade

    upgrade()


def _create_key(team_name: str) -> str:
    from store.auth import create_key, get_or_create_team
    from store.db import session_scope
    from store.settings import get_settings

    with session_scope(get_settings()) as s:
        return create_key(s, get_or_create_team(s, team_name))


def cmd_migrate(_: argparse.Namespace) -> int:
    _migrate()
    print("database is at the latest revision")
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    key = _create_key(args.team)
    print(f"API key for team {args.team!r} (shown once; only its hash is stored):")
    print(key)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from store.auth import revoke_key
    from store.db import session_scope
    from store.settings import get_settings

    with session_scope(get_settings()) as s:
        ok = revoke_key(s, args.key)
    print("revoked" if ok else "no such key")
    return 0 if ok else 1


def _default_queues() -> str:
    """The configured queue; with device routing, the GPU queue on a machine with CUDA, else the CPU queue."""
    from store.settings import get_settings

    settings = get_settings()
    if not settings.route_by_device:
        return settings.queue
    import torch

    return settings.gpu_queue if torch.cuda.is_available() else settings.cpu_queue


def _worker_argv(queues: str | None, concurrency: int, pool: str) -> list[str]:
    return ["worker", "--loglevel", "INFO", "--concurrency", str(concurrency), "--pool", pool,
            "-Q", queues or _default_queues(), "--without-gossip", "--without-mingle", "--hostname",
            f"netcompress-{os.getpid()}@%h"]


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.celery_app import app

    app.worker_main(_worker_argv(args.queues, args.concurrency, args.pool))
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run("api.app:create_app", factory=True, host=args.host, port=args.port, log_level="warning",
                workers=getattr(args, "workers", 1) or 1)
    return 0


def _root_note() -> str | None:
    """One line for a root user (Celery's own warning is a paragraph), None otherwise."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    return ("note: running as root, so jobs (untrusted models, sandboxed) run as root too; run "
            "`netcompress serve` as an unprivileged user to avoid it")


def cmd_serve(args: argparse.Namespace) -> int:
    """The embedded default: SQLite, filesystem broker, local artifacts, the API and one worker.

    What a new user needs comes first and alone: the URL, the key (once), the home folder and where the logs
    go. The worker's output (Celery's banner, its root warning, task logs) and the API's go to
    ``$NETCOMPRESS_HOME/logs/`` unless ``--verbose`` keeps them on the console.
    """
    import logging

    from store.settings import get_settings

    settings = get_settings()
    os.environ.setdefault("NETCOMPRESS_HOME", str(settings.home))  # children resolve the same home
    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if not args.verbose:
        logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines on every start
    _migrate()
    key = _create_key(args.team)
    worker_log = None if args.verbose else open(logs / "worker.log", "ab")
    worker = subprocess.Popen([sys.executable, "-m", "netcompress.cli", "worker", "--concurrency", "1"],
                              stdout=worker_log, stderr=subprocess.STDOUT if worker_log else None)
    url = f"http://{args.host}:{args.port}"
    print(f"netcompress is serving on {url}", flush=True)
    print(f"API key for team {args.team!r} (shown once; export NETCOMPRESS_API_KEY=...):", flush=True)
    print(key, flush=True)
    db, broker = settings.sqlalchemy_url.split(":", 1)[0], settings.celery_broker_url.split(":", 1)[0]
    print(f"home:  {settings.home}  (database: {db}, broker: {broker})", flush=True)
    print("logs:  on this console (--verbose)" if args.verbose else
          f"logs:  {logs / 'api.log'}, {logs / 'worker.log'}  (--verbose: on the console)", flush=True)
    print(f"try:   NETCOMPRESS_URL={url} NETCOMPRESS_API_KEY=<key> netcompress jobs list", flush=True)
    note = _root_note()
    if note:
        print(note, flush=True)
    if not args.verbose:  # from here on this process's output is the API's log
        api_log = open(logs / "api.log", "ab")
        os.dup2(api_log.fileno(), sys.stdout.fileno())
        os.dup2(api_log.fileno(), sys.stderr.fileno())
    # uvicorn re-raises the SIGTERM it caught once it has shut down: make that a SystemExit, so the
    # finally below stops the worker instead of the process dying and orphaning it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return cmd_api(args)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()


def cmd_spec_reference(args: argparse.Namespace) -> int:
    from pathlib import Path

    from netcompress.specref import render, write_into

    if args.write:
        changed = write_into(Path(args.write))
        print(f"{args.write}: {'updated' if changed else 'already current'}")
    else:
        print(render(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netcompress", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (("serve", cmd_serve, "embedded default: API + one worker, no servers needed"),
                            ("api", cmd_api, "the HTTP API")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--host", default="127.0.0.1")
        sp.add_argument("--port", type=int, default=8000)
        if name == "serve":
            sp.add_argument("--team", default="default", help="team the printed key belongs to")
            sp.add_argument("--verbose", action="store_true",
                            help="keep the API's and the worker's logs on the console (default: NETCOMPRESS_HOME/logs/)")
        else:
            sp.add_argument("--workers", type=int, default=1, help="API processes (uvicorn workers)")
        sp.set_defaults(fn=fn)
    w = sub.add_parser("worker", help="a Celery worker")
    w.add_argument("--queues", default=None, help="comma-separated queues (default: the configured queue)")
    w.add_argument("--concurrency", type=int, default=1)
    w.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    w.set_defaults(fn=cmd_worker)
    m = sub.add_parser("migrate", help="apply database migrations")
    m.set_defaults(fn=cmd_migrate)
    k = sub.add_parser("keys", help="API keys")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="create a key for a team (the last line printed is the key)")
    kc.add_argument("--team", required=True)
    kc.set_defaults(fn=cmd_keys_create)
    kr = ksub.add_parser("revoke", help="revoke a key (requests with it get 401 from then on)")
    kr.add_argument("key")
    kr.set_defaults(fn=cmd_keys_revoke)
    sr = sub.add_parser("spec-reference", help="print the spec reference (Markdown) generated from the techniques")
    sr.add_argument("--write", default=None, metavar="FILE", help="replace the marked block in FILE (README.md)")
    sr.set_defaults(fn=cmd_spec_reference)
    from client.cli import _common, add_commands

    add_commands(sub)
    dm = sub.add_parser("demo", help="train a small CNN on digits, compress it on the running service, show the result")
    dm.add_argument("--out", default="demo", help="folder for the model, its data and the artifacts (default: ./demo)")
    _common(dm)
    dm.set_defaults(fn=_demo)
    return p


def _demo(args: argparse.Namespace) -> int:
    from netcompress.demo import cmd_demo

    return cmd_demo(args)


def main(argv: list[str] | None = None) -> int:
    from client.cli import CLIENT_COMMANDS, run

    args = build_parser().parse_args(argv)
    if args.fn in CLIENT_COMMANDS or args.fn is _demo:
        return run(args.fn, args)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
