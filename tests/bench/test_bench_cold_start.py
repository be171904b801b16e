"""The cold-start benchmark runs end to end with tiny settings (two real gunicorn servers on free loopback
ports) and returns a well-formed result. No timing is asserted: this machine's speed is not a test."""

import json
import math
import shutil

import pytest

from bench.cold_start import PHASES, WAYS, BenchConfig, markdown, run

pytestmark = pytest.mark.e2e  # real gunicorn servers


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_cold_start_runs_and_reports(tmp_path, data_dir):
    # A private copy of the session's demo-sd15: the servers write hashes and outputs into their data root.
    models = tmp_path / "data" / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    shutil.copy2(data_dir / "models" / "Stable-diffusion" / "demo-sd15.safetensors", models)
    # threads=1: one torch thread per server keeps the test quick when another process takes a core (with
    # two threads on two cores, a busy neighbour slows CPU generation by 10-100x).
    cfg = BenchConfig(data=tmp_path / "data", models=("demo-sd15",), size=64, steps=2, repeats=1, steady=2, threads=1)
    result = run(cfg, command="pytest cold start")
    json.dumps(result)  # the --out file is this, as JSON

    assert {"benchmark", "date", "command", "config", "machine", "target", "models", "wall_s"} <= set(result)
    assert set(result["models"]) == {"demo-sd15"}
    assert result["machine"]["torch_threads"] >= 1
    entry = result["models"]["demo-sd15"]
    assert isinstance(entry["target_pass"], bool) and isinstance(result["target"]["pass"], bool)
    assert isinstance(result["disturbed"], bool)

    for way in WAYS:
        runs = entry[way]["runs"]
        assert len(runs) == 1
        r = runs[0]
        for key in ("health_s", "first_image_s", "first_request_ms", "steady_median_ms", "first_over_steady",
                    "steady_spread"):
            assert _positive(r[key]), (way, key)
        assert set(r["others_cpu_share"]) == {"to_first_image", "steady"}
        assert all(v is None or 0 <= v <= 1 for v in r["others_cpu_share"].values())
        assert len(r["steady_ms"]) == 2 and all(_positive(x) for x in r["steady_ms"])
        assert math.isclose(r["first_over_steady"], r["first_request_ms"] / r["steady_median_ms"], rel_tol=0.01)
        assert r["first_image_s"] * 1000 >= r["first_request_ms"]  # the first image includes its request

        b = r["breakdown"]
        assert b["complete"] is True and b["healthz_status"] == 200
        assert set(PHASES) <= set(b["phases"]), (way, b["phases"])
        assert all(v >= 0 for v in b["phases"].values())
        assert _positive(b["total_seconds"]) and _positive(b["phase_sum_s"])
        assert isinstance(b["unattributed_s"], float) and isinstance(b["server_start_minus_popen_s"], float)

        s = entry[way]["summary"]
        assert s["first_over_steady"]["values"] == [r["first_over_steady"]]
        assert set(s["phases_median_s"]) == set(PHASES)
        assert s["cold_start_complete"] is True and isinstance(s["disturbed"], bool)

    cold = entry["no_initialize"]["runs"][0]
    assert cold["first_cold_flag"] is True  # the first request made the first image: X-Cold-Start: true
    assert "initialize_ms" not in cold

    warm = entry["initialize_first"]["runs"][0]
    assert warm["initialize_cold_flag"] is True and warm["first_cold_flag"] is False
    assert warm["initialize_warmed"] is True and warm["initialize_cold_start"]["complete"] is True
    assert _positive(warm["initialize_ms"]) and _positive(warm["initialize_done_s"])
    assert warm["health_s"] < warm["initialize_done_s"] < warm["first_image_s"]

    table = markdown(result)
    assert "**demo-sd15**" in table and "| no initialize |" in table and "| initialize first |" in table
    assert "pytest cold start" in table and ("PASS" in table or "FAIL" in table)
