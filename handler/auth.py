"""Who is calling: auth modes, consumers and their API keys.

Modes (settings `auth.mode`):
- `none` (local default): every caller is the consumer `anonymous`, an admin; `alwayson_scripts.uid` may name
  another consumer (unless `auth.allow_uid` is off).
- `basic`: HTTP Basic, as A1111's `--api-auth`: `user:password` pairs from the settings (the user is the
  consumer), or a consumer id with its API key as the password.
- `token`: the `Authorization` header carries a token, bare (as PAI-EAS sends it) or after `Bearer `: a
  service token from the settings (a trusted gateway: consumer `service`, admin, may name consumers by uid)
  or a consumer's API key.
API keys live in the `consumers` table as SHA-256 hashes (they are random 256-bit strings, so an unsalted hash
is enough); every secret is compared in constant time. Wrong or missing credentials -> 401 (with
`WWW-Authenticate`); a disabled consumer -> 403.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from handler.db import Database, consumers, utcnow
from handler.errors import Forbidden, InvalidRequest, Unauthorized
from handler.settings import CONSUMER_ID_PATTERN, AuthSettings

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
class Caller:
    """An authenticated caller. `may_name_consumer`: `alwayson_scripts.uid` may choose the consumer."""

    consumer: str
    admin: bool
    via: str  # none | basic | token | key
    may_name_consumer: bool


@dataclass(frozen=True)
class Consumer:
    id: str
    admin: bool
    disabled: bool
    key_prefix: str | None
    created_at: dt.datetime


class Consumers:
    """The `consumers` table."""

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


class Authenticator:
    """Turns an `Authorization` header into a `Caller` (or a 401 / 403), and `alwayson_scripts.uid` into the
    consumer a generation is charged to."""

    def __init__(self, settings: AuthSettings, consumers: Consumers | None) -> None:
        self.settings = settings
        self.consumers = consumers
        self._users = [(user, hash_secret(f"{user}:{password}"))
                       for user, _, password in (item.partition(":") for item in settings.users)]
        self._tokens = [hash_secret(token) for token in settings.tokens]

    def challenge(self, *, script: bool = False) -> str:
        """The WWW-Authenticate value. A script's request (the web page's, marked `X-Requested-With:
        XMLHttpRequest`) gets `xBasic`: a browser would answer `Basic` with its own login dialog."""
        scheme = "Bearer" if self.settings.mode == "token" else "xBasic" if script else "Basic"
        return f'{scheme} realm="{self.settings.realm}", charset="UTF-8"'

    def authenticate(self, authorization: str | None, *, script: bool = False) -> Caller:
        """The caller, or Unauthorized (401 with the challenge) / Forbidden (403, disabled consumer)."""
        mode = self.settings.mode
        if mode == "none":
            return Caller(ANONYMOUS, admin=True, via="none", may_name_consumer=self.settings.allow_uid)
        try:
            return self._basic(authorization) if mode == "basic" else self._token(authorization)
        except Unauthorized as exc:
            exc.headers["WWW-Authenticate"] = self.challenge(script=script)
            raise

    def _unauthorized(self, message: str) -> Unauthorized:
        return Unauthorized(message, headers={"WWW-Authenticate": self.challenge()})

    def _basic(self, authorization: str | None) -> Caller:
        scheme, _, value = (authorization or "").strip().partition(" ")
        if scheme.lower() != "basic" or not value:
            raise self._unauthorized("HTTP Basic credentials required")
        try:
            user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise self._unauthorized("malformed Basic credentials") from None
        if not sep:
            raise self._unauthorized("malformed Basic credentials")
        digest = hash_secret(f"{user}:{password}")
        matched = None
        for name, expected in self._users:  # every entry is compared: the time does not tell which matched
            if hmac.compare_digest(digest, expected):
                matched = name
        if matched is not None:
            return self._caller(matched, via="basic", stored=self._stored(matched))
        found = self.consumers.by_key(password) if self.consumers is not None and password.startswith(KEY_PREFIX) else None
        if found is not None and hmac.compare_digest(found.id.encode(), user.encode()):
            return self._caller(found.id, via="key", stored=found)
        raise self._unauthorized("wrong user name or password")

    def _token(self, authorization: str | None) -> Caller:
        value = (authorization or "").strip()
        if value[:7].lower() == "bearer ":
            value = value[7:].strip()
        if not value:
            raise self._unauthorized("a token is required in the Authorization header")
        digest = hash_secret(value)
        service = False
        for expected in self._tokens:
            service |= hmac.compare_digest(digest, expected)
        if service:
            return Caller(SERVICE, admin=True, via="token", may_name_consumer=self.settings.allow_uid)
        found = self.consumers.by_key(value) if self.consumers is not None and value.startswith(KEY_PREFIX) else None
        if found is not None:
            return self._caller(found.id, via="key", stored=found)
        raise self._unauthorized("invalid token")

    def _stored(self, consumer: str) -> Consumer | None:
        return self.consumers.get(consumer) if self.consumers is not None else None

    def _caller(self, consumer: str, *, via: str, stored: Consumer | None) -> Caller:
        """The caller, refused (403) if its consumer row is disabled; admin by setting or by its row."""
        if stored is not None and stored.disabled:
            raise Forbidden(f"consumer {consumer!r} is disabled")
        admin = consumer in self.settings.admins or (stored is not None and stored.admin)
        return Caller(consumer, admin=admin, via=via, may_name_consumer=admin and self.settings.allow_uid)

    def consumer_for(self, caller: Caller, uid: str | None) -> str:
        """The consumer a generation is charged to: `uid` when given and the caller may name consumers,
        else the caller. Naming another consumer without that right is a 403; with `allow_uid` off, uid is
        ignored."""
        if not uid or uid == caller.consumer or not self.settings.allow_uid:
            return caller.consumer
        if not caller.may_name_consumer:
            raise Forbidden("alwayson_scripts.uid: this caller may not act for another consumer",
                            field="alwayson_scripts.uid")
        check_consumer_id(uid, field="alwayson_scripts.uid")
        stored = self._stored(uid)
        if stored is not None and stored.disabled:
            raise Forbidden(f"consumer {uid!r} is disabled", field="alwayson_scripts.uid")
        return uid
