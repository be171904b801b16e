"""The serving-overhead benchmark runs end to end with tiny settings (a real gunicorn server on a free
loopback port) and returns a well-formed result. No timing is asserted: this machine's speed is not a test."""

import json
import math

import pytest

from bench.serving_overhead import MODES, BenchConfig, markdown, run

pytestmark = pytest.mark.e2e  # a real gunicorn server


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_serving_overhead_runs_and_reports(tmp_path):
    # warm_start=False: the second server (warm-up on) would double the time; the benchmark run covers it.
    cfg = BenchConfig(data=tmp_path / "data", sizes=(64,), steps=1, repeats=1, rounds=1, warm_start=False,
                      stage_repeats=2)
    result = run(cfg, command="pytest smoke")
    json.dumps(result)  # the --out file is this, as JSON

    assert {"benchmark", "date", "command", "config", "machine", "cold_start", "overhead", "wall_s"} <= set(result)
    assert "warm_start" not in result
    assert result["machine"]["torch_threads"] >= 1

    cold = result["cold_start"]
    assert cold["warmup_on_start"] is False
    for key in ("health_s", "first_image_s", "first_request_ms", "second_request_ms", "first_over_second"):
        assert _positive(cold[key]), key

    entry = result["overhead"]["sizes"]["64"]
    for name in MODES:
        assert _positive(entry[name]["median_ms"]), name
        assert len(entry[name]["samples_ms"]) == 1 and len(entry[name]["block_medians_ms"]) == 1
    assert _positive(entry["served_over_direct"])
    assert isinstance(entry["overhead_ms"], float) and isinstance(entry["overhead_pct"], float)
    assert set(entry["layers_ms"]) == {"generate_minus_direct", "app_minus_generate", "served_minus_app"}
    for key in ("validate_request", "build_scheduler", "assemble_pipeline", "png_encode", "base64", "json_response",
                "png_bytes", "response_bytes"):
        assert _positive(entry["stages_ms"][key]), key
    assert entry["max_pixel_diff_vs_direct"] == 0  # every way made the same image

    assert _positive(result["overhead"]["stability"]["worst_spread"])
    assert _positive(result["http_floor"]["served_health_ms"]) and _positive(result["http_floor"]["app_health_ms"])
    targets = result["overhead"]["targets"]
    assert targets["pct_pass"] is None  # 256x256 was not measured
    assert isinstance(targets["ms_pass"], bool)

    table = markdown(result)
    assert "| 64x64 |" in table and "warm-up off" in table and "pytest smoke" in table
