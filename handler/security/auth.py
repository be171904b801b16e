"""Who is calling: auth modes, the caller's consumer, and the limit on failed attempts.

Modes (settings `auth.mode`):
- `none` (local default): every caller is the consumer `anonymous`, an admin; `alwayson_scripts.uid` may name
  another consumer (unless `auth.allow_uid` is off).
- `basic`: HTTP Basic, as A1111's `--api-auth`: `user:password` pairs from the settings (the user is the
  consumer), or a consumer id with its API key as the password.
- `token`: the `Authorization` header carries a token, bare (as PAI-EAS sends it) or after `Bearer `: a
  service token from the settings (a trusted gateway: consumer `service`, admin, may name consumers by uid)
  or a consumer's API key.
API keys live in the `consumers` table as SHA-256 hashes (handler.records.consumers); every secret is
compared in constant time. Wrong or missing credentials -> 401 (with `WWW-Authenticate`); a disabled
consumer -> 403.

Failed attempts are limited per client address (`FailureLimiter`): after `auth.max_failures` wrong credentials
within `auth.failure_window_seconds`, the address gets 429 `too_many_auth_failures` with Retry-After, its
credentials not even checked, until the oldest of those failures leaves the window. The address is the
connection's peer, or with `auth.trust_forwarded_for` the first X-Forwarded-For address (FC's trigger puts the
client there); IPv6 addresses count by their /64.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from flask import has_request_context, request

from handler.errors import Forbidden, TooManyAuthFailures, Unauthorized
from handler.records.consumers import (
    ANONYMOUS,
    KEY_PREFIX,
    SERVICE,
    Consumer,
    Consumers,
    check_consumer_id,
    hash_secret,
)
from handler.settings import AuthSettings

log = logging.getLogger(__name__)

MAX_TRACKED_CLIENTS = 10_000  # client addresses the failure limiter remembers (least recently failed dropped)


def client_address(peer: str | None, forwarded_for: str | None, *, trust_forwarded_for: bool) -> str:
    """The address failed attempts are counted by: `peer` (the connection's), or the first X-Forwarded-For
    address when the proxy in front is trusted to set it. An IPv6 address stands for its /64 (one client
    usually holds a whole /64); an IPv4-mapped one for its IPv4 address. Text that is no address is kept,
    cut to 64 characters, so that it is counted on its own."""
    value = (peer or "").strip()
    if trust_forwarded_for and forwarded_for and forwarded_for.split(",")[0].strip():
        value = forwarded_for.split(",")[0].strip()
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return value[:64] or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class FailureLimiter:
    """Failed authentication attempts per client address in a sliding window.

    Once an address has `max_failures` failures within `window_seconds`, `check` refuses it (429 with
    Retry-After) until the oldest of them leaves the window. Refused attempts are not counted, so a client
    that keeps knocking is not locked out for longer than the window. A success resets nothing: on a shared
    address (a NAT, a gateway) a caller with valid credentials of its own could otherwise clear the count
    between guesses at another's. At most `max_clients` addresses are remembered, the least recently failed
    dropped first, so memory stays bounded whatever the number of addresses. `max_failures` 0: no limit.
    Thread-safe."""

    def __init__(self, max_failures: int, window_seconds: float, *, max_clients: int = MAX_TRACKED_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window_seconds = window_seconds
        self.max_clients = max_clients
        self.clock = clock
        self._lock = threading.Lock()
        # address -> times of its last `max_failures` failures, oldest first; least recently failed address first
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._failures)

    def retry_after(self, client: str) -> float:
        """Seconds until `client` may try again; 0 when it may now."""
        if self.max_failures <= 0:
            return 0.0
        with self._lock:
            times = self._failures.get(client)
            if times is None or len(times) < self.max_failures:
                return 0.0
            return max(0.0, times[0] + self.window_seconds - self.clock())

    def check(self, client: str) -> None:
        """TooManyAuthFailures (429, Retry-After in whole seconds) while `client` is refused."""
        wait = self.retry_after(client)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise TooManyAuthFailures(f"too many failed authentication attempts from this address; retry in "
                                      f"{seconds} s", headers={"Retry-After": str(seconds)})

    def record(self, client: str) -> None:
        """Count one failed attempt by `client`."""
        if self.max_failures <= 0:
            return
        with self._lock:
            now = self.clock()
            times = self._failures.pop(client, None)
            if times is None:
                times = deque(maxlen=self.max_failures)
                while len(self._failures) >= self.max_clients:
                    self._failures.popitem(last=False)
            times.append(now)
            self._failures[client] = times
            blocked = len(times) == self.max_failures and now - times[0] < self.window_seconds
        if blocked:
            log.warning("%d failed authentication attempts from %s within %g s: refused for a while",
                        self.max_failures, client, self.window_seconds)


@dataclass(frozen=True)
class Caller:
    """An authenticated caller. `may_name_consumer`: `alwayson_scripts.uid` may choose the consumer."""

    consumer: str
    admin: bool
    via: str  # none | basic | token | key
    may_name_consumer: bool


class Authenticator:
    """Turns an `Authorization` header into a `Caller` (or a 401 / 403), and `alwayson_scripts.uid` into the
    consumer a generation is charged to."""

    def __init__(self, settings: AuthSettings, consumers: Consumers | None) -> None:
        self.settings = settings
        self.consumers = consumers
        self._users = [(user, hash_secret(f"{user}:{password}"))
                       for user, _, password in (item.partition(":") for item in settings.users)]
        self._tokens = [hash_secret(token) for token in settings.tokens]
        self.failures = FailureLimiter(settings.max_failures, settings.failure_window_seconds)

    def challenge(self, *, script: bool = False) -> str:
        """The WWW-Authenticate value. A script's request (the web page's, marked `X-Requested-With:
        XMLHttpRequest`) gets `xBasic`: a browser would answer `Basic` with its own login dialog."""
        scheme = "Bearer" if self.settings.mode == "token" else "xBasic" if script else "Basic"
        return f'{scheme} realm="{self.settings.realm}", charset="UTF-8"'

    def authenticate(self, authorization: str | None, *, script: bool = False) -> Caller:
        """The caller, or Unauthorized (401 with the challenge) / Forbidden (403, disabled consumer) /
        TooManyAuthFailures (429: the current request's client address failed too often; nothing is checked).
        Wrong credentials count as a failure of that address; a request that sends none does not (it guesses
        nothing). Outside a request (the CLI) nothing is counted."""
        mode = self.settings.mode
        if mode == "none":
            return Caller(ANONYMOUS, admin=True, via="none", may_name_consumer=self.settings.allow_uid)
        client = self.current_client()
        if client is not None:
            self.failures.check(client)
        try:
            return self._basic(authorization) if mode == "basic" else self._token(authorization)
        except Unauthorized as exc:
            if client is not None and (authorization or "").strip():
                self.failures.record(client)
            exc.headers["WWW-Authenticate"] = self.challenge(script=script)
            raise

    def current_client(self) -> str | None:
        """The current request's client address (`client_address`), or None outside a request."""
        if not has_request_context():
            return None
        return client_address(request.remote_addr, request.headers.get("X-Forwarded-For"),
                              trust_forwarded_for=self.settings.trust_forwarded_for)

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
