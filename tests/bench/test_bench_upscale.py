"""The upscaler benchmark runs end to end with tiny settings (one real gunicorn server; extra-single-image tiled and
untiled, hires fix with a model upscaler against Latent) and returns a well-formed result. No timing is asserted:
this machine's speed is not a test."""

import json
import math

import pytest

from bench.upscale import ARMS, BENCH_MODEL, LATENT, BenchConfig, main, markdown, parse_args, parse_server_timing, tiles
from tests.conftest import linked_data_root


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_parse_args_tiles_and_server_timing():
    cfg, out, md, _ = parse_args(["--sizes", "64,200", "--rounds", "1", "--blocks", "2", "--tile", "96",
                                  "--hires-upscalers", "demo-srvgg-2x", "--hires-rounds", "2"])
    assert (cfg.sizes, cfg.rounds, cfg.blocks, cfg.tile, cfg.overlap) == ((64, 200), 1, 2, 96, 8)
    assert cfg.hires_upscalers == ("demo-srvgg-2x",) and cfg.hires_rounds == 2 and out is None and md is None
    default = parse_args([])[0]
    assert default.sizes == BenchConfig.sizes and default.hires_upscalers == (BENCH_MODEL, "demo-srvgg-2x")
    for bad in (["--sizes", "60"], ["--sizes", "64,64"], ["--rounds", "0"], ["--hires-upscalers", LATENT],
                ["--denoising", "0"], ["--tile", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    assert [tiles(s, 192) for s in (128, 192, 256, 384, 400)] == [1, 1, 4, 4, 9]
    assert parse_server_timing("queue;dur=0.1, load;dur=2, gen;dur=523.2, total") == {
        "queue": 0.1, "load": 2.0, "gen": 523.2}


@pytest.mark.e2e  # a real gunicorn server
def test_upscale_main_runs_and_reports(data_dir, tmp_path, restored_process_state):
    root = linked_data_root(data_dir, tmp_path / "data")
    out, md = tmp_path / "result.json", tmp_path / "result.md"
    status = main(["--data", str(root), "--sizes", "64", "--tile", "32", "--blocks", "1", "--rounds", "1",
                   "--hires-size", "64", "--steps", "1", "--hires-steps", "1", "--hires-rounds", "1",
                   "--hires-upscalers", f"{BENCH_MODEL},demo-srvgg-2x", "--out", str(out), "--markdown", str(md)])
    result = json.loads(out.read_text())

    assert {"benchmark", "date", "command", "config", "machine", "upscale", "hires", "summary", "checks",
            "wall_s"} <= set(result)
    assert result["benchmark"] == "upscale" and result["command"].startswith("python -m bench.upscale --data")
    assert result["checks"]["ok"] is True and status == 0, result["checks"]
    assert result["checks"]["no_loads"] == {"upscale": 0, "hires": 0, "ok": True}  # warm-up loaded every model
    assert (root / "models" / "ESRGAN" / f"{BENCH_MODEL}.safetensors").is_file()
    assert result["config"]["listed_scales"] == {BENCH_MODEL: 4.0, "demo-srvgg-2x": 2.0}
    assert result["config"]["bench_model"]["num_feat"] == 64 and result["config"]["bench_model"]["num_block"] == 1

    samples = result["upscale"]["samples"]
    assert sorted(s["arm"] for s in samples) == sorted(ARMS)
    for s in samples:
        assert not s.get("error") and _positive(s["gen_ms"]) and s["wall_ms"] >= s["gen_ms"], s
        assert s["tiles"] == (4 if s["arm"] == "tiled" else 1)
    row = result["summary"]["sizes"]["64"]
    assert row["output"] == 128 and row["tiled"]["tiles"] == 4 and _positive(row["ratio"])
    for arm in ARMS:
        assert _positive(row[arm]["s_per_mp_gen"]) and _positive(row[arm]["s_per_mp_wall"]) and row[arm]["errors"] == 0
    assert result["upscale"]["max_pixel_diff"]["64"] <= 255

    hires = result["summary"]["hires"]
    assert list(hires) == [LATENT, BENCH_MODEL, "demo-srvgg-2x"] and hires[LATENT]["ratio"] == 1.0
    assert all(_positive(e["gen_ms"]) and _positive(e["ratio"]) and e["errors"] == 0 for e in hires.values())
    assert isinstance(result["summary"]["stability"]["disturbed"], bool)

    text = md.read_text()
    assert text == markdown(result)
    assert "| 64x64 | 128x128 | 4 |" in text and f"| `{BENCH_MODEL}` |" in text and "FAILED" not in text
