"""The `sdfunc` command: `serve`, `demo-models`, `generate`, `consumers`, `usage`, `db`.

`serve` runs the function exactly as FC does (gunicorn, handler/gunicorn_conf.py), after writing the tiny
demo checkpoints into an empty models folder. `consumers`, `usage` and `db` work on the records database of
the settings (SDFUNC_DATABASE_URL, default the SQLite file under the data root). Results go to stdout; logs
to stderr.
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime as dt
import logging
import os
import sys
import time
from pathlib import Path

import pipelines  # noqa: F401  # first: turns hub access off (pipelines.offline) before huggingface_hub is imported

log = logging.getLogger("sdfunc")


def _apply_overrides(args: argparse.Namespace) -> None:
    """Command-line flags become SDFUNC_* variables, so the gunicorn worker's settings see them too."""
    for flag, env in (("data", "SDFUNC_DATA_DIR"), ("host", "SDFUNC_HOST"), ("port", "SDFUNC_PORT"),
                      ("model", "SDFUNC_DEFAULT_CHECKPOINT")):
        value = getattr(args, flag, None)
        if value is not None:
            os.environ[env] = str(Path(value).resolve()) if flag == "data" else str(value)


def _settings():
    from handler.settings import Settings

    return Settings()


def ensure_models(settings, *, force: bool = False) -> list[Path]:
    """Write the demo checkpoints when the models folder has no checkpoint (or when forced)."""
    from pipelines.hashing import HashCache
    from pipelines.store import ModelStore

    settings.ensure_layout()
    store = ModelStore(settings.checkpoints_dir, settings.vae_dir, HashCache(None))
    paths: list[Path] = []
    if not store.checkpoints or force:
        from pipelines.builders.demo import write_demo_models

        log.info("building the tiny demo checkpoints in %s (random weights, no download)", settings.checkpoints_dir)
        paths = write_demo_models(settings.checkpoints_dir, force=force)
    paths += _demo_controlnets(settings, force=force)
    paths += _demo_upscalers(settings, force=force)
    for path in paths:
        log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return paths


def _demo_controlnets(settings, *, force: bool) -> list[Path]:
    """The tiny demo ControlNets, for the demo checkpoints, when the ControlNet folder holds no model."""
    folder = settings.models_dir / "ControlNet"
    if not (settings.checkpoints_dir / "demo-sd15.safetensors").is_file():
        return []
    if not force and any(folder.glob("*.safetensors")):
        return []
    from pipelines.builders.demo import write_demo_controlnets

    return write_demo_controlnets(folder, force=force)


def _demo_upscalers(settings, *, force: bool) -> list[Path]:
    """The tiny demo upscalers and face restorer, for the demo checkpoints, when none of their folders holds a
    model."""
    from pipelines.upscalers.store import FOLDERS

    if not (settings.checkpoints_dir / "demo-sd15.safetensors").is_file():
        return []
    folders = [settings.models_dir / name for name in (*FOLDERS, "GFPGAN")]
    if not force and any(p.suffix in (".safetensors", ".pth") for f in folders if f.is_dir() for p in f.iterdir()):
        return []
    from pipelines.builders.demo import write_demo_upscalers

    return write_demo_upscalers(settings.models_dir, force=force)


def cmd_serve(args: argparse.Namespace) -> int:
    """gunicorn in this process, its master; after writing demo checkpoints (tensor work, which a forked worker
    must not inherit) in a fresh interpreter instead."""
    _apply_overrides(args)
    settings = _settings()
    wrote = ensure_models(settings) if settings.build_demo_models else []
    from handler import gunicorn_conf

    url_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{url_host}:{settings.port}"
    log.info("serving on %s (data: %s); API docs at %s/openapi", url, settings.data_dir, url)
    log.info("try: curl -s %s/sdapi/v1/txt2img -H 'Content-Type: application/json' "
             "-d '{\"prompt\": \"a red house\", \"steps\": 8, \"width\": 256, \"height\": 256}' "
             "| python3 -c 'import sys,json,base64; open(\"out.png\",\"wb\").write(base64.b64decode(json.load(sys.stdin)[\"images\"][0]))'",
             url)
    argv = ["gunicorn", "-c", gunicorn_conf.__file__]
    if wrote:
        os.execv(sys.executable, [sys.executable, "-m", *argv])
    from gunicorn.app.wsgiapp import run

    sys.argv = argv  # a second interpreter would cost its start and the imports above again: ~0.5 s of cold start
    run()
    return 0  # gunicorn exits the process itself


HOOKS = {"initialize": ("POST", "/initialize"), "pre-stop": ("GET", "/pre-stop")}


def cmd_hook(args: argparse.Namespace) -> int:
    """Call a lifecycle hook of the server on this machine with the instance's lifecycle key (s.yaml runs
    `sdfunc hook initialize` / `sdfunc hook pre-stop` as FC's lifecycle commands). Waits up to `--wait`
    seconds for the server to listen; the response body goes to stdout; exit 0 on a 2xx answer."""
    import urllib.error
    import urllib.request

    from handler.security import lifecycle_key as lifecycle

    _apply_overrides(args)
    settings = _settings()
    method, route = HOOKS[args.hook]
    url = f"http://127.0.0.1:{settings.port}{route}"
    deadline = time.monotonic() + args.wait
    while True:
        # The worker writes its key when it starts, after gunicorn listens: no key (or one an earlier server left)
        # is "not started yet" until the deadline.
        key = lifecycle.read_key(lifecycle.key_file(settings.port))
        req = urllib.request.Request(url, method=method, headers={lifecycle.HEADER: key} if key else {})
        try:
            with urllib.request.urlopen(req, timeout=settings.timeout) as response:
                status, body = response.status, response.read()
            break
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
            if status not in (401, 403) or time.monotonic() >= deadline:
                break
            reason = "refused (no lifecycle key yet, or an old one)"
        except (urllib.error.URLError, ConnectionError) as exc:
            reason = f"the server does not answer ({exc})"
        if time.monotonic() >= deadline:
            log.error("%s %s: %s", method, url, reason)
            return 1
        time.sleep(0.5)
    log.info("%s %s -> %d", method, url, status)
    sys.stdout.write(body.decode("utf-8", "replace") + "\n")
    return 0 if 200 <= status < 300 else 1


def cmd_demo_models(args: argparse.Namespace) -> int:
    _apply_overrides(args)
    paths = ensure_models(_settings(), force=args.force)
    if not paths:
        log.info("checkpoints already present; nothing written (use --force to rewrite the demo ones)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    _apply_overrides(args)
    from pydantic import ValidationError

    from handler.contract.schemas import Txt2ImgRequest
    from handler.errors import ServiceError
    from handler.records import metering
    from handler.runtime.service import Service
    from pipelines.errors import PipelineError

    settings = _settings()
    service = Service(settings)
    if settings.build_demo_models and service.device.run(ensure_models, settings):
        service.store.refresh()  # on the device thread: torch on a second thread would slow generation
    try:
        request = Txt2ImgRequest(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                                 width=args.width, height=args.height, seed=args.seed, sampler_name=args.sampler,
                                 cfg_scale=args.cfg_scale)
        meter = metering.begin(metering.RequestMeter(request_id=f"cli-{os.urandom(8).hex()}",
                                                     instance_id=service.instance_id, method="-",
                                                     route="generate", cold_start=True, consumer="cli"))
        result = service.txt2img(request, consumer="cli")
    except ValidationError as exc:
        first = exc.errors()[0]
        log.error("%s: %s", ".".join(str(p) for p in first["loc"]), first["msg"])
        return 2
    except (ServiceError, PipelineError) as exc:
        log.error("%s", exc.message)
        return 2
    out = Path(args.output)
    out.write_bytes(base64.b64decode(result["images"][0]))
    import json

    info = json.loads(result["info"])
    log.info("wrote %s (seed %s, %.2f s generating)", out, info["seed"], meter.generation_seconds)
    return 0


def _records():
    """The service's records objects for the settings, or None (logged) when records are turned off."""
    from handler.runtime.service import Service

    service = Service(_settings())
    if service.ledger is None:
        log.error("records are turned off (SDFUNC_RECORD_REQUESTS=false)")
    return service


def cmd_consumers(args: argparse.Namespace) -> int:
    _apply_overrides(args)
    from handler.errors import ServiceError

    service = _records()
    if service.consumers is None:
        return 2
    consumers = service.consumers
    try:
        if args.action == "list":
            out = csv.writer(sys.stdout, delimiter="\t", lineterminator="\n")
            out.writerow(["id", "admin", "disabled", "key_prefix", "created_at"])
            for c in consumers.list():
                out.writerow([c.id, c.admin, c.disabled, c.key_prefix or "", c.created_at])
            return 0
        if not args.id:
            log.error("consumers %s: give a consumer id", args.action)
            return 2
        if args.action == "add":
            key = consumers.add(args.id, admin=args.admin)
            log.info("consumer %s added%s; its API key follows (shown once, only its hash is kept)",
                     args.id, " as admin" if args.admin else "")
            sys.stdout.write(key + "\n")
        elif args.action == "rotate":
            sys.stdout.write(consumers.rotate(args.id) + "\n")
            log.info("consumer %s has a new key; the old one no longer works", args.id)
        elif args.action in ("disable", "enable"):
            consumers.set_disabled(args.id, args.action == "disable")
            log.info("consumer %s %sd", args.id, args.action)
        elif args.action in ("admin", "no-admin"):
            consumers.set_admin(args.id, args.action == "admin")
            log.info("consumer %s is %san admin", args.id, "" if args.action == "admin" else "no longer ")
    except KeyError:
        log.error("no consumer %r", args.id)
        return 2
    except (ValueError, ServiceError) as exc:
        log.error("%s", getattr(exc, "message", exc))
        return 2
    return 0


def _when(text: str | None) -> dt.datetime | None:
    from handler.contract.schemas import utc_naive

    return utc_naive(dt.datetime.fromisoformat(text)) if text else None


def cmd_usage(args: argparse.Namespace) -> int:
    """The numbers of GET /billing/usage, as a table or CSV."""
    _apply_overrides(args)
    from handler.errors import ServiceError

    service = _records()
    if service.ledger is None:
        return 2
    try:
        report = service.ledger.usage(consumer=None if args.consumer in (None, "*") else args.consumer,
                                      since=_when(args.since), until=_when(args.until), group=args.group)
    except ValueError as exc:
        log.error("--since / --until: %s (ISO 8601, e.g. 2026-11-01 or 2026-11-01T08:00:00+08:00)", exc)
        return 2
    except ServiceError as exc:
        log.error("%s", exc.message)
        return 2
    columns = ["key", "currency", "requests", "succeeded", "failed", "images", "billed_ms", "amount"]
    if args.csv:
        try:
            fh = sys.stdout if args.csv == "-" else open(args.csv, "w", newline="", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            log.error("--csv %s: %s", args.csv, exc.strerror or exc)
            return 2
        try:
            out = csv.writer(fh)
            out.writerow(columns)
            for row in report["rows"]:
                out.writerow([row[c] for c in columns])
        finally:
            if fh is not sys.stdout:
                fh.close()
        if args.csv != "-":
            log.info("wrote %d row(s) to %s", len(report["rows"]), args.csv)
        return 0
    rows = [columns] + [[str(row[c]) for c in columns] for row in report["rows"]]
    totals = report["totals"]
    for currency, amount in totals["amount"].items() or [("", "0")]:
        rows.append(["total", currency, *(str(totals[c]) for c in columns[2:7]), amount])
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    for r in rows:
        sys.stdout.write("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                         .rstrip() + "\n")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    """Schema migrations of the records database (Alembic, handler/records/migrations)."""
    _apply_overrides(args)
    from sqlalchemy.exc import SQLAlchemyError

    from handler.records.db import Database, redact

    db = Database(_settings().resolved_database_url)
    try:
        return _db_action(args.action, args.revision, db)
    except SQLAlchemyError as exc:
        log.error("records database %s: %s", redact(db.url), str(getattr(exc, "orig", None) or exc)[:300])
        return 2
    finally:
        db.dispose()


def _db_action(action: str, revision: str, db) -> int:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from handler.records.db import current_revision, metadata, migrate, redact

    if action == "upgrade":
        migrate(db.engine, revision)
    with db.engine.connect() as conn:
        current = current_revision(conn)
        if action == "check":
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
            if diff:
                log.error("the schema differs from the code (a migration is missing): %s", diff)
                return 1
    sys.stdout.write(f"{redact(db.url)}\t{current or 'empty'}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdfunc", description="Serverless Stable Diffusion function (A1111 API).")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the function under gunicorn, as FC runs it")
    serve.add_argument("--host", help="bind address (default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (default 9000)")
    serve.add_argument("--data", help="data root: models/, outputs/ (default ./data)")
    serve.add_argument("--model", help="default checkpoint name")
    serve.set_defaults(func=cmd_serve)

    hook = sub.add_parser("hook", help="call a lifecycle hook of the local server (FC's lifecycle commands)")
    hook.add_argument("hook", choices=sorted(HOOKS), help="initialize (POST /initialize) or pre-stop (GET /pre-stop)")
    hook.add_argument("--port", type=int, help="the server's port (default SDFUNC_PORT, 9000)")
    hook.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the server to listen")
    hook.set_defaults(func=cmd_hook)

    demo = sub.add_parser("demo-models", help="write the tiny random-weight demo checkpoints")
    demo.add_argument("--data", help="data root (default ./data)")
    demo.add_argument("--force", action="store_true", help="rewrite them even if checkpoints exist")
    demo.set_defaults(func=cmd_demo_models)

    gen = sub.add_parser("generate", help="one image, no HTTP")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="out.png")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--data", help="data root (default ./data)")
    gen.add_argument("--model", help="checkpoint name")
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--width", type=int, default=512)
    gen.add_argument("--height", type=int, default=512)
    gen.add_argument("--seed", type=int, default=-1)
    gen.add_argument("--cfg-scale", type=float, default=7.0)
    gen.add_argument("--sampler", default="Euler a")
    gen.set_defaults(func=cmd_generate)

    cons = sub.add_parser("consumers", help="pay-per-image consumers and their API keys")
    cons.add_argument("action", choices=["list", "add", "rotate", "disable", "enable", "admin", "no-admin"])
    cons.add_argument("id", nargs="?", help="consumer id (letters, digits, . _ @ -)")
    cons.add_argument("--admin", action="store_true", help="add: may read every consumer's usage and images")
    cons.add_argument("--data", help="data root (default ./data)")
    cons.set_defaults(func=cmd_consumers)

    use = sub.add_parser("usage", help="usage and charges from the ledger (same numbers as GET /billing/usage)")
    use.add_argument("--consumer", help="one consumer (default: all)")
    use.add_argument("--since", help="from (ISO 8601 date or date-time, UTC unless given an offset)")
    use.add_argument("--until", help="before (exclusive)")
    use.add_argument("--group", choices=["day", "model"], help="rows per UTC day or per checkpoint")
    use.add_argument("--csv", metavar="FILE", help="write CSV to FILE ('-' for stdout)")
    use.add_argument("--data", help="data root (default ./data)")
    use.set_defaults(func=cmd_usage)

    db = sub.add_parser("db", help="records database schema (Alembic migrations)")
    db.add_argument("action", choices=["upgrade", "current", "check"])
    db.add_argument("revision", nargs="?", default="head", help="upgrade: target revision (default head)")
    db.add_argument("--data", help="data root (default ./data)")
    db.set_defaults(func=cmd_db)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from handler.logs import configure_logging

    configure_logging("INFO", as_json=False)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
