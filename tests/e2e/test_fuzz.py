"""Fuzzing every route of the OpenAPI document with schemathesis, against a real gunicorn server.

The server runs on loopback on the tiny demo checkpoints, twice: auth mode `none`, and mode `basic` with a
user (an admin, so the consumer filters are reachable) whose credentials every fuzzed request carries. Each
operation gets positive and negative data (examples, coverage and fuzzing phases) and every response must
pass the checks enabled in tests/schemathesis.toml: not a 5xx, a status code the document lists, a body
that matches the document's schema for that status.

What is fuzzed is the served document narrowed to this deployment (`deployment_document`): the server caps
sizes and steps far below the document's bounds so that a generation costs a fraction of a second on a CPU,
and it accepts only the samplers, checkpoints and features it lists. Without that, nearly every positive
generation request would be a 422 for a default (512x512, 50 steps) or an unknown name and the generation
path would never be reached. Negative data still covers everything outside: values over the caps, unknown
names, missing fields.

`GET /pre-stop` drains the instance (generations answer 503 afterwards), so it is fuzzed last.

This is the bounded run of the test suite (derandomized, a few examples per operation). The long run is
`scripts/fuzz.sh`, with the same server settings and document (`python -m tests.test_fuzz ...`) and the same
tests/schemathesis.toml. Both drive the schemathesis CLI in a subprocess: its pytest integration
(`schemathesis.pytest.from_fixture`, 4.32.5) sets `Node._nodeid`, which pytest 9.2 no longer has.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

pytest.importorskip("schemathesis.cli", reason="the fuzz tests need schemathesis (pip install schemathesis==4.32.5)")

CONFIG_FILE = Path(__file__).resolve().parents[1] / "schemathesis.toml"
USER, PASSWORD = "fuzz", "fuzz-secret"
AUTH_MODES = ("none", "basic")
EXAMPLES = 15  # per operation and phase in the bounded run

# Server limits: a fuzzed generation is at most 4 images of 128x128 in 2 steps.
LIMITS = {"max_width": 128, "max_height": 128, "max_steps": 2, "max_images": 4, "max_prompt_chars": 1000}
# A loopback URL, which the network guard refuses: the fuzzer must never make the server reach out.
REFUSED_URL = "https://127.0.0.1:9/fuzz.safetensors"
REFUSED_CALLBACK = "http://127.0.0.1:9/callback"
LATENT_UPSCALERS = ["Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                    "Latent (nearest)", "Latent (nearest-exact)"]
GENERATION_ROUTES = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")  # a full queue answers these 429


def server_env(auth: str) -> dict[str, str]:
    """The SDFUNC_* settings of a fuzzed server (auth `none` or `basic`)."""
    env = {f"SDFUNC_{key.upper()}": str(value) for key, value in LIMITS.items()}
    env.update(
        SDFUNC_WARMUP__SHAPES='["64x64@1"]',  # within the limits (the default shapes are not)
        SDFUNC_WARMUP__REQUESTS_WAIT="true",
        SDFUNC_QUEUE__TIMEOUT_SECONDS="120",
        SDFUNC_NETWORK__TIMEOUT_SECONDS="2",
        SDFUNC_NETWORK__FETCH_DEADLINE_SECONDS="5",
        SDFUNC_DOWNLOADS__TIMEOUT_SECONDS="10",
        SDFUNC_DOWNLOADS__MAX_BYTES="1024",
        SDFUNC_TASKS__CALLBACK_ALLOW_PRIVATE="false",
        SDFUNC_AUTH__MODE=auth,
    )
    if auth == "basic":
        # The fuzzer also sends no and wrong credentials (the document declares the scheme): the failed-login
        # limit (tests/http/test_hardening_auth.py) would then lock its address out, good credentials included.
        env.update(SDFUNC_AUTH__USERS=f"{USER}:{PASSWORD}", SDFUNC_AUTH__ADMINS=USER, SDFUNC_AUTH__MAX_FAILURES="0")
    return env


# The deployment's document ------------------------------------------------------------------------------
def _png_b64(mode: str, size: tuple[int, int], text: str | None = None) -> str:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = None
    if text is not None:
        info = PngInfo()
        info.add_text("parameters", text)
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def _images() -> dict[str, list[str]]:
    """Small valid inputs: init images (several modes and sizes, a data URL), masks, PNGs for png-info."""
    rgb = _png_b64("RGB", (64, 64))
    return {
        "init": [rgb, _png_b64("RGBA", (96, 64)), _png_b64("L", (64, 128)), _png_b64("P", (8, 8)),
                 "data:image/png;base64," + rgb],
        "mask": [_png_b64("L", (64, 64)), _png_b64("1", (64, 64))],
        "png": [rgb, _png_b64("RGB", (8, 8), "a red house\nSteps: 2, Sampler: Euler, Seed: 7, Size: 64x64")],
    }


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _json_type(value: Any) -> dict[str, Any]:
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
                       (dict, "object")):
        if isinstance(value, kind):
            return {"type": name}
    return {}


def deployment_document(url: str, auth: tuple[str, str] | None = None) -> dict[str, Any]:
    """The server's OpenAPI document, narrowed to what this deployment accepts (see the module docstring).

    Names come from the server's own listings (samplers, schedulers, checkpoints, options)."""
    with requests.Session() as http:
        http.auth = auth

        def get(path: str) -> Any:
            response = http.get(url + path, timeout=60)
            response.raise_for_status()
            return response.json()

        doc = copy.deepcopy(get("/openapi/openapi.json"))
        samplers = get("/sdapi/v1/samplers")
        schedulers = get("/sdapi/v1/schedulers")
        checkpoints = get("/sdapi/v1/sd-models")
        options = get("/sdapi/v1/options")

    sampler_names = sorted({s["name"] for s in samplers} | {a for s in samplers for a in s["aliases"] or []})
    scheduler_names = sorted({s["name"] for s in schedulers} | {s["label"] for s in schedulers}
                             | {a for s in schedulers for a in s["aliases"] or []})
    checkpoint_names = sorted({c["title"] for c in checkpoints} | {c["model_name"] for c in checkpoints})
    images = _images()
    schemas = doc["components"]["schemas"]

    narrow_text = {"maxLength": LIMITS["max_prompt_chars"]}
    settings = {  # the per-request overrides this deployment acts on
        "sd_model_checkpoint": {"enum": checkpoint_names},
        # within the demo text encoders' depth: a larger value set through /options would turn every later
        # generation of that consumer into a 422
        "CLIP_stop_at_last_layers": {"type": "integer", "minimum": 1, "maximum": 2},
        "n_rows": {"type": "integer", "minimum": -1, "maximum": 16},
        "grid_prevent_empty_spots": {"type": "boolean"},
        "grid_only_if_multiple": {"type": "boolean"},
    }
    generation = {
        "required": ["width", "height", "steps"],  # their defaults (512, 512, 50) exceed the limits
        "properties": {
            "width": {"maximum": LIMITS["max_width"]},
            "height": {"maximum": LIMITS["max_height"]},
            "steps": {"maximum": LIMITS["max_steps"]},
            "batch_size": {"maximum": 2},
            "n_iter": {"maximum": 2},  # at most 4 images: the product is max_images
            "prompt": narrow_text,
            "negative_prompt": narrow_text,
            "sampler_name": _nullable({"enum": sampler_names}),
            "sampler_index": {"enum": sampler_names},
            "scheduler": _nullable({"enum": scheduler_names}),
            # hires fix and refiner: within the size and step caps, on the listed names
            "hr_scale": {"type": "number", "minimum": 1, "maximum": 2},
            "hr_resize_x": {"type": "integer", "minimum": 0, "maximum": LIMITS["max_width"]},
            "hr_resize_y": {"type": "integer", "minimum": 0, "maximum": LIMITS["max_height"]},
            "firstphase_width": {"type": "integer", "minimum": 0, "maximum": LIMITS["max_width"]},
            "firstphase_height": {"type": "integer", "minimum": 0, "maximum": LIMITS["max_height"]},
            "hr_second_pass_steps": {"type": "integer", "minimum": 0, "maximum": LIMITS["max_steps"]},
            "hr_upscaler": _nullable({"enum": [*LATENT_UPSCALERS, "None", "Lanczos", "Nearest"]}),
            "hr_checkpoint_name": _nullable({"enum": checkpoint_names}),
            "hr_sampler_name": _nullable({"enum": sampler_names}),
            "hr_scheduler": _nullable({"enum": scheduler_names}),
            "refiner_checkpoint": _nullable({"enum": ["", *checkpoint_names]}),
            "refiner_switch_at": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
            "restore_faces": {"enum": [False, None]},  # face restoration, scripts, seed resize: not offered
            "script_name": {"enum": [None, ""]},
            "seed_resize_from_w": {"enum": [-1, 0]},
            "seed_resize_from_h": {"enum": [-1, 0]},
            "override_settings": _nullable({"type": "object", "properties": settings, "additionalProperties": False}),
            "alwayson_scripts": {
                "type": "object",
                "properties": {
                    "sd_model_checkpoint": {"enum": checkpoint_names},
                    "save_dir": {"type": "string", "maxLength": 64},
                    "save_to_db": {"type": "boolean"},
                },
                "additionalProperties": False,
            },
        },
    }
    img2img = {
        "required": ["init_images"],
        "properties": {
            "init_images": {"type": "array", "items": {"enum": images["init"]}, "minItems": 1, "maxItems": 1},
            "mask": _nullable({"enum": images["mask"]}),
            "latent_mask": _nullable({"enum": images["mask"]}),
        },
    }
    for name, extra in (("Txt2ImgRequest", None), ("Img2ImgRequest", img2img)):
        for patch in (generation, extra or {}):
            target = schemas[name]
            target["required"] = sorted(set(target.get("required", [])) | set(patch.get("required", [])))
            for prop, narrowed in patch.get("properties", {}).items():
                if prop not in target["properties"]:
                    continue  # txt2img's hires fix fields
                if "enum" in narrowed or "anyOf" in narrowed or "type" in narrowed:
                    target["properties"][prop] = {"description": target["properties"][prop].get("description", ""),
                                                  **narrowed}
                else:
                    target["properties"][prop].update(narrowed)
    for route in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img"):  # a callback never leaves loopback (refused: 422)
        for parameter in doc["paths"][route]["post"].get("parameters", []):
            if parameter["name"] == "callback_url":
                parameter["schema"] = _nullable({"enum": [REFUSED_CALLBACK]})
    schemas["PngInfoRequest"]["properties"]["image"] = {"enum": images["png"]}
    schemas["DownloadRequest"]["properties"]["source"] = {"enum": [REFUSED_URL]}
    schemas["OptionsUpdate"] = {
        "type": "object", "additionalProperties": False,
        "properties": {key: ({"enum": checkpoint_names} if key == "sd_model_checkpoint"
                             else settings.get(key, _json_type(value)))
                       for key, value in options.items() if key != "sd_checkpoint_hash"},
    }
    return doc


# The bounded run ----------------------------------------------------------------------------------------
def schemathesis_command(document: Path, url: str, auth: str, report_dir: Path, *args: str) -> list[str]:
    """`schemathesis run` on a narrowed document against the server at `url`, with its credentials."""
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG_FILE), "--no-color", "run",
               str(document), "--url", url, "--report", "junit,json", "--report-dir", str(report_dir)]
    if auth == "basic":
        command += ["--auth", f"{USER}:{PASSWORD}"]
    return command + list(args)


@dataclass
class FuzzRun:
    server: Any  # tests.support.serving.ServeProcess, stopped (its log stays)
    document: dict[str, Any]
    reports: list[dict[str, Any]]  # schemathesis' JSON reports: every route but /pre-stop, then /pre-stop
    outputs: list[str]  # its console output, in the same order


@pytest.fixture(scope="module", params=AUTH_MODES)
def fuzz_run(request, data_dir, tmp_path_factory) -> FuzzRun:
    """A gunicorn server on loopback (its own copy of the demo data, the param's auth mode), fuzzed by the
    schemathesis CLI: every route but `GET /pre-stop`, then that one. Derandomized, so CI sees the same cases."""
    from tests.conftest import linked_data_root
    from tests.support.serving import ServeProcess

    auth = request.param
    root = tmp_path_factory.mktemp(f"fuzz-{auth}")
    server = ServeProcess(linked_data_root(data_dir, root / "data"), **server_env(auth))
    try:
        server.wait_state("READY", timeout=240)
        server.auth = auth
        document = deployment_document(server.url, (USER, PASSWORD) if auth == "basic" else None)
        (root / "openapi.json").write_text(json.dumps(document))
        reports, outputs = [], []
        for name, selection in (("routes", "--exclude-path"), ("pre-stop", "--include-path")):
            command = schemathesis_command(root / "openapi.json", server.url, auth, root / name, selection,
                                           "/pre-stop", "--max-examples", str(EXAMPLES), "--generation-deterministic")
            done = subprocess.run(command, check=False, cwd=root, capture_output=True, text=True, timeout=900)
            outputs.append(done.stdout + done.stderr)
            found = sorted((root / name).glob("json-*.json"))
            assert found, f"schemathesis wrote no report (exit {done.returncode}):\n{outputs[-1][-4000:]}"
            reports.append(json.loads(found[-1].read_text()))
    finally:
        server.stop()
    return FuzzRun(server, document, reports, outputs)


def _failures_section(output: str) -> str:
    """The FAILURES part of schemathesis' console output: each failure with its curl reproduction."""
    lines = output.splitlines()
    marks = [i for i, line in enumerate(lines) if line.startswith("=====")]
    for i, j in zip(marks, marks[1:] + [len(lines)]):
        if "FAILURES" in lines[i] or "ERRORS" in lines[i]:
            return "\n".join(line for line in lines[i:j] if line.strip())
    return output[-6000:]


def test_no_check_failed(fuzz_run):
    """No 5xx, no status the document does not list, no body off its schema (tests/schemathesis.toml)."""
    for report, output in zip(fuzz_run.reports, fuzz_run.outputs, strict=True):
        assert report["exit_code"] == 0 and not report["failures"] and not report["errors"], \
            _failures_section(output)[:30000]


def _operations(document: dict[str, Any]) -> set[str]:
    return {f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item}


def test_every_route_was_fuzzed(fuzz_run):
    tested = sum(report["operations"]["tested"] for report in fuzz_run.reports)
    assert tested == len(_operations(fuzz_run.document))
    assert all(report["complete"] for report in fuzz_run.reports)


def test_fuzzing_reached_generation(fuzz_run):
    """The narrowed document lets positive data through: both generation routes answered 200 (with auth on,
    so the credentials reached the server), and with auth on the fuzzer also tried them without credentials."""
    logged = [e for e in fuzz_run.server.log_entries() if e.get("logger") == "sdfunc.request"]
    generated = {e["route"] for e in logged
                 if e["status"] == 200 and e["route"] in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")}
    assert generated == {"/sdapi/v1/txt2img", "/sdapi/v1/img2img"}
    if fuzz_run.server.auth == "basic":
        assert any(e["status"] == 401 for e in logged)
        assert not any(e["status"] == 429 for e in logged if e["route"] not in GENERATION_ROUTES)


def test_server_logged_no_error(fuzz_run):
    """No error in the server's log: the tracebacks behind any 5xx above, and failures no response shows
    (background work, the request log itself). Each: its request id (as in the 5xx body) and exception."""
    entries = fuzz_run.server.log_entries()
    requests_by_id = {e["request_id"]: e["msg"] for e in entries if e.get("logger") == "sdfunc.request"}
    errors = [f"{e['request_id']} {requests_by_id.get(e['request_id'], '')}: {e['msg']}: "
              f"{(e.get('exc') or '').strip().splitlines()[-1:]}"
              for e in entries if e["level"] in ("ERROR", "CRITICAL")]
    assert not errors, "\n".join(errors)


# The long run (scripts/fuzz.sh) -------------------------------------------------------------------------
def _main(argv: list[str]) -> int:
    """`env AUTH`: the server's settings as shell exports. `document URL AUTH FILE`: the narrowed document.
    `credentials`: the fuzzing user's `user:password` (auth mode basic)."""
    import shlex

    if argv[:1] == ["env"] and len(argv) == 2:
        for key, value in server_env(argv[1]).items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    if argv == ["credentials"]:
        print(f"{USER}:{PASSWORD}")
        return 0
    if argv[:1] == ["document"] and len(argv) == 4:
        credentials = (USER, PASSWORD) if argv[2] == "basic" else None
        Path(argv[3]).write_text(json.dumps(deployment_document(argv[1], credentials), indent=1))
        return 0
    print(f"usage: python -m tests.test_fuzz env AUTH | document URL AUTH FILE | credentials   (AUTH: "
          f"{'|'.join(AUTH_MODES)})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
