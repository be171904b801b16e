"""Outbound HTTP(S) for URLs that clients give us (img2img `image_link`, model downloads, task callbacks),
safe against server-side request forgery.

Contract:
- Only http and https. The host is resolved once; if any address it resolves to is loopback, private
  (RFC 1918, fc00::/7), CGNAT (100.64/10), link-local, multicast, reserved, unspecified, otherwise not
  global, or a cloud metadata address (also inside IPv4-mapped, 6to4, Teredo and NAT64 IPv6 forms), the URL is
  refused, unless `network.allow_hosts` names the host or a CIDR holding every such address. Metadata
  addresses are reachable only through a CIDR that contains them, never through a host name.
- The connection goes to the address that was checked, never to a second resolution, so DNS rebinding cannot
  swap it; the Host header, TLS SNI and certificate verification still use the host name.
- Redirects are followed up to `network.max_redirects`, each hop checked the same way.
- The name lookup waits at most `timeout_seconds` (and not past the transfer's deadline), on a small pool of
  resolver threads, so a slow DNS server cannot hold a request. Each connect and read waits at most
  `timeout_seconds`; a whole transfer ends at its deadline. Bodies above
  `max_bytes` are refused from Content-Length, else when the limit is crossed.
- Environment proxies are not used. Failures raise `FetchRefused` (policy) or `FetchFailed` (network,
  upstream): both carry a short reason that is safe to show and name no address the client did not give.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import (
    ConnectTimeoutError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from handler import __version__
from handler.errors import InvalidRequest
from handler.settings import NetworkSettings

log = logging.getLogger(__name__)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA_ADDRESSES: frozenset[Address] = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack...
    "169.254.170.2",  # AWS ECS task metadata
    "100.100.100.200",  # Alibaba Cloud
    "fd00:ec2::254",  # AWS over IPv6
))
_RESOLVER = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="sdfunc-dns")


def resolve(host: str, port: int, timeout: float) -> list[tuple[Any, ...]]:
    """`socket.getaddrinfo` for TCP, waiting at most `timeout` seconds; FetchFailed when the name does not
    resolve in time. A lookup that hangs keeps one of the pool's threads until the system resolver gives up;
    while all are held, lookups wait in the pool's queue, still bounded by `timeout`."""
    future = _RESOLVER.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    try:
        return future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise FetchFailed(f"the host {host} did not resolve within {timeout:g} s") from None
    except (socket.gaierror, UnicodeError, OSError):
        raise FetchFailed(f"the host {host} does not resolve") from None


_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 1024 * 1024
USER_AGENT = f"sdfunc/{__version__}"


class FetchError(InvalidRequest):
    """A URL could not be fetched; `reason` is safe to show. Unhandled, it renders as a 422."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def for_field(self, field: str) -> InvalidRequest:
        """The 422 to give a client for the request field that carried the URL."""
        return InvalidRequest(f"{field}: {self.reason}", field=field)


class FetchRefused(FetchError):
    """Refused by policy: scheme, address, size, redirects."""


class FetchFailed(FetchError):
    """The network or the upstream server failed: unreachable, timeout, error status, broken body."""


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 transition form carries (mapped, 6to4, Teredo, NAT64), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_problem(address: Address) -> str | None:
    """Why `address` may not be reached without an allow-list entry, or None for a public address."""
    candidates: list[Address] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None:
            candidates.insert(0, inner)  # the IPv4 address it carries names the problem best
    for a in candidates:
        if a in METADATA_ADDRESSES:
            return "a cloud metadata address"
        for test, name in ((a.is_loopback, "loopback"), (a.is_link_local, "link-local"),
                           (a.is_multicast, "multicast"), (a.is_unspecified, "unspecified"),
                           (a in _CGNAT, "shared (CGNAT)"), (a.is_reserved, "reserved"), (a.is_private, "private"),
                           (isinstance(a, ipaddress.IPv6Address) and a.is_site_local, "site-local")):
            if test:
                return f"a {name} address"
        if not a.is_global:
            return "a non-public address"
    return None


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (the vetted addresses, in resolver order) and what to call the host."""

    url: str
    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[tuple[int, Any], ...]  # (family, sockaddr) from the one resolution


class _Pinned:
    """Mixin for urllib3 connections: connect to the vetted socket addresses instead of resolving the host."""

    def __init__(self, *args: Any, pinned: tuple[tuple[int, Any], ...], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pinned = pinned

    def _new_conn(self) -> socket.socket:
        timeout = self.timeout if isinstance(self.timeout, (int, float)) else None
        error: OSError | None = None
        for family, sockaddr in self._pinned:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(sockaddr)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except TimeoutError as exc:
                sock.close()
                raise ConnectTimeoutError(self, f"connect timeout ({exc})") from exc
            except OSError as exc:
                sock.close()
                error = exc
        raise NewConnectionError(self, f"Failed to establish a new connection: {error}")


class _PinnedHTTPConnection(_Pinned, HTTPConnection):
    pass


class _PinnedHTTPSConnection(_Pinned, HTTPSConnection):
    pass


class Guard:
    """The fetcher for one policy. `allow_private` (task callbacks' `callback_allow_private`) lets every
    non-public address through except metadata addresses; `schemes` are the URL schemes accepted, on the
    first URL and on every redirect."""

    def __init__(self, settings: NetworkSettings, *, allow_private: bool = False,
                 schemes: tuple[str, ...] = ("http", "https")) -> None:
        self.settings = settings
        self.allow_private = allow_private
        self.schemes = schemes
        self._names: set[str] = set()
        self._suffixes: list[str] = []
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in settings.allow_hosts:
            try:
                self._networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if entry.startswith("*."):
                    self._suffixes.append(entry[1:])
                else:
                    self._names.add(entry)

    # checking -------------------------------------------------------------------------------------------
    def _host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return host in self._names or any(host.endswith(s) for s in self._suffixes)

    def _in_networks(self, address: Address) -> bool:
        forms: list[Address] = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            forms.append(address.ipv4_mapped)
        return any(a.version == n.version and a in n for a in forms for n in self._networks)

    def check(self, url: str, *, deadline: float | None = None) -> Target:
        """Parse and resolve `url` once and vet every address; FetchRefused / FetchFailed otherwise."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise FetchRefused("not a valid URL") from None
        scheme = parts.scheme.lower()
        if scheme not in self.schemes or not parts.hostname:
            raise FetchRefused(f"an {' or '.join(self.schemes)} URL is required")
        if parts.username is not None or parts.password is not None:
            raise FetchRefused("credentials in the URL are not accepted")
        host = parts.hostname
        port = port or (443 if scheme == "https" else 80)
        wait = self.settings.timeout_seconds
        if deadline is not None:
            wait = max(0.0, min(wait, deadline - time.monotonic()))
        infos = resolve(host, port, wait)
        if not infos:
            raise FetchFailed(f"the host {host} does not resolve")
        named = self._host_allowed(host)
        vetted: list[tuple[int, Any]] = []
        for family, _type, _proto, _name, sockaddr in infos:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            problem = address_problem(address)
            if problem is not None and not self._in_networks(address):
                metadata = problem == "a cloud metadata address"
                if metadata or not (named or self.allow_private):
                    raise FetchRefused(f"{host} resolves to {problem}; not allowed (network.allow_hosts)")
            if (family, sockaddr) not in vetted:
                vetted.append((family, sockaddr))
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return Target(url=url, scheme=scheme, host=host, port=port, path=path, addresses=tuple(vetted))

    # transport ------------------------------------------------------------------------------------------
    def _pool(self, target: Target, timeout: float) -> urllib3.HTTPConnectionPool:
        kwargs: dict[str, Any] = {"maxsize": 1, "retries": False, "pinned": target.addresses,
                                  "timeout": urllib3.Timeout(connect=timeout, read=timeout)}
        if target.scheme == "https":
            import certifi

            pool = urllib3.HTTPSConnectionPool(
                target.host, target.port, cert_reqs="CERT_REQUIRED",
                ca_certs=str(self.settings.ca_bundle or certifi.where()), **kwargs)
            pool.ConnectionCls = _PinnedHTTPSConnection
        else:
            pool = urllib3.HTTPConnectionPool(target.host, target.port, **kwargs)
            pool.ConnectionCls = _PinnedHTTPConnection
        return pool

    def _request(self, method: str, url: str, *, deadline: float, body: bytes | None = None,
                 headers: dict[str, str] | None = None, follow: bool = True) -> tuple[Any, Any]:
        """(response, pool) for the final hop, body not read yet; the caller closes both."""
        hops = 0
        while True:
            target = self.check(url)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FetchFailed("timed out")
            pool = self._pool(target, min(self.settings.timeout_seconds, remaining))
            send = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **(headers or {})}
            try:
                response = pool.urlopen(method, target.path, body=body, headers=send, redirect=False,
                                        retries=False, preload_content=False, release_conn=False,
                                        assert_same_host=False)
            except Exception as exc:  # noqa: BLE001 - every transport error becomes a safe reason
                pool.close()
                raise _failure(exc) from None
            location = response.headers.get("Location")
            if not follow or response.status not in _REDIRECTS or not location:
                return response, pool
            response.release_conn()
            pool.close()
            hops += 1
            if hops > self.settings.max_redirects:
                raise FetchRefused(f"more than {self.settings.max_redirects} redirects")
            url = urljoin(url, location)
            if method == "POST" and response.status in (301, 302, 303):
                method, body = "GET", None

    def _read(self, response: Any, *, deadline: float, max_bytes: int, sink: Callable[[bytes], None],
              progress: Callable[[int, int | None], None] | None) -> int:
        """Stream the body into `sink`, checking the limit and the deadline; the byte count."""
        if response.status >= 400:
            raise FetchFailed(f"the server answered HTTP {response.status}")
        if response.status >= 300:
            raise FetchFailed(f"the server answered HTTP {response.status} without a usable redirect")
        total: int | None = None
        length = response.headers.get("Content-Length")
        if length is not None:
            try:
                total = int(length)
            except ValueError:
                raise FetchFailed("the server sent an invalid Content-Length") from None

        def read() -> bytes:
            try:
                return response.read1(CHUNK, decode_content=False)  # what arrived: the deadline holds for trickles
            except Exception as exc:  # noqa: BLE001 - as above
                raise _failure(exc) from None

        return pump(read, total=total, max_bytes=max_bytes, deadline=deadline, sink=sink, progress=progress)

    # the three uses -------------------------------------------------------------------------------------
    def get_bytes(self, url: str, *, max_bytes: int, deadline_seconds: float) -> bytes:
        """GET `url` into memory (at most `max_bytes`)."""
        deadline = time.monotonic() + deadline_seconds
        parts: list[bytes] = []
        response, pool = self._request("GET", url, deadline=deadline)
        try:
            self._read(response, deadline=deadline, max_bytes=max_bytes, sink=parts.append, progress=None)
        finally:
            response.release_conn()
            pool.close()
        return b"".join(parts)

    def download(self, url: str, sink: BinaryIO, *, max_bytes: int, deadline_seconds: float,
                 progress: Callable[[int, int | None], None] | None = None) -> int:
        """GET `url` into the file object `sink`; `progress(done, total or None)` after each chunk. Returns
        the byte count; on failure `sink` holds a partial body the caller discards."""
        deadline = time.monotonic() + deadline_seconds
        response, pool = self._request("GET", url, deadline=deadline)
        try:
            return self._read(response, deadline=deadline, max_bytes=max_bytes, sink=sink.write, progress=progress)
        finally:
            response.release_conn()
            pool.close()

    def post_json(self, url: str, payload: Any, *, timeout: float) -> int:
        """POST `payload` as JSON without following redirects; the response status."""
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        deadline = time.monotonic() + timeout
        response, pool = self._request("POST", url, deadline=deadline, body=body, follow=False,
                                       headers={"Content-Type": "application/json"})
        try:
            with contextlib.suppress(Exception):  # the answer's body is not used: a broken one is no failure
                response.read(64 * 1024, decode_content=False)
        finally:
            response.release_conn()
            pool.close()
        return int(response.status)


def pump(read: Callable[[], bytes], *, total: int | None, max_bytes: int, deadline: float,
         sink: Callable[[bytes], None], progress: Callable[[int, int | None], None] | None = None) -> int:
    """Copy the chunks `read()` returns (b"" at the end) into `sink`, with `total` (the announced size, if
    any) and the bytes so far held to `max_bytes`, `deadline` (monotonic) checked per chunk, and `progress(done,
    total)` told; FetchRefused over the limit, FetchFailed on time-out or a body shorter than announced. The
    sink's own errors (a full disk) are the caller's, not a fetch failure. Returns the byte count."""
    if total is not None and total > max_bytes:
        raise FetchRefused(f"the file is {total} bytes, more than the limit of {max_bytes}")
    done = 0
    if progress is not None:
        progress(0, total)
    while chunk := read():
        done += len(chunk)
        if done > max_bytes:
            raise FetchRefused(f"the file is more than the limit of {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise FetchFailed("timed out")
        sink(chunk)
        if progress is not None:
            progress(done, total)
    if total is not None and done != total:
        raise FetchFailed("the connection closed before the whole body arrived")
    return done


def _failure(exc: Exception) -> FetchError:
    """A short, safe reason for a transport exception (the details go to the debug log)."""
    if isinstance(exc, FetchError):
        return exc
    log.debug("fetch failed: %r", exc)
    if isinstance(exc, NewConnectionError):  # before timeouts: urllib3 derives it from ConnectTimeoutError
        return FetchFailed("could not connect")
    if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError, TimeoutError, socket.timeout)):
        return FetchFailed("timed out")
    if isinstance(exc, SSLError):
        return FetchFailed("the TLS certificate could not be verified")
    if isinstance(exc, ProtocolError):
        return FetchFailed("the connection closed before the whole body arrived")
    return FetchFailed("the transfer failed")
