"""The records-overhead benchmark runs end to end with tiny settings (in-process apps, a few rounds) on SQLite,
and on MariaDB when it is installed, and returns a well-formed result whose ledger rows really are in the
databases. No timing is asserted: this machine's speed is not a test."""

import json
import math
import uuid

import pytest
from sqlalchemy import create_engine, func, select

from bench.harness.stats import block_medians
from bench.records_overhead import (
    BASELINE,
    BenchConfig,
    bootstrap_diff_interval,
    markdown,
    parse_args,
    redact_args,
    run,
)
from handler.records.db import generated_images, ledger

ROUNDS, WARMUP, BATCH = 3, 1, 2


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _count(url: str, prefix: str, name: str) -> dict[str, int]:
    """This config's rows, counted with a fresh engine (not the benchmark's)."""
    engine = create_engine(url)
    mine = f"{prefix}-{name}-%"
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(ledger.c.request_id, ledger.c.status, ledger.c.images, ledger.c.amount_nanos)
                                .where(ledger.c.request_id.like(mine))).all()
            images = conn.execute(select(func.count()).select_from(generated_images)
                                  .where(generated_images.c.request_id.like(mine))).scalar_one()
            b64 = conn.execute(select(func.count()).select_from(generated_images).where(
                generated_images.c.request_id.like(mine), generated_images.c.image_base64.is_not(None))).scalar_one()
    finally:
        engine.dispose()
    assert all(r.status == "succeeded" and r.images == BATCH and r.amount_nanos > 0 for r in rows), rows
    assert len({r.request_id for r in rows}) == len(rows)  # a fresh Idempotency-Key per request
    return {"ledger": len(rows), "images": int(images), "base64": int(b64)}


def _check_result(result: dict, expected_configs: list[str], db_urls: dict[str, str]) -> None:
    json.dumps(result)  # the --out file is this, as JSON
    assert {"benchmark", "date", "command", "config", "machine", "mariadb", "configs", "summary", "checks",
            "round_orders", "id_prefix", "wall_s"} <= set(result)
    assert result["benchmark"] == "records_overhead"
    assert [c["name"] for c in result["configs"]] == expected_configs
    sent = ROUNDS + WARMUP
    assert all(c["sent"] == sent for c in result["configs"])

    # Every round sent one request to every config, in some order.
    assert len(result["round_orders"]) == ROUNDS
    assert all(sorted(order) == sorted(expected_configs) for order in result["round_orders"])

    summary = result["summary"]
    assert summary["baseline"] == BASELINE and _positive(summary["baseline_median_ms"])
    assert list(summary["configs"]) == expected_configs
    for name, entry in summary["configs"].items():
        assert entry["requests"] == ROUNDS and len(entry["samples_ms"]) == ROUNDS
        assert len(entry["ledger_samples_ms"]) == ROUNDS
        for key in ("median_ms", "p90_ms", "min_ms", "max_ms"):
            assert _positive(entry["total"][key]), (name, key)
        assert _positive(entry["pricing_us_median"]), name  # metering prices every request, `off` included
        assert all(_positive(x) for x in entry["block_medians_ms"])
        if name == BASELINE:
            assert entry["ledger"]["max_ms"] == 0  # no ledger code runs without recording
            assert "ratio" not in entry
            continue
        # The ledger code ran in every timed request of a recording config, and took some time.
        assert all(_positive(x) for x in entry["ledger_samples_ms"]), name
        assert entry["ledger"]["median_ms"] < entry["total"]["median_ms"]
        assert _positive(entry["ratio"]) and _positive(entry["ledger_pct_of_off"])
        assert isinstance(entry["overhead_ms"], float) and isinstance(entry["paired_overhead_ms"], float)
        low, high = entry["overhead_ms_interval"]
        assert low <= high
    stability = summary["stability"]
    assert isinstance(stability["disturbed"], bool) and stability["worst_spread"] >= 1.0

    checks = result["checks"]
    assert checks["ok"] is True, checks
    assert checks[BASELINE]["ok"] and checks[BASELINE]["database"] is None
    for name in expected_configs[1:]:
        check = checks[name]
        assert check["sent"] == sent and check["failed"] == 0
        assert (check["ledger_rows"], check["image_rows"]) == (sent, sent * BATCH)
        assert check["ledger_calls"] == {"claim": ROUNDS, "record_success": ROUNDS, "record_failure": 0}
        # ... and the databases hold them, read back here with a plain engine. save_images_to_db keeps every
        # image; without it the handler decides (it keeps those of requests with an Idempotency-Key), so there
        # the benchmark's own count is only compared with the database's.
        counted = _count(db_urls[name], result["id_prefix"], name)
        assert counted["ledger"] == sent and counted["images"] == sent * BATCH, name
        assert counted["base64"] == check["image_rows_with_base64"] == result["images_kept_base64"][name]
        if name.endswith("+b64"):
            assert counted["base64"] == sent * BATCH, name

    text = markdown(result)
    assert "pytest records" in text and "| off |" in text and "1 (baseline)" in text
    for name in expected_configs:
        assert f"| {name} | {ROUNDS} |" in text
    assert "FAILED" not in text


def test_parse_args_defaults_and_flags():
    cfg, out, md, level = parse_args([])
    assert cfg == BenchConfig() and out is None and md is None and level == "INFO"
    cfg, *_ = parse_args(["--rounds", "5", "--size", "128", "--steps", "2", "--batch", "3", "--no-with-base64",
                          "--no-mysql"])
    assert (cfg.rounds, cfg.size, cfg.steps, cfg.batch, cfg.with_base64, cfg.mysql) == (5, 128, 2, 3, False, False)
    cfg, *_ = parse_args(["--require-mysql", "--mysql-arg=--innodb-flush-log-at-trx-commit=2",
                          "--request-id", "fc-request-id"])
    assert cfg.require_mysql and cfg.mysql_args == ("--innodb-flush-log-at-trx-commit=2",)
    assert cfg.request_id == "fc-request-id"
    for bad in (["--size", "60"], ["--rounds", "0"], ["--no-mysql", "--require-mysql"],
                ["--server-env", "SDFUNC_THREADS=1"], ["--request-id", "header"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_command_line_hides_the_database_password():
    url = "mysql+pymysql://sdfunc:s3cret@127.0.0.1:3306/sdfunc"
    for args in (["--mysql-url", url], [f"--mysql-url={url}"]):
        shown = " ".join(redact_args(["--rounds", "2", *args]))
        assert "s3cret" not in shown and "127.0.0.1:3306/sdfunc" in shown and "--rounds 2" in shown


def test_statistics_helpers():
    config, base = [12.0, 12.5, 13.0, 12.2, 12.8], [10.0, 10.1, 9.9, 10.3, 10.0]
    low, high = bootstrap_diff_interval(config, base)
    assert low <= 2.5 <= high  # median difference 12.5 - 10.0
    assert bootstrap_diff_interval(config, base) == (low, high)  # seeded
    assert block_medians([1, 2, 3, 4, 5, 6, 7, 8]) == [1.5, 3.5, 5.5, 7.5]
    assert block_medians([3.0, 1.0]) == [3.0, 1.0]  # fewer samples than blocks


def test_no_mariadb_means_sqlite_only_or_an_error(data_dir, tmp_path, monkeypatch):
    import bench.harness.mariadb

    monkeypatch.setattr(bench.harness.mariadb, "find_server", lambda: None)
    with pytest.raises(SystemExit, match="require-mysql"):
        run(BenchConfig(data=data_dir, rounds=1, require_mysql=True), command="pytest records")

    cfg = BenchConfig(data=data_dir, records_dir=tmp_path / "records", rounds=ROUNDS, warmup_requests=WARMUP,
                      batch=BATCH, bootstrap_resamples=200)
    result = run(cfg, command="pytest records sqlite")
    assert result["mariadb"]["available"] is False and "not installed" in result["mariadb"]["reason"]
    urls = {c["name"]: c["url"] for c in result["configs"]}
    assert urls[BASELINE] is None
    assert len({urls["sqlite"], urls["sqlite+b64"]}) == 2  # a database of its own per config
    assert all(str(tmp_path / "records") in urls[name] for name in ("sqlite", "sqlite+b64"))
    _check_result(result, [BASELINE, "sqlite", "sqlite+b64"], urls)
    assert "MariaDB not measured" in markdown(result) and "`Idempotency-Key`" in markdown(result)


def test_sqlite_and_mariadb(data_dir, tmp_path, mariadb):
    url = mariadb.create_database(f"t_{uuid.uuid4().hex[:12]}")
    # The ids go in x-fc-request-id here (Idempotency-Key in the SQLite-only test): either is the ledger's id.
    cfg = BenchConfig(data=data_dir, records_dir=tmp_path / "records", rounds=ROUNDS, warmup_requests=WARMUP,
                      batch=BATCH, mysql_url=url, request_id="fc-request-id", bootstrap_resamples=200)
    result = run(cfg, command="pytest records mariadb")
    assert result["mariadb"]["available"] is True and result["mariadb"]["server"] == "external"
    assert mariadb.password not in json.dumps(result)  # the URL is published without its password
    urls = {c["name"]: c["url"] for c in result["configs"]}
    urls["mariadb"] = urls["mariadb+b64"] = url  # both MariaDB configs wrote into the one database given
    _check_result(result, [BASELINE, "sqlite", "sqlite+b64", "mariadb", "mariadb+b64"], urls)
    text = markdown(result)
    assert "MariaDB" in text and "external" in text and "`x-fc-request-id`" in text
