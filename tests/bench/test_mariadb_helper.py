"""bench.harness.mariadb: a throwaway MariaDB server starts, serves its `sdfunc` user over TCP, makes more databases,
and stops without leaving anything behind. Skipped without a MariaDB install (scripts/test-services.sh installs
one as root) unless SDFUNC_REQUIRE_MYSQL=1, which turns the skip into a failure."""

import os
import socket
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from bench.harness.mariadb import MariaDB, find_server

pytestmark = pytest.mark.e2e  # a real MariaDB server

REQUIRED = os.environ.get("SDFUNC_REQUIRE_MYSQL") == "1"


def _require_server() -> None:
    if find_server() is not None:
        return
    why = ("no MariaDB server (mariadbd, mariadb-install-db, mariadb) installed; scripts/test-services.sh installs"
           " it as root")
    if REQUIRED:
        pytest.fail(f"SDFUNC_REQUIRE_MYSQL=1 but {why}")
    pytest.skip(why)


def _pymysql():
    if REQUIRED:
        try:
            import pymysql
        except ImportError as e:
            pytest.fail(f"SDFUNC_REQUIRE_MYSQL=1 but PyMySQL is not installed: {e}")
        return pymysql
    return pytest.importorskip("pymysql")


def _connect(pymysql, url: str):
    """A PyMySQL connection from a `mysql+pymysql://user:pw@host:port/db?charset=...` URL."""
    u = urlsplit(url)
    assert u.scheme == "mysql+pymysql"
    return pymysql.connect(host=u.hostname, port=u.port, user=unquote(u.username or ""),
                           password=unquote(u.password or ""), database=u.path.lstrip("/") or None,
                           charset=parse_qs(u.query)["charset"][0], connect_timeout=10)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_mariadb_starts_serves_and_stops():
    _require_server()
    pymysql = _pymysql()

    with MariaDB() as db:
        assert db.running
        port, base = db.port, db.base_dir
        assert db.url == f"mysql+pymysql://sdfunc:{db.password}@127.0.0.1:{port}/sdfunc?charset=utf8mb4"

        with _connect(pymysql, db.url) as conn, conn.cursor() as cur:
            cur.execute("SELECT VERSION(), DATABASE(), @@character_set_database")
            version, database, charset = cur.fetchone()
            assert "MariaDB" in version
            assert (database, charset) == ("sdfunc", "utf8mb4")
            cur.execute("CREATE TABLE t (id INT PRIMARY KEY, s VARCHAR(20))")
            cur.execute("INSERT INTO t VALUES (1, %s)", ("\N{ARTIST PALETTE} ok",))
            conn.commit()
            cur.execute("SELECT s FROM t")
            assert cur.fetchone() == ("\N{ARTIST PALETTE} ok",)

        second = db.create_database("second")
        assert second == db.url_for("second")
        with _connect(pymysql, second) as conn, conn.cursor() as cur:
            cur.execute("SELECT DATABASE()")
            assert cur.fetchone() == ("second",)
            cur.execute("SHOW TABLES")
            assert cur.fetchall() == ()  # isolated: not the tables of `sdfunc`
        with pytest.raises(RuntimeError, match="database exists"):
            db.create_database("second")
        with pytest.raises(ValueError):
            db.create_database("x; DROP DATABASE sdfunc")

        with _connect(pymysql, db.root_url) as conn, conn.cursor() as cur:
            cur.execute("SELECT CURRENT_USER()")
            assert cur.fetchone() == ("root@127.0.0.1",)

    assert not db.running
    assert not base.exists()
    assert not _port_open(port)
    db.stop()  # idempotent
