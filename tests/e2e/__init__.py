"""End-to-end tier: real processes (gunicorn via `sdfunc serve`, the `sdfunc` command line, MariaDB, Chromium,
schemathesis). Every test here is marked `e2e` by tests/conftest.py."""
