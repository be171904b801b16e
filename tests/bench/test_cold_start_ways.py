"""The pure parts of the cold-start benchmark's bare-script comparison and of the worker-restart benchmark: way
order, pairing, targets, the server's optional report fields, and the Markdown with fields absent or present.
No server or subprocess is started here."""

import json
from pathlib import Path

import pytest

from bench import cold_start as cs
from bench import worker_restart as wr

MACHINE = {"cpus": 2, "cpu": "test CPU", "device": "cpu", "python": "3.11", "torch": "2", "diffusers": "0.4",
           "torch_threads": 2, "load_average": [0.1, 0.1, 0.1], "load_average_end": [0.1, 0.1, 0.1]}


# ---------------------------------------------------------------------------------------------------------
# cold start: ways, pairs, targets


@pytest.mark.parametrize(("ways", "even", "odd"), [
    (("no_initialize", "initialize_first"), ("no_initialize", "initialize_first"),
     ("initialize_first", "no_initialize")),
    (("no_initialize", "bare"), ("no_initialize", "bare"), ("bare", "no_initialize")),
    (("no_initialize", "initialize_first", "bare"), ("no_initialize", "bare", "initialize_first"),
     ("initialize_first", "bare", "no_initialize")),
    (("bare",), ("bare",), ("bare",)),
])
def test_way_order_puts_bare_next_to_every_server_way(ways, even, odd):
    assert cs.way_order(ways, 0) == even and cs.way_order(ways, 2) == even
    assert cs.way_order(ways, 1) == odd


def test_bare_pairs_pair_by_repeat_and_skip_unpaired():
    sdfunc = [{"repeat": 2, "first_image_s": 3.0}, {"repeat": 1, "first_image_s": 4.0},
              {"repeat": 3, "first_image_s": 9.0}]
    bare = [{"repeat": 1, "first_image_s": 5.0}, {"repeat": 2, "first_image_s": 2.0}]
    pairs = cs.bare_pairs(sdfunc, bare)
    assert pairs == [{"repeat": 1, "sdfunc_s": 4.0, "bare_s": 5.0, "ratio": 0.8},
                     {"repeat": 2, "sdfunc_s": 3.0, "bare_s": 2.0, "ratio": 1.5}]
    comparison = cs.bare_comparison("demo-sd15", sdfunc, bare, drop_cache=False)
    assert comparison["median"] == pytest.approx(1.15) and comparison["target_max"] == cs.TARGET_BARE
    assert comparison["pass"] is False
    assert cs.bare_comparison("demo-sd15", sdfunc, [], drop_cache=False) is None


def test_bare_target_is_strict_only_for_a_real_checkpoint_from_a_cold_cache():
    assert cs.bare_target("real-sd15", drop_cache=True) == cs.TARGET_BARE_COLD == 0.85
    assert cs.bare_target("real-sd15", drop_cache=False) == cs.TARGET_BARE == 1.0
    assert cs.bare_target("demo-sd15", drop_cache=True) == cs.TARGET_BARE


def test_overall_pass_judges_only_what_was_measured():
    assert cs.overall_pass({"m": {"target_pass": None}}) is None
    assert cs.overall_pass({"m": {"target_pass": True, "sdfunc_over_bare": {"pass": False}}}) is False
    assert cs.overall_pass({"m": {"target_pass": None, "sdfunc_over_bare": {"pass": True}}}) is True


def test_models_of_adds_real_sd15_once():
    assert cs.models_of(cs.BenchConfig(models=("demo-sd15",), real_arch=True)) == ("demo-sd15", "real-sd15")
    assert cs.models_of(cs.BenchConfig(models=("real-sd15",), real_arch=True)) == ("real-sd15",)
    assert cs.models_of(cs.BenchConfig(models=("demo-sd15",))) == ("demo-sd15",)


def test_parse_args_ways_and_options():
    cfg, *_ = cs.parse_args(["--ways", "no_initialize,bare", "--drop-cache", "--real-arch"])
    assert cfg.ways == ("no_initialize", "bare") and cfg.drop_cache and cfg.real_arch
    assert cs.parse_args([])[0].ways == cs.WAYS
    for bad in ("", "bare,bare", "nope"):
        with pytest.raises(SystemExit):
            cs.parse_args(["--ways", bad])


def test_resident_share_after_drop(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * (1 << 20))
    before = cs.resident_share(path)
    cs.drop_cache(path)
    after = cs.resident_share(path)
    assert before is None or 0.0 <= before <= 1.0
    assert after is None or 0.0 <= after <= 1.0
    assert cs.prepare_start(cs.BenchConfig(), path) is None  # without --drop-cache nothing is dropped


# ---------------------------------------------------------------------------------------------------------
# cold start: the server's report, summaries and the Markdown


def _healthz(extra: bool) -> dict:
    phases = {"process_to_app": 0.5, "imports": 3.0, "device_init": 0.0, "read_weights": 1.0, "to_device": 0.1,
              "first_generation": 0.4}
    report = {"complete": True, "total_seconds": 5.1, "phases": phases}
    if extra:
        report["phases"] = {**phases, "prefetch": 2.0}
        report.update(critical_path_seconds=5.0, overlapped_seconds=1.5)
    return {"status": "READY", "uptime_seconds": 6.0, "cold_start": report}


@pytest.mark.parametrize("extra", [False, True])
def test_breakdown_of_keeps_the_background_out_of_the_sum(extra):
    b = cs.breakdown_of(_healthz(extra), received=1006.5, popen_epoch=1000.0)
    assert b["phase_sum_s"] == 5.0 and b["unattributed_s"] == pytest.approx(0.1)
    assert b["server_start_minus_popen_s"] == 0.5
    assert b["critical_path_seconds"] == (5.0 if extra else None)
    assert b["overlapped_seconds"] == (1.5 if extra else None)


def _server_run(repeat: int, first: float, extra: bool) -> dict:
    return {"repeat": repeat, "resident_after_drop": 0.0, "health_s": 0.6, "first_image_s": first,
            "first_request_ms": 4000.0, "first_cold_flag": True, "steady_ms": [400.0], "steady_median_ms": 400.0,
            "first_over_steady": 10.0, "steady_spread": 1.0,
            "others_cpu_share": {"to_first_image": 0.01, "steady": None},
            "breakdown": {"healthz_status": 200, **cs.breakdown_of(_healthz(extra), 1006.0, 1000.0)}}


def _bare_run(repeat: int, first: float) -> dict:
    return {"repeat": repeat, "resident_after_drop": 0.0, "first_image_s": first,
            "phases": {"imports": 3.0, "load": 1.0, "generate": 0.4}, "device": "cpu", "dtype": "float32",
            "png_bytes": 100, "others_cpu_share": {"to_first_image": 0.02}}


def _cold_result(extra: bool, drop_cache: bool) -> dict:
    server = [_server_run(1, 5.0, extra), _server_run(2, 6.0, extra)]
    bare = [_bare_run(1, 5.5), _bare_run(2, 5.0)]
    entry = {"no_initialize": {"summary": cs.summarize(server), "runs": server},
             "bare": {"summary": cs.summarize_bare(bare), "runs": bare}, "target_pass": None}
    entry["sdfunc_over_bare"] = cs.bare_comparison("real-sd15", server, bare, drop_cache)
    models = {"real-sd15": entry}
    return {"benchmark": "cold_start", "date": "2026-01-01T00:00:00+00:00", "command": "pytest ways",
            "machine": MACHINE, "wall_s": 1.0,
            "config": {"size": 64, "steps": 1, "sampler": "Euler", "cfg_scale": 7.0, "seed": 1, "repeats": 2,
                       "steady": 1, "warmup_shape": "64x64@1", "server_env": [], "drop_cache": drop_cache,
                       "ways": ["no_initialize", "bare"]},
            "target": {"first_over_steady_max": cs.TARGET_RATIO, "pass": cs.overall_pass(models)},
            "models": models, "disturbed": False}


@pytest.mark.parametrize("extra", [False, True])
def test_cold_start_markdown_with_and_without_the_new_fields(extra):
    result = _cold_result(extra, drop_cache=True)
    json.dumps(result)
    s = result["models"]["real-sd15"]["no_initialize"]["summary"]
    assert set(s["phases_median_s"]) == set(cs.PHASES)  # the background phase stays out of the phases
    assert s["background_median_s"] == ({"prefetch": 2.0} if extra else {})
    text = cs.markdown(result)
    assert "| bare script | - | - | 5.25 s (5.50, 5.00) |" in text
    # ratios 5.0 / 5.5 = 0.909 and 6.0 / 5.0 = 1.2: median 1.055 against 0.85
    assert "<= x0.85: FAIL (x1.05" in text and "x0.91 (5.00 / 5.50 s)" in text
    assert "Page cache dropped" in text and "first request after /initialize" not in text
    row = next(line for line in text.splitlines() if line.startswith("| real-sd15 | no initialize |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    prefetch, critical, overlapped = cells[8], cells[10], cells[11]
    assert (prefetch, critical, overlapped) == (("2.00", "5.00", "1.50") if extra else ("-", "-", "-"))
    assert "| real-sd15 | 3.00 | 1.00 | 0.40 | 4.40 |" in text
    assert "Overall: FAIL." in text


def test_cold_start_markdown_demo_target_and_warm_cache():
    result = _cold_result(False, drop_cache=False)
    text = cs.markdown(result)
    assert "<= x1.00: FAIL" in text and "Page cache warm" in text


# ---------------------------------------------------------------------------------------------------------
# worker restart


def test_pick_worker_skips_the_prefetch_reader():
    assert wr.pick_worker({10: "python gunicorn", 11: "python -m pipelines.prefetch x"}, None) == 10
    assert wr.pick_worker({10: "gunicorn", 12: "gunicorn"}, "host-12-abc") == 12
    with pytest.raises(RuntimeError):
        wr.pick_worker({10: "gunicorn", 12: "gunicorn"}, "host-99-abc")
    with pytest.raises(RuntimeError):
        wr.pick_worker({11: "python -m pipelines.prefetch"}, None)


def test_restart_parts_and_ratios():
    cold = {"phases": {"imports": 0.1, "read_weights": 0.3, "to_device": 0.05, "first_generation": 0.4}}
    parts = wr.restart_parts(2.0, cold)
    assert parts == {"model_load_s": 0.35, "first_generation_s": 0.4, "imports_s": 0.1, "restart_overhead_s": 1.25}
    assert wr.restart_parts(2.0, {"phases": {"imports": 0.1}})["restart_overhead_s"] is None
    assert wr.ratio_of({"median": 1.0}, {"median": 4.0}) == 0.25
    assert wr.ratio_of(None, {"median": 4.0}) is None and wr.ratio_of({"median": 1.0}, {"median": 0.0}) is None


def _kill(round_: int, ready: float, overhead: float | None) -> dict:
    return {"round": round_, "killed_pid": 1, "kill_to_health_s": 0.5, "kill_to_ready_s": ready,
            "model_load_s": 0.3, "first_generation_s": 0.2, "imports_s": 4.0, "restart_overhead_s": overhead,
            "cold_start": {}, "worker_start_after_kill_s": 0.04, "others_cpu_share": 0.01}


@pytest.mark.parametrize("overhead_after", [1.2, None])
def test_worker_restart_summary_and_markdown(overhead_after):
    configs = {"before": {"env": [["SDFUNC_WARMUP__PREIMPORT", "false"]], "first_ready_s": 6.0,
                          "kills": [_kill(1, 6.0, 5.5), _kill(2, 7.0, 6.5)]},
               "after": {"env": [["SDFUNC_WARMUP__PREIMPORT", "true"]], "first_ready_s": 6.0,
                         "kills": [_kill(1, 1.7, overhead_after), _kill(2, 1.9, overhead_after)]}}
    for conf in configs.values():
        conf["summary"] = wr.summarize(conf["kills"])
    comparison = wr.compare(configs)
    assert comparison["kill_to_ready_after_over_before"] == pytest.approx(1.8 / 6.5, abs=1e-3)
    result = {"benchmark": "worker_restart", "date": "2026-01-01T00:00:00+00:00", "command": "pytest restart",
              "machine": MACHINE, "wall_s": 1.0, "configs": configs, "comparison": comparison, "disturbed": False,
              "config": {"checkpoint": "demo-sd15", "warmup_shape": "64x64@1", "kills": 2, "poll_s": 0.02,
                         "server_env": []}}
    json.dumps(result)
    text = wr.markdown(result)
    assert "| after | `SDFUNC_WARMUP__PREIMPORT=true` | 6.00 | 0.50 (0.50, 0.50) | 1.80 (1.70, 1.90) |" in text
    if overhead_after is None:
        assert comparison["target"]["pass"] is None and "restart overhead (after) <= 1.5 s: n/a." in text
    else:
        assert comparison["target"]["pass"] is True and "<= 1.5 s: PASS (1.20 s)." in text
        assert "restart overhead x0.20" in text


def test_is_new_worker_by_id_or_uptime():
    assert wr.is_new_worker({"instance_id": "h-2-b", "uptime_seconds": 9.0}, "h-1-a", 1.0)
    assert wr.is_new_worker({"instance_id": "fixed", "uptime_seconds": 0.5}, "fixed", 1.0)
    assert not wr.is_new_worker({"instance_id": "fixed", "uptime_seconds": 9.0}, "fixed", 1.0)


def test_read_mb_s_option_and_a_throttle_that_cannot_apply(tmp_path):
    assert cs.parse_args(["--read-mb-s", "200", "--drop-cache"])[0].read_mb_s == 200
    with pytest.raises(SystemExit):
        cs.parse_args(["--read-mb-s", "0"])
    from bench.harness.throttle import ThrottleUnavailable, read_throttle

    with pytest.raises(ThrottleUnavailable), read_throttle(Path("/proc/self/stat"), 200):  # no block device
        pass
