"""The model-cache benchmark runs end to end in its quick mode (in process, demo checkpoints) and returns a
well-formed result. No timing is asserted: this machine's speed is not a test."""

import json
import math
import shutil

from bench.model_cache import QUICK, WAYS, BenchConfig, markdown, parse_args, run


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_model_cache_quick_runs_and_reports(tmp_path, data_dir):
    # A private copy of the demo checkpoints: the benchmark writes hashes into its data root.
    shutil.copytree(data_dir / "models", tmp_path / "data" / "models")
    cfg, _out, _md, _ = parse_args(["--quick", "--data", str(tmp_path / "data"), "--models", "demo-sd15,demo-sdxl",
                                  "--mount-model", "demo-sd15", "--threads", "1", "--rtt-ms", "1"])
    assert (cfg.switches, cfg.cold_repeats, cfg.mount_repeats) == (QUICK["switches"], QUICK["cold_repeats"],
                                                                   QUICK["mount_repeats"])
    result = run(cfg, command="pytest model cache")
    json.dumps(result)  # the --out file is this, as JSON
    assert {"benchmark", "date", "command", "config", "machine", "switch", "mount", "wall_s"} <= set(result)
    for model in ("demo-sd15", "demo-sdxl"):
        r = result["switch"][model]
        assert len(r["miss_ms"]) == 1 and len(r["hit_ms"]) == cfg.switches
        assert _positive(r["miss_median_ms"]) and _positive(r["hit_median_ms"]) and _positive(r["bytes"])
        assert r["miss_over_hit"] > 1  # a hit never loads
    m = result["mount"]
    assert m["file"] == "demo-sd15.safetensors"
    for way in WAYS:
        assert len(m["runs"][way]) == 1 and _positive(m["measured_median_s"][way])
    assert "copy" in m["runs"]["copy"][0]["phases_s"] and "copy" not in m["runs"]["mmap"][0]["phases_s"]
    model = m["model"]
    assert model["copy_requests"] == 1 and model["mmap_requests_max"] >= model["mmap_requests_min"] > 1
    sim = m["simulated"]["1.0"]
    assert _positive(sim["copy_s"]) and sim["mmap_max_s"] >= sim["mmap_min_s"] > 0
    table = markdown(result)
    assert "| demo-sd15 |" in table and "| mmap |" in table and "| copy |" in table and "pytest model cache" in table


def test_defaults():
    assert BenchConfig().mount_model == "demo-sdxl" and BenchConfig().rtt_ms == (0.5, 2.0)
