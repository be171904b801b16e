"""Fuzzing every operation of the served OpenAPI document with schemathesis, against a real gunicorn server.

The server runs on loopback on the tiny demo checkpoints, twice: auth mode `none`, and mode `basic` with a
user (an admin, so the consumer filters and the lifecycle hooks are reachable) whose credentials every fuzzed
request carries. schemathesis gets the document as the server serves it (`/openapi/openapi.json`), nothing
narrowed by hand: the server's small limits (`LIMITS`: a generation is at most 4 images of 128x128 in 2
steps) are in that document because the server writes its settings into it (handler/api/document.py), so a
user's run against their deployment sees the same. Every phase runs (examples, coverage, fuzzing, and the
stateful phase along the document's links) with every check schemathesis has (tests/schemathesis.toml).

Each test case's outcome comes from schemathesis' NDJSON events. A failed check fails the test, with one
exception: a schema-valid request refused with a 422 whose `error.field` is one the operation lists under
`x-refusals` in the document, the rules JSON Schema cannot state (an image that does not decode, a malformed
prompt, two fields together over a limit). Those are counted (`refusals`), and docs/security.md lists them.

`GET /pre-stop` drains the instance when the caller may call it (the admin in mode basic; in mode none the
fuzzer has no lifecycle key and gets 403), so it is fuzzed last.

This is the bounded run of the test suite (derandomized, a few examples per operation). The long run is
`scripts/fuzz.sh`, with the same server settings, checks and verdict (`python -m tests.e2e.test_fuzz ...`).
Both drive the schemathesis CLI in a subprocess: its pytest integration (`schemathesis.pytest.from_fixture`,
4.32.5) sets `Node._nodeid`, which pytest 9.2 no longer has.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests

pytest.importorskip("schemathesis.cli", reason="the fuzz tests need schemathesis (pip install schemathesis==4.32.5)")

CONFIG_FILE = Path(__file__).resolve().parents[1] / "schemathesis.toml"
USER, PASSWORD = "fuzz", "fuzz-secret"
AUTH_MODES = ("none", "basic")
EXAMPLES = 8  # per operation and phase in the bounded run
DOCUMENT = "/openapi/openapi.json"
ALONE = "examples,coverage,fuzzing"  # the phases of GET /pre-stop fuzzed alone: no link leads there (stateful)

# Server limits: a fuzzed generation is at most 4 images of 128x128 in 2 steps.
LIMITS = {"max_width": 128, "max_height": 128, "max_steps": 2, "max_images": 4, "max_prompt_chars": 1000}
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


# The verdict ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Failure:
    """One failed check of one test case."""

    operation: str  # "POST /sdapi/v1/txt2img"
    check: str  # schemathesis' check name
    status: int | None  # the response's status, None without a response
    field: str | None  # the 422 body's error.field, to its first `.` or `[`
    message: str  # schemathesis' failure title and message
    case: dict[str, Any]  # the test case (method, path, query, body, meta)
    sent_authorization: bool  # the request that was sent carried an Authorization header
    sent_query: list[str]  # the names of the query parameters the request sent, in order

    def never_sent_invalid(self, declared: set[str]) -> bool:
        """A negative case whose invalid parts never reached the server: the missing Authorization header when the
        request sent had it (schemathesis' `--auth` puts the credentials back on every request), and undeclared
        query parameters when the request sent none (an empty list is no parameter). `declared`: the operation's
        query parameters."""
        meta = self.case.get("meta") or {}
        negative = {location for location, part in (meta.get("components") or {}).items()
                    if part.get("mode") == "negative"}
        data = (meta.get("phase") or {}).get("data") or {}
        mutations = data.get("mutations") or [data]
        headers = {m.get("parameter") for m in mutations if m.get("parameter_location") == "header"}
        query = [m.get("keywords") for m in mutations if m.get("parameter_location") == "query"]
        header_put_back = headers == {"Authorization"} and self.sent_authorization
        extras_not_sent = (query and all(k == ["additionalProperties"] for k in query)
                           and set(self.sent_query) <= declared and len(set(self.sent_query)) == len(self.sent_query))
        return bool(negative) and negative <= {"header", "query"} and ("header" not in negative or header_put_back) \
            and ("query" not in negative or bool(extras_not_sent))

    def __str__(self) -> str:
        request = {k: self.case.get(k) for k in ("query", "body") if self.case.get(k) is not None}
        return (f"{self.operation}: {self.check} -> {self.status} (field {self.field}): "
                f"{self.message[:600]}\n    {json.dumps(request)[:1500]}")


def _error_field(response: dict[str, Any] | None) -> str | None:
    if not response or response.get("status_code") != 422:
        return None
    try:
        body = json.loads(base64.b64decode(response["content"]["$base64"]))
        field = body["error"].get("field") or ""
    except (KeyError, TypeError, ValueError):
        return None
    return re.split(r"[.\[]", field, maxsplit=1)[0]


def read_failures(ndjson: Path) -> tuple[list[Failure], int]:
    """Every failed check in a schemathesis NDJSON event file, and the number of test cases it ran."""
    failures, cases = [], 0
    for line in ndjson.read_text().splitlines():
        event = json.loads(line)
        recorder = event.get("ScenarioFinished", {}).get("recorder") or {}
        cases += len(recorder.get("cases", {}))
        for case_id, checks in recorder.get("checks", {}).items():
            for check in checks:
                if check["status"] == "success":
                    continue
                case = recorder["cases"][case_id]["value"]
                interaction = recorder.get("interactions", {}).get(case_id) or {}
                response = interaction.get("response")
                sent = (interaction.get("request") or {}).get("headers") or {}
                uri = (interaction.get("request") or {}).get("uri") or ""
                info = (check.get("failure_info") or {}).get("failure") or {}
                failures.append(Failure(
                    operation=f"{case['method'].upper()} {case['path']}", check=check["name"],
                    status=response.get("status_code") if response else None, field=_error_field(response),
                    message=f"{info.get('title', '')}: {info.get('message', '')}", case=case,
                    sent_authorization=any(name.lower() == "authorization" for name in sent),
                    sent_query=[name for name, _ in parse_qsl(urlsplit(uri).query, keep_blank_values=True)]))
    return failures, cases


def read_report_dir(folder: Path) -> tuple[list[Failure], int, dict[str, Any]]:
    """What one `schemathesis run --report-dir folder` wrote: the failed checks and the number of test cases
    (its NDJSON events), and its JSON report (`errors`, `operations`, `complete`)."""
    failures, cases = read_failures(sorted(folder.glob("ndjson-*.ndjson"))[-1])
    return failures, cases, json.loads(sorted(folder.glob("json-*.json"))[-1].read_text())


def verdict(failures: list[Failure], document: dict[str, Any]) -> tuple[Counter, list[Failure]]:
    """(the documented refusals by (operation, field), every other failure). A documented refusal is a
    schema-valid request answered 422 for a field its operation lists under `x-refusals`. A negative case whose
    invalid parts never reached the server (`Failure.never_sent_invalid`) is no failure either: the server got a
    valid request; it is counted as (operation, "never sent invalid")."""
    refusals: Counter = Counter()
    unexpected = []
    for failure in failures:
        method, path = failure.operation.split(" ", 1)
        listed = document["paths"].get(path, {}).get(method.lower(), {}).get("x-refusals", {})
        if failure.check == "positive_data_acceptance" and failure.status == 422 and failure.field in listed:
            refusals[(failure.operation, failure.field)] += 1
        elif failure.check == "negative_data_rejection" and failure.never_sent_invalid(
                {p["name"] for p in document["paths"].get(path, {}).get(method.lower(), {}).get("parameters", [])
                 if p["in"] == "query"}):
            refusals[(failure.operation, "never sent invalid")] += 1
        else:
            unexpected.append(failure)
    return refusals, unexpected


# The bounded run ----------------------------------------------------------------------------------------
def schemathesis_command(url: str, auth: str, report_dir: Path, *args: str) -> list[str]:
    """`schemathesis run` on the server's own document at `url`, with its credentials, every check on."""
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG_FILE), "--no-color", "run",
               url + DOCUMENT, "--url", url, "--continue-on-failure", "--report", "junit,json,ndjson",
               "--report-dir", str(report_dir)]
    if auth == "basic":
        command += ["--auth", f"{USER}:{PASSWORD}"]
    return command + list(args)


@dataclass
class FuzzRun:
    server: Any  # tests.support.serving.ServeProcess, stopped (its log stays)
    document: dict[str, Any]  # as the server served it
    failures: list[Failure]  # every failed check: every route but /pre-stop, then /pre-stop
    cases: int
    reports: list[dict[str, Any]]  # schemathesis' JSON reports, in the same order
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
        document = requests.get(server.url + DOCUMENT, timeout=60).json()
        failures, cases, reports, outputs = [], 0, [], []
        for name, selection in (("routes", ["--exclude-path", "/pre-stop"]),
                                ("pre-stop", ["--include-path", "/pre-stop", "--phases", ALONE])):
            command = schemathesis_command(server.url, auth, root / name, *selection,
                                           "--max-examples", str(EXAMPLES), "--generation-deterministic")
            done = subprocess.run(command, check=False, cwd=root, capture_output=True, text=True, timeout=900)
            outputs.append(done.stdout + done.stderr)
            assert any((root / name).glob("json-*.json")), \
                f"schemathesis wrote no report (exit {done.returncode}):\n{outputs[-1][-4000:]}"
            more, ran, report = read_report_dir(root / name)
            failures += more
            cases += ran
            reports.append(report)
    finally:
        server.stop()
    return FuzzRun(server, document, failures, cases, reports, outputs)


def _failures_section(output: str) -> str:
    """The FAILURES part of schemathesis' console output: each failure with its curl reproduction."""
    lines = output.splitlines()
    marks = [i for i, line in enumerate(lines) if line.startswith("=====")]
    for i, j in zip(marks, marks[1:] + [len(lines)]):
        if "FAILURES" in lines[i] or "ERRORS" in lines[i]:
            return "\n".join(line for line in lines[i:j] if line.strip())
    return output[-6000:]


def test_no_check_failed(fuzz_run):
    """Every check passed for every test case, but for the refusals the document lists (`x-refusals`)."""
    refusals, unexpected = verdict(fuzz_run.failures, fuzz_run.document)
    assert not unexpected, f"{len(unexpected)} failed checks:\n" + "\n".join(map(str, unexpected[:40]))
    for report, output in zip(fuzz_run.reports, fuzz_run.outputs, strict=True):
        assert not report["errors"], _failures_section(output)[:30000]
    assert fuzz_run.cases > 1000


def test_the_listed_refusals_are_each_a_rule_of_the_server(fuzz_run):
    """Not vacuous: the refusals let through are ones the run met, and each names its reason in the document."""
    refusals, _ = verdict(fuzz_run.failures, fuzz_run.document)
    assert refusals, "no documented refusal met: the run never reached the generation routes' own checks"
    for (operation, field), _count in refusals.items():
        method, path = operation.split(" ", 1)
        if field == "never sent invalid":
            assert fuzz_run.server.auth == "basic", operation
            continue
        assert fuzz_run.document["paths"][path][method.lower()]["x-refusals"][field]


def _operations(document: dict[str, Any]) -> set[str]:
    return {f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item}


def test_every_route_was_fuzzed(fuzz_run):
    tested = sum(report["operations"]["tested"] for report in fuzz_run.reports)
    assert tested == len(_operations(fuzz_run.document))
    assert all(report["complete"] for report in fuzz_run.reports)


def test_fuzzing_reached_generation(fuzz_run):
    """The served document lets positive data through: both generation routes answered 200 (with auth on,
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
    """`env AUTH`: the server's settings as shell exports. `credentials`: the fuzzing user's `user:password`
    (auth mode basic). `verdict DOCUMENT REPORT_DIR...`: the documented refusals counted, every other failure
    and every schemathesis error printed; exit 1 when there is any."""
    import shlex

    if argv[:1] == ["env"] and len(argv) == 2:
        for key, value in server_env(argv[1]).items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    if argv == ["credentials"]:
        print(f"{USER}:{PASSWORD}")
        return 0
    if argv[:1] == ["verdict"] and len(argv) >= 3:
        document = json.loads(Path(argv[1]).read_text())
        failures, cases, errors = [], 0, []
        for folder in map(Path, argv[2:]):  # each a --report-dir of `schemathesis run`
            more, ran, report = read_report_dir(folder)
            failures += more
            cases += ran
            errors += report["errors"]
        refusals, unexpected = verdict(failures, document)
        print(f"{cases} test cases; {sum(refusals.values())} documented refusals (x-refusals), "
              f"{len(unexpected)} other failed checks, {len(errors)} errors")
        for (operation, field), count in sorted(refusals.items()):
            print(f"  refusal  {count:6d}  {operation}  {field}")
        for check, count in sorted(Counter((f.operation, f.check, f.status) for f in unexpected).items()):
            print(f"  FAILED   {count:6d}  {check}")
        for failure in unexpected[:20]:
            print(f"  {failure}")
        for error in errors:
            print(f"  ERROR    {json.dumps(error)[:300]}")
        return 1 if unexpected or errors else 0
    print(f"usage: python -m tests.e2e.test_fuzz env AUTH | credentials | verdict DOCUMENT REPORT_DIR...   (AUTH: "
          f"{'|'.join(AUTH_MODES)})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
