"""The web page's files and its two small endpoints (the page itself runs in tests/e2e/test_web_browser.py)."""

import re
from pathlib import Path

STATIC = Path(__file__).resolve().parents[2] / "handler" / "api" / "static"


def test_page_is_served_with_a_strict_policy(client):
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    for name in ("app.js", "app.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert client.get("/web/config").json == {"auth_mode": "none", "currency": "CNY", "version": "0.1.0"}


def test_nothing_is_loaded_from_outside_the_function():
    for path in STATIC.iterdir():
        text = path.read_text()
        # Only the SVG namespace may name another host; it is an identifier, never fetched.
        urls = [u for u in re.findall(r"https?://[^\s\"')]+", text) if u != "http://www.w3.org/2000/svg"]
        assert urls == [], (path.name, urls)


def test_every_form_control_has_a_label():
    html = (STATIC / "index.html").read_text()
    labelled = set(re.findall(r'<label for="([^"]+)"', html)) | set(re.findall(r'id="([^"]+)"[^>]*aria-label', html))
    controls = re.findall(r"<(?:input|select|textarea)\b[^>]*\bid=\"([^\"]+)\"", html)
    assert controls and set(controls) <= labelled, set(controls) - labelled


def test_notes_carry_no_text_of_their_own():
    """A note says what the server does or has installed, so app.js fills it from the server's listings (checked
    in a browser by test_notes_say_what_the_server_lists); text written into index.html went stale once (it said
    LoRAs were not applied after the server had begun applying them)."""
    html = (STATIC / "index.html").read_text()
    notes = re.findall(r'<p class="note"[^>]*>(.*?)</p>', html, re.DOTALL)
    assert notes and all(not text.strip() for text in notes), notes
