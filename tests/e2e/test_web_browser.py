"""The web page end to end in headless Chromium (Debian's /usr/bin/chromium driven by Playwright), against a real
gunicorn server on the demo models: log in, generate, see the image and its seed, find it in Images, reuse its
parameters, download it (PNG text chunk), read the usage chart; the same page at phone width (no horizontal
scroll, every form control labelled); the LoRA picker; the page's notes against what the server lists.

Screenshots (and each test's browser console) are saved under `<repo>/test-artifacts/web/` (the folder
`test-artifacts` can be moved with SDFUNC_TEST_ARTIFACTS) as `<test name>-<step>.png`, and a `-failure.png`
when a test fails. Skipped when Chromium or Playwright is missing (scripts/test-services.sh installs Chromium as
root); SDFUNC_REQUIRE_BROWSER=1 (CI) makes that a failure instead.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.support.serving import ServeProcess

CHROMIUM = Path("/usr/bin/chromium")
REQUIRE_BROWSER = os.environ.get("SDFUNC_REQUIRE_BROWSER") == "1"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]
USER, PASSWORD = "alice", "wonderland"
LORA = "tiny-style"
PROMPT = "a lighthouse at dusk"
GENERATION_TIMEOUT_MS = 120_000  # a generation on a slow, shared CPU, model load included
UI_TIMEOUT_MS = 30_000  # anything else the page does (API calls, rendering)
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("SDFUNC_TEST_ARTIFACTS") or REPO / "test-artifacts") / "web"


def _missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install -e '.[test]')"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is not installed (scripts/test-services.sh installs Debian's chromium when run as root)"
    return None


if _missing() and not REQUIRE_BROWSER:
    pytest.skip(f"{_missing()}; SDFUNC_REQUIRE_BROWSER=1 makes this a failure", allow_module_level=True)

if not _missing():
    from playwright.sync_api import Browser, Download, Page, expect, sync_playwright


# Fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    missing = _missing()
    if missing:
        pytest.fail(f"{missing} and SDFUNC_REQUIRE_BROWSER=1")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(browser, tmp_path_factory, data_dir) -> Iterator[ServeProcess]:
    """One server for the module: basic auth (alice), priced CPU time, a warm-up, the demo checkpoints and one
    LoRA file (the listing only reads names; nothing generates with it)."""
    root = tmp_path_factory.mktemp("web")
    shutil.copytree(data_dir / "models" / "Stable-diffusion", root / "models" / "Stable-diffusion")
    (root / "models" / "Lora").mkdir(parents=True)
    (root / "models" / "Lora" / f"{LORA}.safetensors").write_bytes(b"\0" * 16)
    serve = ServeProcess(root, SDFUNC_AUTH__MODE="basic", SDFUNC_AUTH__USERS=f"{USER}:{PASSWORD}",
                         SDFUNC_BILLING__PRICES='{"cpu": "0.001"}', SDFUNC_WARMUP__SHAPES='["64x64@1"]')
    try:
        serve.wait_state("READY")
        yield serve
    finally:
        serve.stop()


@pytest.fixture(scope="module")
def generations() -> dict[str, int]:
    """How many generation requests the tests made through the page, per consumer (the usage must say as much)."""
    return {USER: 0}


class Shots:
    """Screenshots of one test: `<artifacts>/<test name>-<step>.png`."""

    def __init__(self, name: str) -> None:
        self.name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for stale in ARTIFACTS.glob(f"{self.name}-*"):  # an earlier run's, which this run may not overwrite
            stale.unlink()

    def path(self, step: str) -> Path:
        return ARTIFACTS / f"{self.name}-{step}"

    def __call__(self, page: Page, step: str) -> Path:
        path = self.path(f"{step}.png")
        page.screenshot(path=str(path), full_page=True)
        return path


def _open(browser: Browser, server: ServeProcess, request: pytest.FixtureRequest, **context_args) -> Iterator[Page]:
    """A fresh browser context (no cookies, no storage) on the server's `/`; at teardown its console goes to
    `<test>-console.log`, and a failed test leaves `<test>-failure.png`, a Playwright trace `<test>-trace.zip`
    (`playwright show-trace` opens it) and the server log's tail in the captured output."""
    shots = Shots(request.node.name)
    context = browser.new_context(accept_downloads=True, **context_args)
    context.set_default_timeout(UI_TIMEOUT_MS)
    context.tracing.start(screenshots=True, snapshots=True)
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(f"console.{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    page.on("requestfailed", lambda r: console.append(f"requestfailed: {r.method} {r.url} {r.failure}"))
    page.errors = console  # type: ignore[attr-defined]  (read by no_page_errors)
    page.shots = shots  # type: ignore[attr-defined]
    failed_before = request.session.testsfailed
    page.goto(server.url + "/")
    yield page
    try:
        if request.session.testsfailed > failed_before:  # this test's call failed (reported before teardown)
            page.screenshot(path=str(shots.path("failure.png")), full_page=True)
            context.tracing.stop(path=str(shots.path("trace.zip")))
            print(f"server log tail:\n{server.log_tail()}")
        else:
            context.tracing.stop()
    finally:
        shots.path("console.log").write_text("\n".join(console) + "\n")
        context.close()


@pytest.fixture
def desktop(browser, server, request) -> Iterator[Page]:
    yield from _open(browser, server, request, viewport={"width": 1280, "height": 800})


@pytest.fixture
def phone(browser, server, request) -> Iterator[Page]:
    yield from _open(browser, server, request, viewport={"width": 390, "height": 844}, device_scale_factor=2,
                     is_mobile=True, has_touch=True)


# Steps ----------------------------------------------------------------------------------------------------------
def log_in(page: Page, user: str = USER, password: str = PASSWORD) -> None:
    expect(page.locator("#login")).to_be_visible()
    page.fill("#login-user", user)
    page.fill("#login-password", password)
    page.click("#login-submit")


def logged_in(page: Page) -> None:
    log_in(page)
    expect(page.locator("#whoami")).to_contain_text(USER)
    expect(page.locator("#login")).to_be_hidden()


def select_containing(page: Page, selector: str, needle: str) -> str:
    """Select the first option of `selector` whose value or text contains `needle` (waiting for the page to fill
    the list in); returns its value."""
    find = """([sel, needle]) => {
        const select = document.querySelector(sel);
        const option = select && [...select.options].find(o => o.value.includes(needle) || o.text.includes(needle));
        return option ? option.value : null;
    }"""
    page.wait_for_function(find, arg=[selector, needle], timeout=UI_TIMEOUT_MS)
    value = page.evaluate(find, [selector, needle])
    page.select_option(selector, value=value)
    expect(page.locator(selector)).to_have_value(value)
    return value


def show_tab(page: Page, name: str, tap: bool = False) -> None:
    tab = page.locator(f"#tab-{name}")
    tab.tap() if tap else tab.click()
    expect(tab).to_have_attribute("aria-selected", "true")
    expect(tab).to_have_attribute("role", "tab")
    panel = page.locator(f"#panel-{name}")
    expect(panel).to_be_visible()
    expect(panel).to_have_attribute("role", "tabpanel")
    for other in {"generate", "images", "usage"} - {name}:
        expect(page.locator(f"#tab-{other}")).not_to_have_attribute("aria-selected", "true")
        expect(page.locator(f"#panel-{other}")).to_have_attribute("hidden", re.compile(".*"))


def generate(page: Page, generations: dict[str, int], *, seed: int, steps: int, prompt: str, tap: bool = False) -> None:
    """Fill the form (demo-sd15, 64x64) and generate; waits for the result image to load."""
    show_tab(page, "generate", tap=tap)
    select_containing(page, "#checkpoint", "demo-sd15")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#steps", str(steps))
    page.fill("#seed", str(seed))
    page.fill("#prompt", prompt)
    image = page.locator("#result-image")
    before = image.get_attribute("src") or ""  # an earlier result's, if any: wait for a new one
    button = page.locator("#generate")
    button.tap() if tap else button.click()
    generations[USER] += 1
    expect(image).to_be_visible(timeout=GENERATION_TIMEOUT_MS)
    expect(image).to_have_attribute("src", re.compile(r"\S"), timeout=GENERATION_TIMEOUT_MS)
    page.wait_for_function("(before) => { const i = document.querySelector('#result-image');"
                           " return i && i.getAttribute('src') && i.getAttribute('src') !== before"
                           " && i.complete && i.naturalWidth > 0; }", arg=before, timeout=GENERATION_TIMEOUT_MS)
    expect(page.locator("#result-seed")).to_have_text(str(seed), timeout=GENERATION_TIMEOUT_MS)
    expect(page.locator("#error")).to_have_text(re.compile(r"^\s*$"))  # no error message (empty or hidden)


def first_image_item(page: Page, seed: int):
    """The newest `li.image-item` in Images, once it is the one with `seed` and its thumbnail has loaded."""
    item = page.locator("#images-list li.image-item").first
    expect(item).to_be_visible()
    expect(item.locator(".seed")).to_have_text(str(seed))
    expect(item).to_have_attribute("data-id", re.compile(r"\S"))
    page.wait_for_function("() => { const i = document.querySelector('#images-list li.image-item img.thumb');"
                           " return i && i.complete && i.naturalWidth > 0; }", timeout=UI_TIMEOUT_MS)
    return item


def usage_json(server: ServeProcess) -> dict:
    r = requests.get(f"{server.url}/billing/usage", auth=(USER, PASSWORD), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def sticking_out(page: Page, where: str, width: int = 390) -> list[str]:
    """What sticks out of the phone's screen ([] when nothing does). A mobile browser widens its layout viewport
    (window.innerWidth) to fit what overflows, so both that and the document's scrollWidth must be the screen's."""
    sizes = page.evaluate("""(width) => ({
        scroll: document.documentElement.scrollWidth, inner: window.innerWidth,
        wider: [...document.querySelectorAll('body *')]
            .filter(el => el.getClientRects().length && el.getBoundingClientRect().right > width + 0.5)
            .slice(0, 8)
            .map(el => `${el.tagName.toLowerCase()}${el.id ? '#' + el.id : ''}${el.className && typeof el.className
                        === 'string' ? '.' + el.className.trim().split(/\\s+/).join('.') : ''} right=${
                        Math.round(el.getBoundingClientRect().right)}`)})""", width)
    if sizes["inner"] == width and sizes["scroll"] <= width:
        return []
    return [(f"{where}: wider than the {width} px screen (innerWidth {sizes['inner']}, scrollWidth "
             f"{sizes['scroll']}); sticking out: {sizes['wider']}")]


UNLABELLED = """() => {
    const named = el => {
        if ((el.getAttribute('aria-label') || '').trim()) return true;
        const ids = (el.getAttribute('aria-labelledby') || '').split(/\\s+/).filter(Boolean);
        if (ids.some(id => (document.getElementById(id)?.textContent || '').trim())) return true;
        return [...(el.labels || [])].some(l => l.textContent.trim());
    };
    const describe = el => `${el.tagName.toLowerCase()}#${el.id || '?'}[name=${el.name || ''}]`;
    const controls = [...document.querySelectorAll('input, select, textarea')]
        .filter(el => el.type !== 'hidden');
    const buttons = [...document.querySelectorAll('button')]
        .filter(el => !el.textContent.trim() && !(el.getAttribute('title') || '').trim());
    return {count: controls.length,
            unlabelled: controls.filter(el => !named(el)).map(describe),
            nameless_buttons: buttons.filter(el => !named(el)).map(describe)};
}"""


def no_page_errors(page: Page) -> None:
    errors = [line for line in page.errors if line.startswith("pageerror")]  # type: ignore[attr-defined]
    assert not errors, f"uncaught JavaScript errors: {errors}"


# Tests ----------------------------------------------------------------------------------------------------------
def test_login_wrong_password_then_right(desktop: Page):
    page, shot = desktop, desktop.shots
    # The login form, and nothing of the app, until we log in; a wrong password says so, in the page.
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#generate")).to_be_hidden()
    log_in(page, USER, "not-the-password")
    error = page.locator("#login-error")
    expect(error).to_have_attribute("role", "alert")
    expect(error).to_have_text(re.compile(r"\S"), timeout=UI_TIMEOUT_MS)
    expect(error).to_be_visible()
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#generate")).to_be_hidden()
    shot(page, "1-wrong-password")
    # ... and the right one still works after it.
    page.fill("#login-user", "")
    page.fill("#login-password", "")
    logged_in(page)
    shot(page, "2-logged-in")
    no_page_errors(page)


def test_desktop_generate_images_reuse_download_usage(desktop: Page, server: ServeProcess, generations, tmp_path):
    page, shot = desktop, desktop.shots
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#generate")).to_be_hidden()
    logged_in(page)

    # Generate with the demo model: the image appears with its seed and its charge.
    generate(page, generations, seed=4242, steps=2, prompt=PROMPT)
    expect(page.locator("#result-charge")).to_contain_text("CNY")
    expect(page.locator("#result-infotext")).to_contain_text("Seed: 4242")
    shot(page, "2-generated")

    # Images: the newest is ours; reuse brings its parameters back into a form that now holds other values.
    for field, value in (("#prompt", "something else"), ("#seed", "1"), ("#steps", "9"), ("#width", "128"),
                         ("#height", "96"), ("#cfg-scale", "3")):
        page.fill(field, value)
    sampler = page.locator("#sampler").input_value()
    other = next(v for v in page.locator("#sampler option").evaluate_all("os => os.map(o => o.value)") if v != sampler)
    page.select_option("#sampler", other)
    select_containing(page, "#checkpoint", "demo-sdxl")
    show_tab(page, "images")
    item = first_image_item(page, 4242)
    image_id = item.get_attribute("data-id")
    item.locator(".reuse").click()
    expect(page.locator("#tab-generate")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#panel-generate")).to_be_visible()
    for field, value in (("#prompt", PROMPT), ("#seed", "4242"), ("#steps", "2"), ("#width", "64"), ("#height", "64"),
                         ("#cfg-scale", "7"), ("#sampler", sampler)):
        expect(page.locator(field)).to_have_value(value)
    expect(page.locator("#checkpoint option:checked")).to_contain_text("demo-sd15")
    shot(page, "3-reused")

    # The tabs work from the keyboard: arrows move between them, Home and End jump.
    page.locator("#tab-generate").focus()
    for key, name in (("ArrowRight", "images"), ("End", "usage"), ("ArrowRight", "generate"), ("ArrowLeft", "usage"),
                      ("Home", "generate")):
        page.keyboard.press(key)
        expect(page.locator(f"#tab-{name}")).to_have_attribute("aria-selected", "true")
        expect(page.locator(f"#tab-{name}")).to_be_focused()
        expect(page.locator(f"#panel-{name}")).to_be_visible()

    # Download: the original PNG, with its A1111 infotext in the `parameters` text chunk.
    show_tab(page, "images")
    item = first_image_item(page, 4242)
    with page.expect_download(timeout=UI_TIMEOUT_MS) as info:
        item.locator(".download").click()
    download: Download = info.value
    assert download.failure() is None
    assert download.suggested_filename.endswith(".png"), download.suggested_filename
    assert image_id in download.suggested_filename, (download.suggested_filename, image_id)
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    data = saved.read_bytes()
    original = requests.get(f"{server.url}/images/{image_id}", auth=(USER, PASSWORD), timeout=30)
    assert original.status_code == 200 and data == original.content, "the download is not the stored PNG"
    with Image.open(io.BytesIO(data)) as png:
        assert png.format == "PNG" and png.size == (64, 64)
        parameters = png.info.get("parameters", "")
    assert PROMPT in parameters and "Seed: 4242" in parameters, parameters

    # Usage: a bar per day, and the page's total is the API's, which counts every generation we made.
    show_tab(page, "usage")
    expect(page.locator("#usage-chart rect.bar").first).to_be_attached()
    assert page.locator("#usage-chart rect.bar").count() >= 1
    expect(page.locator("#usage-chart rect.bar title").first).to_be_attached()
    api = usage_json(server)
    assert api["totals"]["requests"] == generations[USER], api
    expect(page.locator("#usage-total-requests")).to_have_text(re.compile(rf"^\s*{generations[USER]}\s*$"))
    expect(page.locator("#usage-total-amount")).to_contain_text("CNY")
    expect(page.locator("#usage-table")).to_be_visible()
    shot(page, "4-usage")
    no_page_errors(page)


def test_phone_width_layout_and_labels(phone: Page, server: ServeProcess, generations):
    page, shot = phone, phone.shots
    problems: list[str] = []  # every layout and labelling problem, reported together at the end
    shot(page, "1-login")
    problems += sticking_out(page, "login")
    logged_in(page)
    generate(page, generations, seed=77, steps=1, prompt="a small boat", tap=True)
    box = page.locator("#result-image").bounding_box()
    if not (box and box["x"] >= 0 and box["x"] + box["width"] <= 390.5):
        problems.append(f"the result image is not within the screen: {box}")
    problems += sticking_out(page, "generate tab")
    shot(page, "2-generate")

    show_tab(page, "images", tap=True)
    first_image_item(page, 77)
    problems += sticking_out(page, "images tab")
    shot(page, "3-images")

    show_tab(page, "usage", tap=True)
    expect(page.locator("#usage-chart rect.bar").first).to_be_attached()
    problems += sticking_out(page, "usage tab")
    shot(page, "4-usage")

    # Every form control has an accessible name (label, aria-label or aria-labelledby); so has every button.
    labels = page.evaluate(UNLABELLED)
    assert labels["count"] > 0
    if labels["unlabelled"]:
        problems.append(f"form controls without an accessible name: {labels['unlabelled']}")
    if labels["nameless_buttons"]:
        problems.append(f"buttons without an accessible name: {labels['nameless_buttons']}")
    progress = page.locator("#progress")
    if progress.get_attribute("role") != "progressbar":
        problems.append(f"#progress has role={progress.get_attribute('role')!r}, not progressbar")
    if not progress.is_hidden():
        problems.append("#progress is shown while idle (after the generation finished)")
    assert not problems, "\n".join(problems)
    no_page_errors(page)


def test_lora_picker_adds_lora_to_prompt_and_logout(desktop: Page, server: ServeProcess):
    page, shot = desktop, desktop.shots
    logged_in(page)
    show_tab(page, "generate")
    expect(page.locator("#lora-add")).to_be_visible()
    page.fill("#prompt", "a quiet harbour")
    select_containing(page, "#lora", LORA)
    page.click("#lora-add")
    expect(page.locator("#prompt")).to_have_value(re.compile(rf"^a quiet harbour.*<lora:{LORA}:1>$"))
    shot(page, "1-lora-added")

    # Log out: back to the login form, and nothing of this consumer stays on the page for the next one.
    show_tab(page, "images")
    expect(page.locator("#images-page")).to_contain_text("Page", timeout=UI_TIMEOUT_MS)  # the listing is drawn
    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#generate")).to_be_hidden()
    expect(page.locator("#login-user")).to_be_focused()
    assert page.evaluate("sessionStorage.getItem('sdfunc-auth')") is None
    expect(page.locator("#prompt")).to_have_value("")
    expect(page.locator("#result")).to_be_hidden()
    assert page.locator("li.image-item").count() == 0
    expect(page.locator("#images-page")).to_have_text("")
    shot(page, "2-logged-out")
    no_page_errors(page)


# What the server reports, feature by feature: (feature, listing, how a note names it, how many the listing holds).
# A note may say a feature is missing, or not done, only while its listing is empty.
FEATURES = (
    ("LoRA", "/sdapi/v1/loras", r"\blora", len),
    ("checkpoint", "/sdapi/v1/sd-models", r"\bcheckpoint", len),
    ("sampler", "/sdapi/v1/samplers", r"\bsampler", len),
    ("VAE", "/sdapi/v1/sd-vae", r"\bvae\b", len),
    ("embedding", "/sdapi/v1/embeddings", r"\bembedding|textual inversion",
     lambda b: len(b["loaded"]) + len(b["skipped"])),
    ("style", "/sdapi/v1/prompt-styles", r"\bstyles?\b", len),
    ("upscaler / hires fix", "/sdapi/v1/upscalers", r"upscal|\bhires\b|high.res",
     lambda b: sum(u["name"] != "None" for u in b)),
    ("ControlNet", "/sdapi/v1/scripts", r"controlnet(?!\s+models?)", lambda b: int("controlnet" in b["txt2img"])),
    ("ControlNet model", "/controlnet/model_list", r"controlnet\s+models?", lambda b: len(b["model_list"])),
)
DENIAL = re.compile(r"\b(?:not|no|none|never|yet|unsupported|unavailable|cannot|without)\b|n't\b", re.IGNORECASE)


def listed(server: ServeProcess, path: str):
    r = requests.get(server.url + path, auth=(USER, PASSWORD), timeout=30)
    assert r.status_code == 200, (path, r.text)
    return r.json()


def page_notes(page: Page) -> dict[str, str]:
    """The text of every `.note` on the page, by id (filled in by then: the LoRA note comes from the listing)."""
    expect(page.locator("#lora-note")).to_have_text(re.compile(r"\S"))
    notes = page.locator(".note").evaluate_all("els => els.map(el => [el.id || el.className, el.textContent.trim()])")
    assert notes, "the page has no .note"
    return dict(notes)


def false_denials(notes: dict[str, str], server: ServeProcess) -> list[str]:
    """Each sentence of a note that says a feature is missing or not done while the server lists it (a sentence,
    not a clause: "LoRA tags are written into the prompt; this server does not apply them yet." denies LoRA)."""
    problems = []
    for feature, path, mention, count in FEATURES:
        n = count(listed(server, path))
        for note, text in notes.items():
            for sentence in re.split(r"(?<=[.!?])\s+", text):
                if n and re.search(mention, sentence, re.IGNORECASE) and DENIAL.search(sentence):
                    problems.append(f"#{note} says {sentence!r}, but {path} lists {n} {feature}(s)")
    return problems


def lora_count_in(note: str) -> int | None:
    found = re.search(r"\b(\d+|no) LoRAs?\b", note, re.IGNORECASE)
    return None if found is None else (0 if found[1].lower() == "no" else int(found[1]))


def test_notes_say_what_the_server_lists(desktop: Page, server: ServeProcess):
    page, shot = desktop, desktop.shots
    logged_in(page)
    show_tab(page, "generate")
    loras = listed(server, "/sdapi/v1/loras")
    assert [lora["name"] for lora in loras] == [LORA], loras

    # The LoRA note counts what /sdapi/v1/loras lists and says the server applies the tags (it does: test_lora.py);
    # no note denies a feature the server lists.
    notes = page_notes(page)
    shot(page, "1-notes")
    denials = false_denials(notes, server)
    assert not denials, "\n".join(denials)
    lora_note = notes["lora-note"]
    assert lora_count_in(lora_note) == len(loras), (lora_note, loras)
    assert re.search(r"\bappl(?:y|ies|ied)\b", lora_note, re.IGNORECASE), lora_note

    # With the LoRA folder emptied and rescanned, the note says none are installed, where the server looks for them
    # (the folder its listing named) and how to rescan; the picker is off. Put back whatever happens.
    lora_file = Path(loras[0]["path"])
    folder = lora_file.parent.relative_to(server.data).as_posix()
    parked = server.data / lora_file.name
    lora_file.rename(parked)
    try:
        rescan = requests.post(f"{server.url}/sdapi/v1/refresh-loras", auth=(USER, PASSWORD), timeout=30)
        assert rescan.status_code == 200, rescan.text
        assert listed(server, "/sdapi/v1/loras") == []
        page.reload()  # the session's credentials are kept: the page logs in again and reads the listings afresh
        expect(page.locator("#app")).to_be_visible()
        notes = page_notes(page)
        shot(page, "2-no-loras")
        lora_note = notes["lora-note"]
        assert lora_count_in(lora_note) == 0, lora_note
        assert folder in lora_note and "/sdapi/v1/refresh-loras" in lora_note, (folder, lora_note)
        expect(page.locator("#lora-add")).to_be_disabled()
        denials = false_denials(notes, server)
        assert not denials, "\n".join(denials)
    finally:
        parked.rename(lora_file)
        requests.post(f"{server.url}/sdapi/v1/refresh-loras", auth=(USER, PASSWORD), timeout=30)
    assert [lora["name"] for lora in listed(server, "/sdapi/v1/loras")] == [LORA]
    no_page_errors(page)
