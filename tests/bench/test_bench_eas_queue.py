"""The PAI-EAS queue benchmark runs end to end with tiny settings (one real gunicorn server, the synchronous path
and the queue path through the `eas_prediction` SDK) and returns a well-formed result. No timing is asserted: this
machine's speed is not a test, and whether the queue path keeps up is the benchmark's question, not the test's."""

import json
import math

import pytest

from bench.eas_queue import PATHS, BenchConfig, main, markdown, parse_args, server_env, task_settings


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_parse_args_and_the_server_environment(tmp_path):
    cfg, out, md, _ = parse_args(["--rounds", "1", "--requests", "3", "--size", "96", "--steps", "2",
                                  "--concurrency", "1,3", "--server-env", "SDFUNC_TASKS__WATCH_POLL_SECONDS=0.1"])
    assert (cfg.rounds, cfg.requests, cfg.size, cfg.steps, cfg.concurrency) == (1, 3, 96, 2, (1, 3))
    assert out is None and md is None
    env = dict(server_env(cfg, tmp_path))
    assert env["SDFUNC_QUEUE__MAX_WAITING"] == "3" and json.loads(env["SDFUNC_WARMUP__SHAPES"]) == ["96x96@2"]
    assert env["SDFUNC_DATABASE_URL"].startswith("sqlite:///") and str(tmp_path) in env["SDFUNC_DATABASE_URL"]
    assert task_settings(server_env(cfg, tmp_path)) == {"runners": 2, "watch_poll_seconds": 0.1}
    default = parse_args([])[0]
    assert default.concurrency == BenchConfig.concurrency and default.requests == BenchConfig.requests
    for bad in (["--requests", "2", "--concurrency", "1,4"], ["--size", "60"], ["--concurrency", "1,1"],
                ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


@pytest.mark.e2e  # a real gunicorn server
def test_eas_queue_main_runs_and_reports(data_dir, tmp_path, restored_process_state):
    pytest.importorskip("eas_prediction", reason="pip install eas-prediction==0.36 (test extras)")
    out, md = tmp_path / "result.json", tmp_path / "result.md"
    status = main(["--data", str(data_dir), "--rounds", "1", "--requests", "2", "--size", "64", "--steps", "1",
                   "--concurrency", "1,2", "--out", str(out), "--markdown", str(md)])
    result = json.loads(out.read_text())  # the --out file

    assert {"benchmark", "date", "command", "config", "machine", "cells", "summary", "checks", "wall_s"} <= set(result)
    assert result["benchmark"] == "eas_queue" and result["machine"]["torch_threads"] >= 1
    assert result["command"].startswith("python -m bench.eas_queue --data")
    assert result["config"]["tasks"]["watch_poll_seconds"] == 0.25
    checks = result["checks"]
    assert checks["ok"] is True and status == 0, checks
    assert checks["frames"] == {"duplicates": 0, "unexpected": 0, "watcher_failure": None, "watcher_stopped": True,
                                "ok": True}
    assert checks["sink_empty"]["stream_length"] == "0"

    # One cell per path and concurrency, every request answered; the path that goes first alternates.
    cells = result["cells"]
    assert [(c["path"], c["concurrency"]) for c in cells] == [("sync", 1), ("queue", 1), ("queue", 2), ("sync", 2)]
    for cell in cells:
        assert cell["requests"] == 2 and cell["images"] == 2 and cell["errors"] == 0, cell
        assert _positive(cell["images_per_s"]) and len(cell["samples_ms"]) == 2
        assert all(_positive(x) for x in cell["samples_ms"])
        if cell["path"] == "queue":
            assert cell["missing_task_rows"] == 0
            assert len(cell["put_ms"]) == len(cell["wait_ms"]) == len(cell["run_ms"]) == len(cell["lag_ms"]) == 2
            assert all(_positive(x) for x in cell["put_ms"] + cell["run_ms"])
            # the lag is measured between two clocks of this machine: it may be tiny, never much below 0
            assert all(x > -50 for x in cell["lag_ms"])

    summary = result["summary"]
    for conc in ("1", "2"):
        e = summary["concurrency"][conc]
        for path in PATHS:
            assert _positive(e[path]["images_per_s"]) and e[path]["errors"] == 0
            assert _positive(e[path]["p50_ms"]) and e[path]["p90_ms"] >= e[path]["p50_ms"]
        for key in ("throughput_ratio", "p50_ratio", "p90_ratio"):
            assert _positive(e[key]), (conc, key, e[key])
        assert len(e["round_throughput_ratios"]) == 1 and _positive(e["round_throughput_ratios"][0])
        assert len(e["round_p50_ratios"]) == 1 and _positive(e["round_p50_ratios"][0])
        assert set(e["queue"]["breakdown_ms"]) == {"put_ms", "wait_ms", "run_ms", "lag_ms"}
    lag = summary["delivery_lag"]
    assert lag["frames"] == 4 and lag["p90_ms"] >= lag["median_ms"]
    assert isinstance(summary["stability"]["disturbed"], bool)

    text = md.read_text()
    assert text == markdown(result)
    assert "| 1 | 2 x 1 |" in text and "| 2 | 2 x 1 |" in text and "Delivery lag" in text
    assert "`tasks.watch_poll_seconds` 0.25" in text and "FAILED" not in text
