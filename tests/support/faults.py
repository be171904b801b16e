"""Helpers of the fault tests (tests/http/test_faults.py in process, tests/e2e/test_faults_processes.py with real
processes): an app with prices on its own data root, a tiny txt2img keyed by request id, and the records
invariant every fault test ends with: each succeeded ledger row has exactly its image rows, each failed row has
neither images nor a charge, and no image row lacks its ledger row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select

from handler.records.db import generated_images, ledger
from tests.conftest import TINY, make_settings

PRICE = {"prices": {"cpu": "0.01"}}


def assert_records_agree(url: str) -> dict[str, dict]:
    """The ledger and the image records agree (the invariant above); returns {request_id: ledger row}."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            images = {(c, r): n for c, r, n in conn.execute(
                select(generated_images.c.consumer, generated_images.c.request_id, func.count())
                .group_by(generated_images.c.consumer, generated_images.c.request_id)).all()}
            rows = [dict(r._mapping) for r in conn.execute(select(ledger).order_by(ledger.c.id))]
    finally:
        engine.dispose()
    for row in rows:
        count = images.pop((row["consumer"], row["request_id"]), 0)
        if row["status"] == "succeeded":
            assert row["images"] >= 1 and count == row["images"] and row["billed_ms"] >= 1, row
        else:
            assert row["status"] == "failed" and count == 0, row
            assert row["billed_ms"] == 0 and row["amount_nanos"] == 0 and row["images"] == 0, row
    assert not images, f"image records without their ledger row: {images}"
    return {row["request_id"]: row for row in rows}


def build(root: Path, **overrides: Any) -> Any:
    """An app on `root` with PRICE, its ledger in `root`/records.sqlite3 unless `database_url` says otherwise."""
    from handler.app import create_app

    overrides.setdefault("database_url", f"sqlite:///{root / 'records.sqlite3'}")
    return create_app(make_settings(root, billing=PRICE, **overrides))


def txt2img(client: Any, key: str, checkpoint: str | None = None, **body: Any) -> Any:
    """POST a tiny txt2img whose ledger id is `key` (the request id)."""
    if checkpoint is not None:
        body["override_settings"] = {"sd_model_checkpoint": checkpoint}
    return client.post("/sdapi/v1/txt2img", json={**TINY, **body}, headers={"x-fc-request-id": key})


def assert_not_charged(r: Any, status: int, code: str) -> None:
    """`r` failed with `status` and error `code`, without a traceback, and charged nothing."""
    assert r.status_code == status, r.get_json()
    error = r.get_json()["error"]
    assert error["code"] == code and "Traceback" not in error["message"]
    assert r.headers["X-Charge"] == "0" and r.headers["X-Billed-Duration-Ms"] == "0"


def pngs(root: Path) -> set[Path]:
    """The PNGs saved under `root`/outputs."""
    return set((root / "outputs").rglob("*.png"))
