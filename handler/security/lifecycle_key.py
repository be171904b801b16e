"""Who may call the lifecycle hooks (`POST /initialize`, `GET /pre-stop`).

FC's own lifecycle calls carry no credentials, and anyone who reaches the port could otherwise stop an instance
with `GET /pre-stop` (the server binds 0.0.0.0). So in s.yaml the hooks are commands run inside the container,
`sdfunc hook initialize` and `sdfunc hook pre-stop`, which call the routes on 127.0.0.1 with the instance's
lifecycle key: a random value the worker writes at start to a file only the container's user can read
(`key_file(port)`, mode 0600). In every auth mode the routes accept that key (`X-Sdfunc-Lifecycle-Key`); with
auth on, an admin's credentials too. In auth mode `none` there are no credentials, so only the key opens them.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

HEADER = "X-Sdfunc-Lifecycle-Key"


def key_file(port: int) -> Path:
    """Where the worker serving `port` keeps its lifecycle key."""
    return Path(tempfile.gettempdir()) / f"sdfunc-lifecycle-{port}.key"


def create_key(path: Path) -> str:
    """A new random key, written to `path` readable by this user only (replacing any older one atomically)."""
    key = secrets.token_urlsafe(32)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600, a name of its own
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    os.replace(tmp, path)
    return key


def read_key(path: Path) -> str | None:
    """The key in `path`, or None when there is none (auth off, or the server has not started)."""
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
