"""Shared fixtures for every tier: one data folder with the tiny demo checkpoints, one app built by the factory,
records databases on SQLite and MariaDB. Also the `e2e` marker by directory (tests/README.md has the tiers)."""

import base64
import contextlib
import io
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import pipelines  # noqa: F401  # first: turns hub access off (pipelines.offline) before huggingface_hub is imported

E2E_DIR = Path(__file__).parent / "e2e"


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by `-m`
def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (scripts/test.sh runs `-n 2`), each worker gets one core's worth of threads and its own
    temporary folder. Two workers with torch's default pools (one thread per core each) oversubscribe the 2 cores
    and their OpenMP pools slow each other down; and per-port files such as the lifecycle key
    (`<tmp>/sdfunc-lifecycle-<port>.key`) would otherwise be shared by two workers' apps on the same port.
    Subprocesses (gunicorn, the CLI) inherit both through the environment."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    tmp = Path(tempfile.mkdtemp(prefix=f"sdfunc-{worker}-"))
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `e2e` every test under tests/e2e/ and every test that uses the session's MariaDB server, so that
    `-m "not e2e"` leaves out all real processes without each test remembering a marker."""
    for item in items:
        if item.path.is_relative_to(E2E_DIR) or "mariadb" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data root in the A1111 layout holding demo-sd15 and demo-sdxl, built by the real builder."""
    from pipelines.builders.demo import write_demo_models

    root = tmp_path_factory.mktemp("data")
    write_demo_models(root / "models" / "Stable-diffusion")
    return root


def linked_data_root(data_dir: Path, root: Path) -> Path:
    """A fresh data root at `root` holding the demo checkpoints as hard links (no copy, no rebuild), for tests
    that add their own LoRAs, VAEs or embeddings."""
    ckpts = root / "models" / "Stable-diffusion"
    ckpts.mkdir(parents=True)
    for path in (data_dir / "models" / "Stable-diffusion").glob("*.safetensors"):
        os.link(path, ckpts / path.name)
    return root


# In-process apps write their lifecycle key file for their port (handler.security.lifecycle_key): one port per
# test process, never a real server's 9000; the file is removed when the session ends (lifecycle_key_file).
TEST_PORT = 20000 + os.getpid() % 40000


@pytest.fixture(scope="session", autouse=True)
def lifecycle_key_file():
    from handler.security.lifecycle_key import key_file

    yield
    key_file(TEST_PORT).unlink(missing_ok=True)


def make_settings(data_dir: Path, **overrides):
    from handler.settings import Settings

    values = dict(data_dir=data_dir, warmup={"on_start": False}, log_json=False, max_images=8, max_width=1024,
                  max_height=1024, port=TEST_PORT)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def app(data_dir):
    from handler.app import create_app

    return create_app(make_settings(data_dir))


@pytest.fixture
def service(app):
    return app.extensions["sdfunc"]


@pytest.fixture
def client(app, service):
    """A test client; options the test sets are forgotten afterwards."""
    from handler.contract.options import MemoryOptionsStore

    yield app.test_client()
    service.options_store = MemoryOptionsStore()


def decode_png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    assert image.format == "PNG"
    image.load()
    return image


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@contextlib.contextmanager
def device_held(service) -> Iterator[None]:
    """Keep `service`'s device thread busy with a blocking job until the block exits (work queues behind it)."""
    started, release = threading.Event(), threading.Event()

    def occupy() -> None:
        started.set()
        release.wait(60)

    holder = threading.Thread(target=service.device.run, args=(occupy,))
    holder.start()
    assert started.wait(30)
    try:
        yield
    finally:
        release.set()
        holder.join(60)


# Records databases: every record and ledger test runs on SQLite and on a real MariaDB server -----------------
REQUIRE_MYSQL = os.environ.get("SDFUNC_REQUIRE_MYSQL") == "1"


@pytest.fixture(scope="session")
def mariadb():
    """One throwaway MariaDB server for the session (bench/harness/mariadb.py). Skipped when mariadb-server is not
    installed, a failure instead with SDFUNC_REQUIRE_MYSQL=1 (CI)."""
    from bench.harness.mariadb import MariaDB, find_server

    if find_server() is None:
        message = "mariadb-server is not installed (scripts/test-services.sh installs it when run as root)"
        if REQUIRE_MYSQL:
            pytest.fail(message + " and SDFUNC_REQUIRE_MYSQL=1")
        pytest.skip(message)
    server = MariaDB().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.e2e)])
def db_url(request, tmp_path) -> str:
    """A fresh, empty records database: an SQLite file, or a new database on the session's MariaDB (that
    variant is marked `e2e`: it needs the real server)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'records.sqlite3'}"
    import uuid

    return request.getfixturevalue("mariadb").create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def make_app(data_dir, db_url):
    """Build apps on the demo data with the test's records database; their connections close afterwards."""
    from handler.app import create_app

    apps = []

    def build(**overrides):
        app = create_app(make_settings(data_dir, database_url=db_url, **overrides))
        apps.append(app)
        return app

    yield build
    close_apps(apps)


@pytest.fixture
def apps():
    """Apps a test builds (append them); their task runners and database connections are closed afterwards."""
    made: list = []
    yield made
    close_apps(made)


def close_apps(apps) -> None:
    """Stop the task runners and close the database connections of apps a test built."""
    for app in apps:
        service = app.extensions["sdfunc"]
        if service.task_runner is not None:
            service.task_runner.stop()
        if service.db is not None:
            service.db.dispose()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def hook_headers(app_or_client: Any) -> dict[str, str]:
    """The header that opens the lifecycle hooks (`/initialize`, `/pre-stop`) of an in-process app, as
    `sdfunc hook` sends it."""
    from handler.security import lifecycle_key

    app = getattr(app_or_client, "application", app_or_client)
    return {lifecycle_key.HEADER: app.extensions["sdfunc"].lifecycle_key}


TINY = {"prompt": "a red house", "steps": 1, "width": 64, "height": 64, "seed": 7}
