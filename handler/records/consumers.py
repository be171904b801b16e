"""The `consumers` table: who may be charged, their API keys and flags (authentication is handler.security.auth).

Contract:
- A consumer id is 1-64 characters of letters, digits and `. _ @ -`, starting with a letter or digit; the ids
  `anonymous`, `service` and `cli` are reserved (auth mode none, service tokens, the CLI) and cannot be added.
- An API key is `sdf_` + 256 random bits, shown once when it is made (`add`, `rotate`); the table keeps only its
  SHA-256 (the keys are random, so an unsalted hash is enough) and its first 12 characters (to tell keys apart),
  and `by_key` compares the stored hash in constant time.
- Rotating a key makes the old one fail at once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from handler.errors import InvalidRequest
from handler.records.db import Database, consumers, utcnow
from handler.settings import CONSUMER_ID_PATTERN

ANONYMOUS = "anonymous"  # every caller in mode none
SERVICE = "service"  # a service-token holder that names no consumer
RESERVED = (ANONYMOUS, SERVICE, "cli")
KEY_PREFIX = "sdf_"
CONSUMER_ID = re.compile(CONSUMER_ID_PATTERN)


def hash_secret(secret: str) -> str:
    """Hex SHA-256 of a secret: what the consumers table keeps of an API key."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh API key: `sdf_` + 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def check_consumer_id(value: str, field: str = "consumer") -> str:
    """`value` if it is a valid consumer id, else a 422 naming `field`."""
    if not CONSUMER_ID.match(value):
        raise InvalidRequest(f"{field}: a consumer id is 1-64 characters of letters, digits and . _ @ -, "
                             "starting with a letter or digit", field=field)
    return value


@dataclass(frozen=True)
class Consumer:
    """A row of the table, without its key hash."""

    id: str
    admin: bool
    disabled: bool
    key_prefix: str | None
    created_at: dt.datetime


class Consumers:
    """The `consumers` table. Unknown ids: `get` and `by_key` answer None, the updates raise KeyError."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self, consumer_id: str) -> Consumer | None:
        with self.db.connect() as conn:
            row = conn.execute(select(consumers).where(consumers.c.id == consumer_id)).first()
        return _consumer(row)

    def by_key(self, key: str) -> Consumer | None:
        """The consumer whose API key this is (the lookup is by hash; the hash is compared in constant time)."""
        digest = hash_secret(key)
        with self.db.connect() as conn:
            row = conn.execute(select(consumers).where(consumers.c.key_hash == digest)).first()
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            return None
        return _consumer(row)

    def list(self) -> list[Consumer]:
        with self.db.connect() as conn:
            return [_consumer(row) for row in conn.execute(select(consumers).order_by(consumers.c.id))]

    def add(self, consumer_id: str, *, admin: bool = False) -> str:
        """Create a consumer with a new API key and return the key (shown once; only its hash is kept)."""
        check_consumer_id(consumer_id)
        if consumer_id in RESERVED:
            raise ValueError(f"{consumer_id!r} is reserved (anonymous callers, service tokens, the CLI)")
        key = new_key()
        try:
            with self.db.begin() as conn:
                conn.execute(insert(consumers).values(id=consumer_id, key_hash=hash_secret(key),
                                                      key_prefix=key[:12], admin=admin, disabled=False,
                                                      created_at=utcnow()))
        except IntegrityError:
            raise ValueError(f"consumer {consumer_id!r} already exists") from None
        return key

    def rotate(self, consumer_id: str) -> str:
        """Replace the consumer's key; the old one stops working at once."""
        key = new_key()
        self._update(consumer_id, key_hash=hash_secret(key), key_prefix=key[:12])
        return key

    def set_disabled(self, consumer_id: str, disabled: bool) -> None:
        self._update(consumer_id, disabled=disabled)

    def set_admin(self, consumer_id: str, admin: bool) -> None:
        self._update(consumer_id, admin=admin)

    def _update(self, consumer_id: str, **values: Any) -> None:
        with self.db.begin() as conn:
            if conn.execute(update(consumers).where(consumers.c.id == consumer_id).values(**values)).rowcount != 1:
                raise KeyError(consumer_id)


def _consumer(row: Any) -> Consumer | None:
    if row is None:
        return None
    return Consumer(id=row.id, admin=bool(row.admin), disabled=bool(row.disabled), key_prefix=row.key_prefix,
                    created_at=row.created_at)
