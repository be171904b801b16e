"""The metrics-overhead benchmark runs end to end with tiny settings (two real gunicorn servers on free
loopback ports, then the in-process timings) and returns a well-formed result. No timing is asserted: this
machine's speed is not a test."""

import json
import math

import pytest

from bench.harness.cli import Shape
from bench.metrics_overhead import SERVERS, BenchConfig, bootstrap_pct_interval, markdown, parse_args, run


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_parse_args_sizes_steps_and_requests():
    cfg, out, md, _ = parse_args(["--sizes", "64@1,256@8:3", "--rounds", "3", "--requests", "2"])
    assert cfg.shapes == (Shape(64, 1, 2), Shape(256, 8, 3)) and cfg.rounds == 3
    assert out is None and md is None
    cfg, *_ = parse_args(["--sizes", "64,128", "--steps", "4"])
    assert cfg.shapes == (Shape(64, 4, 8), Shape(128, 4, 8))
    assert parse_args([])[0].shapes == BenchConfig.shapes  # the CLI's defaults are the config's


def test_bootstrap_interval_holds_the_observed_ratio():
    on, off = [10.0, 10.5, 11.0, 10.2, 10.8], [10.0, 10.1, 9.9, 10.3, 10.0]
    low, high = bootstrap_pct_interval(on, off)
    assert low <= 5.0 <= high  # median(on) / median(off) - 1 = +5 %
    assert bootstrap_pct_interval(on, off) == (low, high)  # seeded: the same run gives the same interval


@pytest.mark.e2e  # two real gunicorn servers
def test_metrics_overhead_runs_and_reports(tmp_path):
    cfg = BenchConfig(data=tmp_path / "data", shapes=(Shape(64, 1, 2),), rounds=1, warmup_requests=1,
                      micro_batches=2, micro_calls=50)
    result = run(cfg, command="pytest smoke")
    json.dumps(result)  # the --out file is this, as JSON

    assert {"benchmark", "date", "command", "config", "machine", "served", "micro", "checks", "targets",
            "wall_s"} <= set(result)
    assert result["machine"]["torch_threads"] >= 1

    entry = result["served"]["sizes"]["64"]
    assert entry["steps"] == 1 and entry["requests_per_block"] == 2
    for name in SERVERS:
        for key in ("median_ms", "p95_ms", "min_ms", "max_ms"):
            assert _positive(entry[name][key]), (name, key)
        assert len(entry[name]["samples_ms"]) == 2 and len(entry[name]["block_medians_ms"]) == 1
    assert _positive(entry["on_over_off"]) and len(entry["round_ratios"]) == 1
    assert isinstance(entry["overhead_ms"], float) and isinstance(entry["overhead_pct"], float)
    low, high = entry["overhead_pct_interval"]
    assert low <= high
    assert isinstance(entry["pass"], bool) and isinstance(entry["conclusive"], bool)
    assert result["served"]["round_orders"] == [["on", "off"]]

    micro = result["micro"]
    for key in ("metrics", "request_log", "request_log_fields", "both"):
        assert _positive(micro["per_request_us"][key]), key
    assert _positive(micro["render_ms"]) and micro["render_bytes"] > 0 and micro["render_series"] > 0
    assert micro["meter"]["route"] == "/sdapi/v1/txt2img" and micro["meter"]["mode"] == "txt2img"
    assert micro["meter"]["model_load_seconds"] is None  # a warm request's meter
    assert _positive(micro["pct_of_served_off_median"]["64"])

    checks = result["checks"]
    # 1 warm-up + 2 timed txt2img requests went to `on`; its counter and its request log saw each of them.
    assert checks["requests_total"] == {"sent": 3, "scraped": 3.0, "by_status": {"200": 3.0}, "ok": True}
    assert checks["request_log_lines"] == {"on": 3, "off": 0, "ok": True}
    assert checks["in_flight_at_scrape"] == {"value": 1.0, "ok": True}  # the scrape itself; nothing leaked
    assert checks["off_metrics_status"] == {"status": 404, "ok": True}
    assert checks["ok"] is True

    targets = result["targets"]
    assert targets["smallest_size"] == 64 and isinstance(targets["pass"], bool)
    assert set(targets["served_pass"]) == {"64"} and isinstance(targets["micro_pass"], bool)

    text = markdown(result)
    assert "| 64x64 | 1 | 2 x 1 |" in text and "pytest smoke" in text and "Result:" in text and "OK" in text
