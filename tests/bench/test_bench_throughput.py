"""The throughput benchmark runs end to end with tiny settings (two real gunicorn servers, batching off and on,
on free loopback ports) and returns a well-formed result. No timing is asserted: this machine's speed is not a
test, and whether batching pays off here is the benchmark's question, not the test's."""

import json
import math

import pytest

from bench.harness.cli import Shape
from bench.throughput import SERVERS, BenchConfig, main, markdown, parse_args, server_envs


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_parse_args_sizes_concurrency_and_batching():
    cfg, out, md, _ = parse_args(["--sizes", "64@1:4,128", "--concurrency", "1,3", "--rounds", "1",
                                  "--requests", "5", "--batch-max-size", "4", "--batch-max-wait-ms", "5"])
    assert cfg.shapes == (Shape(64, 1, 4), Shape(128, 8, 5)) and cfg.concurrency == (1, 3) and cfg.rounds == 1
    assert cfg.batch_max_size == 4 and cfg.batch_max_wait_ms == 5.0 and out is None and md is None
    default = parse_args([])[0]
    assert default.shapes == BenchConfig.shapes and default.concurrency == BenchConfig.concurrency  # CLI = config


def test_server_envs_make_an_ab_that_sheds_nothing(tmp_path):
    cfg = BenchConfig(shapes=(Shape(64, 4, 8), Shape(256, 8, 8)), concurrency=(1, 2, 4, 8),
                      server_env=(("SDFUNC_BATCH__MAX_SIZE", "3"), ("SDFUNC_THREADS", "9")))
    envs = {name: dict(env) for name, env in server_envs(cfg, tmp_path).items()}
    assert envs["off"]["SDFUNC_BATCH__MAX_SIZE"] == "1"  # --server-env can not turn the A/B into an A/A
    assert envs["on"]["SDFUNC_BATCH__MAX_SIZE"] == "8" and envs["on"]["SDFUNC_BATCH__MAX_WAIT_MS"] == "20"
    for env in envs.values():
        assert int(env["SDFUNC_QUEUE__MAX_WAITING"]) >= 8 and env["SDFUNC_THREADS"] == "9"
        assert json.loads(env["SDFUNC_WARMUP__SHAPES"]) == ["64x64@4", "256x256@8"]
    assert envs["on"]["SDFUNC_DATABASE_URL"] != envs["off"]["SDFUNC_DATABASE_URL"]


@pytest.mark.e2e  # two real gunicorn servers
def test_throughput_main_runs_and_reports(tmp_path, restored_process_state):
    out, md = tmp_path / "result.json", tmp_path / "result.md"
    status = main(["--data", str(tmp_path / "data"), "--sizes", "64@1:4", "--concurrency", "1,2", "--rounds", "1",
                   "--out", str(out), "--markdown", str(md)])
    result = json.loads(out.read_text())  # the --out file

    assert {"benchmark", "date", "command", "config", "machine", "check", "cells", "summary", "billing", "checks",
            "wall_s"} <= set(result)
    assert result["benchmark"] == "throughput" and result["machine"]["torch_threads"] >= 1
    assert result["command"].startswith("python -m bench.throughput --data")
    assert status == (0 if result["checks"]["ok"] else 1)

    # One cell per server, size and concurrency, every request answered with one image.
    cells = result["cells"]
    assert sorted((c["server"], c["concurrency"]) for c in cells) == sorted((s, c) for s in SERVERS for c in (1, 2))
    for cell in cells:
        assert cell["size"] == 64 and cell["requests"] == 4 and cell["images"] == 4, cell
        assert cell["errors"] == 0 and cell["status_429"] == 0 and cell["statuses"] == {"200": 4}, cell
        assert _positive(cell["images_per_s"]) and _positive(cell["wall_s"]) and len(cell["samples_ms"]) == 4
        assert cell["billed_ms"] >= 0 and cell["devices"] == ["cpu"]
    # The server that goes first alternates from cell to cell.
    assert [c["server"] for c in cells] == ["off", "on", "on", "off"]

    entry = result["summary"]["sizes"]["64"]
    assert entry["steps"] == 1 and entry["requests_per_cell"] == 4
    for conc in ("1", "2"):
        e = entry["concurrency"][conc]
        for name in SERVERS:
            assert _positive(e[name]["images_per_s"]) and e[name]["errors"] == 0
            assert _positive(e[name]["p50_ms"]) and e[name]["p95_ms"] >= e[name]["p50_ms"]
        assert _positive(e["on_over_off"]) and len(e["round_ratios"]) == 1

    # The equality check ran on both servers: a burst of 2 and one request alone, every image compared.
    check = result["check"]["sizes"]["64"]
    assert check["burst"] == 2 and len(check["diffs_by_seed"]) == 2 and check["errors"] == []
    assert check["max_diff_alone"] is not None and check["max_diff"] is not None
    assert 0 <= check["max_diff"] <= 2 and check["ok"] is True

    for name in SERVERS:
        assert result["billing"][name]["images"] == 8 and result["billing"][name]["billed_ms"] >= 0
    checks = result["checks"]
    assert checks["errors"] == {"count": 0, "status_429": 0, "ok": True} and checks["pixels"]["ok"] is True
    assert isinstance(checks["billed_within_wall"]["ok"], bool) and isinstance(checks["ok"], bool)

    text = md.read_text()
    assert text == markdown(result)
    assert "| 64x64 | 1 | 2 | 4 x 1 |" in text and "Same pixels" in text and "Checks" in text
