"""The `sdfunc` command: `serve`, `demo-models`, `generate`.

`serve` runs the function exactly as FC does (gunicorn, handler/gunicorn_conf.py), after writing the tiny
demo checkpoints into an empty models folder.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything can import huggingface_hub

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
    from pipelines.store import ModelStore
    from pipelines.hashing import HashCache

    settings.ensure_layout()
    store = ModelStore(settings.checkpoints_dir, settings.vae_dir, HashCache(None))
    if store.checkpoints and not force:
        return []
    from pipelines.demo import write_demo_models

    log.info("building the tiny demo checkpoints in %s (random weights, no download)", settings.checkpoints_dir)
    paths = write_demo_models(settings.checkpoints_dir, force=force)
    for path in paths:
        log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return paths


def cmd_serve(args: argparse.Namespace) -> int:
    _apply_overrides(args)
    settings = _settings()
    if settings.build_demo_models:
        ensure_models(settings)
    from handler import gunicorn_conf

    url_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{url_host}:{settings.port}"
    log.info("serving on %s (data: %s); API docs at %s/openapi", url, settings.data_dir, url)
    log.info("try: curl -s %s/sdapi/v1/txt2img -H 'Content-Type: application/json' "
             "-d '{\"prompt\": \"a red house\", \"steps\": 8, \"width\": 256, \"height\": 256}' "
             "| python3 -c 'import sys,json,base64; open(\"out.png\",\"wb\").write(base64.b64decode(json.load(sys.stdin)[\"images\"][0]))'",
             url)
    argv = [sys.executable, "-m", "gunicorn", "-c", gunicorn_conf.__file__]
    os.execv(sys.executable, argv)
    return 0  # not reached


def cmd_demo_models(args: argparse.Namespace) -> int:
    _apply_overrides(args)
    paths = ensure_models(_settings(), force=args.force)
    if not paths:
        log.info("checkpoints already present; nothing written (use --force to rewrite the demo ones)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    _apply_overrides(args)
    from pydantic import ValidationError

    from handler import metering
    from handler.errors import ServiceError
    from handler.schemas import Txt2ImgRequest
    from handler.service import Service
    from pipelines.errors import PipelineError

    settings = _settings()
    service = Service(settings)
    if settings.build_demo_models and service.device.run(ensure_models, settings):
        service.store.refresh()  # on the device thread: torch on a second thread would slow generation
    try:
        request = Txt2ImgRequest(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                                 width=args.width, height=args.height, seed=args.seed, sampler_name=args.sampler,
                                 cfg_scale=args.cfg_scale)
        meter = metering.begin(metering.RequestMeter(request_id="cli", instance_id=service.instance_id, method="-",
                                                     route="generate", cold_start=True))
        result = service.txt2img(request, consumer="")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdfunc", description="Serverless Stable Diffusion function (A1111 API).")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the function under gunicorn, as FC runs it")
    serve.add_argument("--host", help="bind address (default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (default 9000)")
    serve.add_argument("--data", help="data root: models/, outputs/ (default ./data)")
    serve.add_argument("--model", help="default checkpoint name")
    serve.set_defaults(func=cmd_serve)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from handler.logs import configure_logging

    configure_logging("INFO", as_json=False)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
