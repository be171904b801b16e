"""The records database: tables, engine, and schema migrations.

SQLAlchemy 2 Core. The embedded default is an SQLite file under the data root (WAL, synchronous=FULL, foreign
keys on); production uses MySQL / MariaDB (RDS, PyMySQL) or PostgreSQL by URL. The schema is created and
upgraded by the Alembic migrations in handler/records/migrations, once per process, on first use (`ready()`), under a
database lock on MySQL and PostgreSQL so that instances starting together do not race. Any failure to reach
the database surfaces as `DatabaseUnavailable` (503): nothing was committed, so the caller is not charged; except
a connection lost during a COMMIT, which may have landed: `CommitUnacknowledged` (the ledger reads back whether it
did, handler.records.ledger).

Tables:
- `consumers`: who may call (API keys stored as SHA-256 hashes), admin and disabled flags.
- `ledger`: one row per (consumer, request id): what ran, billed time, price, amount (integer nano-units),
  status succeeded | failed, timestamps. Unique, so a retried request id is never charged twice. `attempt_id` is
  unique to the attempt that wrote the row: it tells this attempt's commit from another's for the same id.
- `generated_images`: one row per image, the RDS plugin's columns plus request id, consumer, image_url.
- `tasks`: asynchronous generations (handler/records/tasks.py; run by handler/runtime/tasks.py): request, status,
  result, and the heartbeat that tells a live worker's task from a dead one's.
- `queue_inputs`, `queue_sink`, `queue_locks`: the PAI-EAS queue service's indexes of tasks and the lock that keeps
  sink entries in index order (handler/records/queue.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError

from handler.errors import CommitUnacknowledged, DatabaseUnavailable

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_MYSQL = ("mysql", "mariadb")

# Portable column types: MySQL's TEXT holds 64 KB, too little for a 20k-character prompt or a PNG's base64;
# MySQL's DATETIME keeps whole seconds unless given a precision.
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), *_MYSQL)
MediumText = Text().with_variant(mysql.MEDIUMTEXT(), *_MYSQL)
LongText = Text().with_variant(mysql.LONGTEXT(), *_MYSQL)
Id = BigInteger().with_variant(Integer(), "sqlite")  # SQLite auto-increments INTEGER PRIMARY KEY only

metadata = MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})
_mysql_opts = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mariadb_engine": "InnoDB",
               "mariadb_charset": "utf8mb4"}

consumers = Table(
    "consumers", metadata,
    Column("id", String(64), primary_key=True),
    Column("key_hash", String(64), nullable=True, unique=True),
    Column("key_prefix", String(16), nullable=True),
    Column("admin", Boolean, nullable=False, default=False),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created_at", Timestamp, nullable=False),
    **_mysql_opts,
)

ledger = Table(
    "ledger", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("request_id", String(128), nullable=False),
    Column("consumer", String(64), nullable=False),
    Column("status", String(16), nullable=False),  # succeeded | failed
    Column("http_status", Integer, nullable=True),
    Column("error", String(64), nullable=True),
    Column("invocation_id", String(128), nullable=True),  # the x-fc-request-id of the attempt that wrote the row
    Column("instance_id", String(128), nullable=True),
    Column("mode", String(16), nullable=True),
    Column("checkpoint", String(255), nullable=True),
    Column("width", Integer, nullable=True),
    Column("height", Integer, nullable=True),
    Column("steps", Integer, nullable=True),
    Column("images", Integer, nullable=False, default=0),
    Column("device", String(128), nullable=True),
    Column("queue_wait_ms", Float, nullable=True),
    Column("model_load_ms", Float, nullable=True),
    Column("generation_ms", Float, nullable=True),
    Column("encode_ms", Float, nullable=True),
    Column("total_ms", Float, nullable=True),
    Column("billed_ms", BigInteger, nullable=False, default=0),
    Column("price_per_second", String(32), nullable=False, default="0"),
    Column("currency", String(8), nullable=False),
    Column("amount_nanos", BigInteger, nullable=False, default=0),
    Column("attempts", Integer, nullable=False, default=1),
    Column("started_at", Timestamp, nullable=False),
    Column("finished_at", Timestamp, nullable=False),
    Column("attempt_id", String(32), nullable=True),  # the writing attempt's own id (RequestMeter.attempt_id)
    UniqueConstraint("consumer", "request_id"),
    Index(None, "finished_at"),
    **_mysql_opts,
)

generated_images = Table(
    "generated_images", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("request_id", String(128), nullable=False),
    Column("consumer", String(64), nullable=False),
    Column("prompt", MediumText, nullable=False),
    Column("negative_prompt", MediumText, nullable=False),
    Column("steps", Integer, nullable=False),
    Column("seed", BigInteger, nullable=False),
    Column("sampler", String(64), nullable=False),
    Column("cfg_scale", Float, nullable=False),
    Column("size", String(16), nullable=False),  # "512x512"
    Column("model_hash", String(64), nullable=True),
    Column("model", String(255), nullable=True),
    Column("image_base64", LongText, nullable=True),
    Column("image_url", String(1024), nullable=True),
    Column("created_at", Timestamp, nullable=False),
    ForeignKeyConstraint(["consumer", "request_id"], ["ledger.consumer", "ledger.request_id"], ondelete="CASCADE"),
    Index(None, "consumer", "created_at"),
    Index(None, "request_id"),
    **_mysql_opts,
)


tasks = Table(
    "tasks", metadata,
    Column("id", String(32), primary_key=True),
    Column("consumer", String(64), nullable=False),
    Column("request_id", String(128), nullable=False),  # the ledger's id for the generation
    Column("mode", String(16), nullable=False),
    Column("tag", String(128), nullable=True),  # the client's task_id query parameter (EAS)
    Column("status", String(16), nullable=False),  # queued | running | succeeded | failed
    Column("request_json", LongText, nullable=False),
    Column("result_json", LongText, nullable=True),
    Column("error", Text, nullable=True),
    Column("callback_url", String(2048), nullable=True),
    Column("callback_status", String(64), nullable=True),
    Column("deliveries", Integer, nullable=False, default=0),
    Column("runner", String(64), nullable=True),  # the worker process that holds it
    Column("created_at", Timestamp, nullable=False),
    Column("started_at", Timestamp, nullable=True),
    Column("finished_at", Timestamp, nullable=True),
    Column("heartbeat_at", Timestamp, nullable=False),
    Column("queue", String(255), nullable=True),  # the PAI-EAS input queue it was put on ("<service>/<path>")
    Column("tags_json", Text, nullable=True),  # that put's tags (its query parameters), a JSON object
    Column("progress_json", Text, nullable=True),  # where its run is (handler.runtime.progress), while running
    UniqueConstraint("consumer", "request_id"),
    Index(None, "status", "heartbeat_at"),
    Index(None, "status", "runner", "created_at"),
    **_mysql_opts,
)

# The PAI-EAS queue service (handler/records/queue.py): the index a put got, and a finished queued task's place in
# its service's sink with whether a watcher committed it. Both indexes only grow (one counter per table).
queue_inputs = Table(
    "queue_inputs", metadata,
    Column("idx", Id, primary_key=True, autoincrement=True),
    Column("task_id", String(32), nullable=False, unique=True),
    Column("queue", String(255), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    ForeignKeyConstraint(["task_id"], ["tasks.id"], ondelete="CASCADE"),
    **_mysql_opts,
)

queue_sink = Table(
    "queue_sink", metadata,
    Column("idx", Id, primary_key=True, autoincrement=True),
    Column("task_id", String(32), nullable=False, unique=True),
    Column("queue", String(255), nullable=False),  # "<service>/sink"
    Column("consumer", String(64), nullable=False),
    Column("committed", Boolean, nullable=False, default=False),
    Column("created_at", Timestamp, nullable=False),
    ForeignKeyConstraint(["task_id"], ["tasks.id"], ondelete="CASCADE"),
    Index(None, "queue", "committed", "idx"),
    **_mysql_opts,
)

# One row per lock (migration 0003 writes `sink`): a transaction that adds a sink entry first updates the `sink`
# row, so sink entries become visible in the order of their indexes (the row lock is held until commit).
queue_locks = Table(
    "queue_locks", metadata,
    Column("name", String(32), primary_key=True),
    Column("taken", BigInteger, nullable=False),
    **_mysql_opts,
)


def utcnow() -> dt.datetime:
    """Naive UTC with microseconds: what every timestamp column holds."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def iso_utc(value: dt.datetime | None) -> str | None:
    """A stored (naive UTC) timestamp as ISO 8601 with a Z, for API responses."""
    return None if value is None else value.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def redact(url: str) -> str:
    """The URL with its password hidden, for logs and errors."""
    return make_url(url).render_as_string(hide_password=True)


class Database:
    """One engine per process. `ready()` migrates the schema once; `begin()` is a transaction that commits on
    exit; connection failures inside either become `DatabaseUnavailable` (nothing was committed), or
    `CommitUnacknowledged` when the connection was lost during `begin()`'s COMMIT (it may have landed)."""

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        kwargs: dict[str, Any] = {}
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        else:  # a server may have dropped an idle pooled connection: test each one before use
            kwargs.update(pool_pre_ping=True, pool_recycle=1800)
            if self.dialect in _MYSQL:
                kwargs["connect_args"] = {"connect_timeout": 5}
        self.engine: Engine = create_engine(url, **kwargs)
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._ready = False
        self._ready_lock = threading.Lock()

    def ready(self) -> None:
        """Create or upgrade the schema on first use (idempotent, cheap afterwards)."""
        if self._ready:
            return
        with self._ready_lock:
            if self._ready:
                return
            with self._errors("migrate"):
                migrate(self.engine)
            self._ready = True

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction on a pooled connection: committed when the block ends, rolled back if it raises. The
        database unavailable before the COMMIT: `DatabaseUnavailable`; during it: `CommitUnacknowledged`."""
        self.ready()
        committing = False
        try:
            with self.engine.connect() as conn, conn.begin():
                yield conn
                committing = True  # the block is done: leaving `conn.begin()` sends the COMMIT
        except DBAPIError as exc:
            if not is_unavailable(exc):
                raise
            self._log_unavailable(exc, "commit" if committing else "write")
            if committing:
                raise CommitUnacknowledged(
                    "the records database went away while committing, so whether this was saved is unknown; retry "
                    "shortly", headers={"Retry-After": "5"}) from exc
            raise unavailable() from exc

    @contextlib.contextmanager
    def connect(self) -> Iterator[Connection]:
        """A connection for reads."""
        self.ready()
        with self._errors("read"), self.engine.connect() as conn:
            yield conn

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except DBAPIError as exc:
            if not is_unavailable(exc):
                raise
            self._log_unavailable(exc, what)
            raise unavailable() from exc

    def _log_unavailable(self, exc: DBAPIError, what: str) -> None:
        log.error("records database %s unavailable during %s: %s", redact(self.url), what,
                  str(exc.orig or exc)[:200])

    def dispose(self) -> None:
        """Close pooled connections (pre-stop)."""
        self.engine.dispose()


def unavailable() -> DatabaseUnavailable:
    """The 503 of a request the database failed before anything of it was committed: it is not charged."""
    return DatabaseUnavailable("the records database is unavailable, so this request was not charged; retry "
                               "shortly (with the same Idempotency-Key it is never charged twice)",
                               headers={"Retry-After": "5"})


# MySQL / MariaDB error numbers that mean "not now": a closed connection (PyMySQL's 0), cannot connect (2002, 2003), connection lost (2006, 2013,
# 2055), too many connections (1040), server shutting down (1053), lock wait timeout (1205), deadlock (1213),
# read-only / failover (1290, 1836).
_MYSQL_UNAVAILABLE = {0, 1040, 1053, 1205, 1213, 1290, 1836, 2002, 2003, 2006, 2013, 2055}
_SQLITE_UNAVAILABLE = ("database is locked", "unable to open database file", "disk i/o error", "database or disk is full")


def is_unavailable(exc: DBAPIError) -> bool:
    """True when the database could not do the work now (connection, lock, failover), False for errors a retry
    will not fix (a schema or data problem: those are bugs, answered 500)."""
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):  # PyMySQL: (errno, message)
        return args[0] in _MYSQL_UNAVAILABLE
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(sqlstate, str):  # PostgreSQL: class 08 connection exception, 57P0x shutdown, 40xxx retry
        return sqlstate.startswith(("08", "57P", "40"))
    message = str(orig).lower()
    return any(text in message for text in _SQLITE_UNAVAILABLE) or type(orig).__name__ == "InterfaceError"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cur.execute("PRAGMA synchronous=FULL")  # a committed charge survives power loss, not only a crash
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def alembic_config(connection: Connection | None = None) -> Any:
    """An Alembic config for handler/records/migrations, bound to `connection` when given."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema to `revision`, holding a database-wide lock where the database has one."""
    from alembic import command

    with engine.connect() as conn, _migration_lock(conn, conn.dialect.name):
        before = current_revision(conn)
        command.upgrade(alembic_config(conn), revision)
        conn.commit()
        after = current_revision(conn)
    if before != after:
        log.info("records database %s: schema %s -> %s", redact(str(engine.url)), before or "empty", after)


def current_revision(conn: Connection) -> str | None:
    """The schema revision the database is at (None: no schema yet)."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


@contextlib.contextmanager
def _migration_lock(conn: Connection, dialect: str) -> Iterator[None]:
    if dialect in _MYSQL:
        got = conn.execute(text("SELECT GET_LOCK('sdfunc_migrations', 120)")).scalar()
        if got != 1:
            raise RuntimeError("could not take the migration lock within 120 s")
        try:
            yield
        finally:
            conn.execute(text("SELECT RELEASE_LOCK('sdfunc_migrations')"))
    elif dialect == "postgresql":
        # Held by the migration's own transaction: released by its commit or rollback, even when it fails.
        conn.execute(text("SET LOCAL lock_timeout = '120s'"))
        conn.execute(text("SELECT pg_advisory_xact_lock(7412093)"))
        yield
    else:
        yield


