"""The outbound fetch guard (handler/security/netguard.py) against real loopback HTTP(S) servers: every refused address
class, allow-lists, redirects, limits, timeouts, and a connection pinned to the address that was checked."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

import pytest

from handler.security.netguard import FetchFailed, FetchRefused, Guard, address_problem
from handler.settings import NetworkSettings
from tests.support.loopback import LoopbackServer, resolving, self_signed


def guard(**values) -> Guard:
    allow_private = values.pop("allow_private", False)
    return Guard(NetworkSettings(**values), allow_private=allow_private)


def get(g: Guard, url: str, max_bytes: int = 1 << 20, deadline: float = 10) -> bytes:
    return g.get_bytes(url, max_bytes=max_bytes, deadline_seconds=deadline)


@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("10.1.2.3", "private"), ("172.16.5.4", "private"),
    ("192.168.1.1", "private"), ("100.64.0.1", "CGNAT"), ("100.127.255.254", "CGNAT"), ("169.254.1.1", "link-local"),
    ("169.254.169.254", "metadata"), ("169.254.170.2", "metadata"), ("100.100.100.200", "metadata"),
    ("224.0.0.1", "multicast"), ("240.0.0.1", "reserved"), ("0.0.0.0", "unspecified"),
    ("192.0.2.1", "private"), ("::1", "loopback"), ("fe80::1", "link-local"), ("fc00::1", "private"),
    ("fd12:3456::1", "private"), ("fd00:ec2::254", "metadata"), ("ff02::1", "multicast"), ("::", "unspecified"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"), ("::ffff:169.254.169.254", "metadata"),
    ("::ffff:100.100.100.200", "metadata"), ("2002:7f00:1::", "loopback"), ("64:ff9b::a9fe:a9fe", "metadata"),
    ("fec0::1", "site-local"),
])
def test_every_non_public_address_class_is_refused(monkeypatch, address, kind):
    assert kind in address_problem(ipaddress.ip_address(address))
    with resolving(monkeypatch, {"victim.test": [address]}), pytest.raises(FetchRefused) as err:
        guard().check("http://victim.test/x")
    assert "victim.test resolves to" in err.value.reason and kind in err.value.reason


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_pass(monkeypatch, address):
    assert address_problem(ipaddress.ip_address(address)) is None
    with resolving(monkeypatch, {"public.test": [address]}):
        target = guard().check("https://public.test/a/b?c=1")
    assert target.addresses[0][1][0] == address and target.path == "/a/b?c=1" and target.port == 443


def test_any_bad_address_among_several_refuses(monkeypatch):
    with resolving(monkeypatch, {"mixed.test": ["8.8.8.8", "10.0.0.5"]}), pytest.raises(FetchRefused, match="private"):
        guard().check("http://mixed.test/")


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "gopher://example.com/",
                                 "http:///nohost", "data:image/png;base64,AAAA", "http://user:pw@example.com/",
                                 "http://example.com:99999/"])
def test_other_schemes_and_malformed_urls_are_refused(url):
    with pytest.raises(FetchRefused):
        guard().check(url)


def test_unresolvable_host_fails(monkeypatch):
    def nope(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", nope)
    with pytest.raises(FetchFailed, match="does not resolve"):
        guard().check("http://nowhere.test/")


def test_a_slow_name_lookup_is_bounded(monkeypatch):
    """A DNS server that does not answer cannot hold the request past the network timeout or its deadline."""
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(10)
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    try:  # "within": it gave up before the lookup ended (which would say "does not resolve")
        with pytest.raises(FetchFailed, match="did not resolve within"):
            guard(timeout_seconds=0.3).check("http://slow.test/")
        with pytest.raises(FetchFailed, match="did not resolve within"):
            guard(timeout_seconds=30).check("http://slow.test/", deadline=time.monotonic() + 0.2)
    finally:
        release.set()


def test_allow_list_by_cidr_and_by_host_name(monkeypatch):
    with LoopbackServer({"/img": (200, {}, b"hello")}) as server:
        with pytest.raises(FetchRefused, match="loopback"):
            get(guard(), server.url("/img"))
        assert get(guard(allow_hosts="127.0.0.1/32"), server.url("/img")) == b"hello"
        assert get(guard(allow_hosts=["10.0.0.0/8", "127.0.0.0/8"]), server.url("/img")) == b"hello"
        with resolving(monkeypatch, {"files.test": ["127.0.0.1"], "a.corp.test": ["127.0.0.1"]}):
            assert get(guard(allow_hosts="files.test"), server.url("/img", "files.test")) == b"hello"
            assert get(guard(allow_hosts="*.corp.test"), server.url("/img", "a.corp.test")) == b"hello"
            with pytest.raises(FetchRefused):
                get(guard(allow_hosts="other.test"), server.url("/img", "files.test"))
        assert get(guard(allow_private=True), server.url("/img")) == b"hello"


def test_metadata_needs_a_cidr_naming_it(monkeypatch):
    with resolving(monkeypatch, {"meta.test": ["169.254.169.254"]}):
        for g in (guard(allow_hosts="meta.test"), guard(allow_private=True), guard(allow_hosts="10.0.0.0/8")):
            with pytest.raises(FetchRefused, match="metadata"):
                g.check("http://meta.test/latest/meta-data/")
        assert guard(allow_hosts="169.254.169.254/32").check("http://meta.test/").host == "meta.test"


def test_the_connection_goes_to_the_address_that_was_checked(monkeypatch):
    """DNS rebinding: the name resolves to an allowed address once, then to another. The fetch connects to
    the first (one lookup only), with the name in the Host header."""
    answers = iter([["127.0.0.1"]])
    with (LoopbackServer({"/who": (200, {}, b"pinned")}, host="127.0.0.1") as good,
          LoopbackServer({"/who": (200, {}, b"rebound")}, host="127.0.0.2", port=good.port) as evil,
          resolving(monkeypatch, {"rebind.test": lambda: next(answers, ["127.0.0.2"])}) as lookups):
        g = guard(allow_hosts="127.0.0.1/32")
        assert get(g, good.url("/who", "rebind.test")) == b"pinned"
        assert lookups == ["rebind.test"]
        assert good.requests[-1]["headers"]["Host"] == f"rebind.test:{good.port}"
        assert evil.requests == []
        with pytest.raises(FetchRefused, match="loopback"):  # the next lookup gives the other address
            get(g, good.url("/who", "rebind.test"))


def test_redirects_are_checked_at_every_hop(monkeypatch):
    with LoopbackServer() as server:
        server.routes.update({
            "/ok": (200, {}, b"final"),
            "/hop": (302, {"Location": "/ok"}, b""),
            "/private": (302, {"Location": f"http://127.0.0.2:{server.port}/ok"}, b""),
            "/meta": (307, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
            "/loop": (301, {"Location": "/loop"}, b""),
        })
        g = guard(allow_hosts="127.0.0.1/32", max_redirects=3)
        assert get(g, server.url("/hop")) == b"final"
        with pytest.raises(FetchRefused, match="127.0.0.2 resolves to a loopback"):
            get(g, server.url("/private"))
        with pytest.raises(FetchRefused, match="metadata"):
            get(g, server.url("/meta"))
        with pytest.raises(FetchRefused, match="more than 3 redirects"):
            get(g, server.url("/loop"))
        with pytest.raises(FetchRefused, match="more than 0 redirects"):
            get(guard(allow_hosts="127.0.0.1/32", max_redirects=0), server.url("/hop"))


def test_an_https_only_guard_refuses_http_on_every_hop(monkeypatch, tmp_path):
    """Model downloads are https only (unless downloads.allow_http): a redirect must not step down to http."""
    pytest.importorskip("cryptography")
    ca, context = self_signed(tmp_path, "secure.test")
    https_only = Guard(NetworkSettings(allow_hosts="127.0.0.1/32", ca_bundle=ca), schemes=("https",))
    with pytest.raises(FetchRefused, match="an https URL is required"):
        https_only.check("http://127.0.0.1:1/model.safetensors")
    with (LoopbackServer(tls=context) as server, resolving(monkeypatch, {"secure.test": ["127.0.0.1"]})):
        server.routes.update({"/ok": (200, {}, b"weights"),
                              "/same": (302, {"Location": "/ok"}, b""),
                              "/down": (302, {"Location": "http://secure.test:1/ok"}, b"")})
        assert https_only.get_bytes(server.url("/same", "secure.test"), max_bytes=1024, deadline_seconds=10) == b"weights"
        with pytest.raises(FetchRefused, match="an https URL is required"):
            https_only.get_bytes(server.url("/down", "secure.test"), max_bytes=1024, deadline_seconds=10)


def test_size_limits(tmp_path):
    def unsized(handler):  # no Content-Length: the limit is found while reading
        handler.send_response(200)
        handler.send_header("Connection", "close")
        handler.end_headers()
        for _ in range(64):
            handler.wfile.write(b"x" * 1024)

    with LoopbackServer({"/big": (200, {}, b"x" * 4096), "/unsized": unsized}) as server:
        g = guard(allow_hosts="127.0.0.1/32")
        assert len(get(g, server.url("/big"), max_bytes=4096)) == 4096
        with pytest.raises(FetchRefused, match="4096 bytes, more than the limit of 4095"):
            get(g, server.url("/big"), max_bytes=4095)
        with pytest.raises(FetchRefused, match="more than the limit of 10000"):
            get(g, server.url("/unsized"), max_bytes=10_000)
        seen = []
        with open(tmp_path / "out", "wb") as fh:
            n = g.download(server.url("/unsized"), fh, max_bytes=1 << 20, deadline_seconds=10,
                           progress=lambda done, total: seen.append((done, total)))
        assert n == 64 * 1024 and (tmp_path / "out").stat().st_size == n and seen[0] == (0, None)
        assert seen[-1] == (n, None)


def test_timeouts_and_the_deadline():
    """The guard gives up by itself: a server that never answers hits the network timeout, and a body that
    trickles in (each read quick) hits the whole request's deadline, while the server is still sending."""
    release = threading.Event()  # set at the end: until then the stall never answers and the trickle never ends
    stalled, trickled = threading.Event(), threading.Event()  # the server's side finished (it must not have)
    sent: list[int] = []

    def stall(handler):
        release.wait(60)
        stalled.set()

    def trickle(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "100")
        handler.end_headers()
        for _ in range(100):
            handler.wfile.write(b"x")
            handler.wfile.flush()
            sent.append(1)
            if release.wait(0.1):  # one byte every 0.1 s: the whole body would take 10 s
                return
        trickled.set()

    with LoopbackServer({"/stall": stall, "/trickle": trickle}) as server:
        try:
            g = guard(allow_hosts="127.0.0.1/32", timeout_seconds=0.5)
            with pytest.raises(FetchFailed, match="timed out"):
                get(g, server.url("/stall"))
            assert not stalled.is_set()  # the guard's own timeout ended it, not the server
            with pytest.raises(FetchFailed, match="timed out"):  # every read is quick; the whole is not
                get(g, server.url("/trickle"), deadline=1.0)
            assert not trickled.is_set() and 0 < len(sent) < 100  # cut off mid-body by the deadline
        finally:
            release.set()


def test_upstream_errors():
    def cut(handler):  # promises 1000 bytes, sends 10, closes
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        handler.wfile.write(b"0123456789")
        handler.wfile.flush()
        handler.close_connection = True

    with LoopbackServer({"/cut": cut, "/boom": (500, {}, b"boom")}) as server:
        g = guard(allow_hosts="127.0.0.1/32")
        with pytest.raises(FetchFailed, match="HTTP 404"):
            get(g, server.url("/missing"))
        with pytest.raises(FetchFailed, match="HTTP 500"):
            get(g, server.url("/boom"))
        with pytest.raises(FetchFailed, match="closed before the whole body"):
            get(g, server.url("/cut"))
        port = server.port
    with pytest.raises(FetchFailed, match="could not connect"):
        get(g, f"http://127.0.0.1:{port}/gone")


def test_post_json_does_not_follow_redirects():
    with LoopbackServer({"/hook": (204, {}, b""), "/moved": (302, {"Location": "/hook"}, b"")}) as server:
        g = guard(allow_private=True)
        assert g.post_json(server.url("/hook"), {"a": 1}, timeout=5) == 204
        assert server.requests[-1]["body"] == b'{"a": 1}'
        assert server.requests[-1]["headers"]["Content-Type"] == "application/json"
        assert g.post_json(server.url("/moved"), {"a": 1}, timeout=5) == 302
        assert [r["path"] for r in server.requests] == ["/hook", "/moved"]


def test_https_verifies_the_host_name_on_the_pinned_address(monkeypatch, tmp_path):
    pytest.importorskip("cryptography")
    ca, context = self_signed(tmp_path, "secure.test")
    with (LoopbackServer({"/img": (200, {}, b"tls")}, tls=context) as server,
          resolving(monkeypatch, {"secure.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})):
        g = guard(allow_hosts="127.0.0.1/32", ca_bundle=ca)
        assert get(g, server.url("/img", "secure.test")) == b"tls"  # SNI and certificate: the name
        with pytest.raises(FetchFailed, match="certificate"):  # same address, a name the cert lacks
            get(g, server.url("/img", "other.test"))
        with pytest.raises(FetchFailed, match="certificate"):  # an untrusted CA
            get(guard(allow_hosts="127.0.0.1/32"), server.url("/img", "secure.test"))


def test_task_callback_urls_use_the_guard():
    from handler.errors import InvalidRequest
    from handler.runtime.tasks import check_callback_url

    url = "http://127.0.0.1:9/done"
    with pytest.raises(InvalidRequest) as err:
        check_callback_url(url, allow_private=False, network=NetworkSettings())
    assert err.value.field == "callback_url" and err.value.message.startswith("callback_url: 127.0.0.1 resolves to")
    assert check_callback_url(url, allow_private=True, network=NetworkSettings()) == url
    assert check_callback_url(url, allow_private=False, network=NetworkSettings(allow_hosts="127.0.0.1")) == url
    with pytest.raises(InvalidRequest, match="metadata"):  # "allow private" never reaches the metadata service
        check_callback_url("http://169.254.169.254/latest/", allow_private=True, network=NetworkSettings())
