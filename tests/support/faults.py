"""Helpers of the fault tests (tests/http/test_faults.py in process, tests/e2e/test_faults_processes.py with real
processes): an app with prices on its own data root, a tiny txt2img keyed by request id, the records
invariant every fault test ends with (each succeeded ledger row has exactly its image rows, each failed row has
neither images nor a charge, and no image row lacks its ledger row), and `LostAck`: a ledger COMMIT whose
acknowledgement is lost."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError

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


_LEDGER_WRITE = re.compile(r"\s*(INSERT\s+INTO|UPDATE)\s+[`\"]?ledger\b", re.IGNORECASE)


class LostAck:
    """A fault on a records engine: the next COMMIT of a transaction that wrote a ledger row is carried out (with
    `lands=False` it is rolled back instead) and then fails as a connection lost during it does (MySQL's 2013;
    SQLite's disk I/O error), through the driver, so SQLAlchemy handles it as a real one. With `then_down` the
    database is unreachable from that moment (every connection refused: MySQL's 2003, SQLite's cannot open) until
    `up()`. A context manager: leaving it takes the fault away."""

    def __init__(self, engine: Engine, *, lands: bool = True, then_down: bool = False) -> None:
        self.engine, self.lands, self.then_down = engine, lands, then_down
        self.fired = threading.Event()
        self._down = False
        self._wrote: set[int] = set()  # the DBAPI connections whose open transaction wrote a ledger row
        self._mysql = engine.dialect.name in ("mysql", "mariadb")
        self._real_commit = engine.dialect.do_commit
        self._listeners = (("before_cursor_execute", self._watch), ("rollback", self._forget),
                           ("checkout", self._checkout), ("do_connect", self._connect))

    def __enter__(self) -> LostAck:
        for name, fn in self._listeners:
            event.listen(self.engine, name, fn)
        self.engine.dialect.do_commit = self._commit  # type: ignore[method-assign]
        return self

    def __exit__(self, *_exc: object) -> None:
        del self.engine.dialect.do_commit  # the class's own again
        for name, fn in self._listeners:
            event.remove(self.engine, name, fn)

    def up(self) -> None:
        """The database is reachable again."""
        self._down = False

    def _error(self, mysql_errno: int, mysql_message: str, sqlite_message: str) -> Exception:
        error = self.engine.dialect.loaded_dbapi.OperationalError
        return error(mysql_errno, mysql_message) if self._mysql else error(sqlite_message)

    def _watch(self, conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if not self.fired.is_set() and _LEDGER_WRITE.match(statement):
            self._wrote.add(id(conn.connection.dbapi_connection))

    def _forget(self, conn: Any) -> None:
        self._wrote.discard(id(conn.connection.dbapi_connection))

    def _commit(self, proxied: Any) -> None:
        key = id(proxied.dbapi_connection)
        if key not in self._wrote or self.fired.is_set():
            self._real_commit(proxied)
            return
        self._wrote.discard(key)
        if self.lands:
            self._real_commit(proxied)
        else:
            self.engine.dialect.do_rollback(proxied)
        self._down = self.then_down
        self.fired.set()
        raise self._error(2013, "Lost connection to MySQL server during query", "disk I/O error")

    def _checkout(self, *_args: Any) -> None:
        if self._down:  # a pooled connection: the pool drops it and connects anew (refused below)
            raise DisconnectionError("the records database is down (LostAck)")

    def _connect(self, *_args: Any) -> None:
        if self._down:
            raise self._error(2003, "Can't connect to MySQL server on '127.0.0.1' (111)", "unable to open database file")
