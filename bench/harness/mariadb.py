"""A throwaway MariaDB server for tests and benchmarks, started from the local `mariadb-server` install.

    python -m bench.harness.mariadb [--base-dir DIR] [--server-arg=--OPTION=VALUE ...]

starts one, logs its URLs and keeps it until Ctrl-C (or SIGTERM), for benchmarking by hand.

Contract:

- `find_server()` is the path of `mariadbd` when a usable install is there (`mariadbd`, `mariadb-install-db`
  and the `mariadb` client, looked up on PATH, then in /usr/sbin and /usr/bin), else None: tests skip on None.
  `scripts/test-services.sh` installs Debian's `mariadb-server` when it can.
- `MariaDB(base_dir)` is a context manager; `start()` (or `with`) initialises a data directory under
  `base_dir` (default: a new temporary directory, removed again by `stop()`; a given `base_dir` is kept, and
  a data directory already in it is reused) and runs `mariadbd --no-defaults` on 127.0.0.1 and a free port,
  plus a unix socket, with utf8mb4 as the server character set. It then creates the database `sdfunc` and the
  user `sdfunc` (@'127.0.0.1' and @'localhost', random password, all privileges on `sdfunc`.*).
  `url` is `mysql+pymysql://sdfunc:<pw>@127.0.0.1:<port>/sdfunc?charset=utf8mb4` (SQLAlchemy form);
  `root_url` is the same for `root` (random password, all privileges) without a database;
  `create_database(name)` makes one more, empty database for the same user and returns its URL (an isolated
  database per test); `url_for(name)` is the URL of any database; `sql(*statements)` runs SQL as root through
  the `mariadb` client on the socket and returns its tab-separated output. `port`, `socket_path`, `base_dir`,
  `error_log`, `pid`, `password` and `running` describe the running server.
  Start takes about 0.6 s (most of it `mariadb-install-db`), stop about 0.02 s.
- `stop()` is a clean shutdown (SIGTERM, which is what `mariadb-admin shutdown` asks for, without that
  tool's 1 s polling), a SIGKILL of the server's process group if it is not down within 20 s, and removal of
  the temporary directory; it is idempotent. On failure `start()` raises RuntimeError with the tail of the
  server's error log and leaves nothing running.
- The server runs in its own session (process group), so Ctrl-C in a terminal reaches only the caller,
  whose `with`/`stop()` then shuts it down. Nothing global is registered (no atexit, no signal handler;
  the command line's `main()` aside); on Linux, a server started from the main thread also gets SIGTERM
  from the kernel when the process that started it dies (`setpriv --pdeathsig`, when util-linux's
  setpriv is there), so a killed test run leaves no server behind. As root the server runs with
  `--user=root`, otherwise as the current user.
- Only the standard library is imported; all SQL goes through the `mariadb` client on the socket.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

log = logging.getLogger(__name__)

DATABASE = "sdfunc"
USER = "sdfunc"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
SEARCH_DIRS = ("/usr/sbin", "/usr/bin")
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux, 104 on macOS
PORT_ATTEMPTS = 3  # a free port can be taken between picking and binding it
_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")


class _Tools(NamedTuple):
    server: Path
    install_db: Path
    client: Path


def _which(name: str) -> Path | None:
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *SEARCH_DIRS])
    found = shutil.which(name, path=path)
    return Path(found) if found else None


def _tools() -> _Tools | None:
    server, install_db, client = _which("mariadbd"), _which("mariadb-install-db"), _which("mariadb")
    if server is None or install_db is None or client is None:
        return None
    return _Tools(server, install_db, client)


def find_server() -> Path | None:
    """The path of `mariadbd` when it, `mariadb-install-db` and the `mariadb` client are all installed."""
    tools = _tools()
    return tools.server if tools else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict[str, str]:
    """The environment without MYSQL_PWD, MYSQL_HOST & co., which the client would obey."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MYSQL_", "MARIADB_"))}


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} not readable)"


def _die_with_caller() -> list[str]:
    """A command prefix that makes the server get SIGTERM when the process starting it dies: util-linux's
    `setpriv --pdeathsig`, on Linux, from the main thread only (the signal follows the thread that forks)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or not sys.platform.startswith("linux") or \
            threading.current_thread() is not threading.main_thread():
        return []
    return [setpriv, "--pdeathsig", "TERM", "--"]


class MariaDB:
    """One throwaway MariaDB server; see the module docstring for the contract."""

    def __init__(self, base_dir: Path | None = None, *, server_args: Sequence[str] = ()) -> None:
        """`base_dir`: where the data directory, socket and logs go (kept afterwards); None: a temporary
        directory, removed by `stop()`. `server_args`: extra `mariadbd` options (e.g. for benchmarks)."""
        self._given_dir = Path(base_dir) if base_dir is not None else None
        self._server_args = tuple(server_args)
        self._dir: Path | None = None
        self._socket_dir: Path | None = None  # a short extra directory when base_dir is too long for a socket
        self._proc: subprocess.Popen[bytes] | None = None
        self._tools: _Tools | None = None
        self._port = 0
        self._password = ""
        self._root_password = ""

    # --- state -----------------------------------------------------------------------------------------------

    def _started(self) -> Path:
        if self._dir is None:
            raise RuntimeError("MariaDB server not started")
        return self._dir

    @property
    def base_dir(self) -> Path:
        return self._started()

    @property
    def port(self) -> int:
        self._started()
        return self._port

    @property
    def socket_path(self) -> Path:
        return (self._socket_dir or self._started()) / "mariadb.sock"

    @property
    def error_log(self) -> Path:
        return self._started() / "err.log"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("MariaDB server not started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def password(self) -> str:
        """The password of the `sdfunc` user."""
        self._started()
        return self._password

    def url_for(self, database: str) -> str:
        """The SQLAlchemy URL of `database` for the `sdfunc` user."""
        return f"mysql+pymysql://{USER}:{self.password}@127.0.0.1:{self.port}/{database}?charset=utf8mb4"

    @property
    def url(self) -> str:
        return self.url_for(DATABASE)

    @property
    def root_url(self) -> str:
        self._started()
        return f"mysql+pymysql://root:{self._root_password}@127.0.0.1:{self._port}/?charset=utf8mb4"

    # --- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> MariaDB:
        if self._proc is not None:
            raise RuntimeError("MariaDB server already started")
        tools = _tools()
        if tools is None:
            raise RuntimeError("MariaDB not found (mariadbd, mariadb-install-db, mariadb); install mariadb-server,"
                               " e.g. with scripts/test-services.sh as root")
        self._tools = tools
        t0 = time.perf_counter()
        try:
            self._make_dirs()
            self._install_db()
            for attempt in range(1, PORT_ATTEMPTS + 1):
                if self._launch():
                    break
                if attempt == PORT_ATTEMPTS or "already in use" not in _tail(self.error_log, 10):
                    raise RuntimeError(f"mariadbd exited with status {self._proc and self._proc.returncode} "
                                       f"while starting; the end of its log:\n{self._log_tails()}")
                log.info("port %d was taken, trying another", self._port)
            self._password, self._root_password = secrets.token_hex(16), secrets.token_hex(16)
            users = f"'{USER}'@'127.0.0.1', '{USER}'@'localhost'"
            self.sql(f"CREATE DATABASE IF NOT EXISTS `{DATABASE}` CHARACTER SET utf8mb4",
                     f"CREATE OR REPLACE USER '{USER}'@'127.0.0.1' IDENTIFIED BY '{self._password}'",
                     f"CREATE OR REPLACE USER '{USER}'@'localhost' IDENTIFIED BY '{self._password}'",
                     f"GRANT ALL PRIVILEGES ON `{DATABASE}`.* TO {users}",
                     f"CREATE OR REPLACE USER 'root'@'127.0.0.1' IDENTIFIED BY '{self._root_password}'",
                     "GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION")
        except BaseException:
            self.stop()
            raise
        log.info("MariaDB ready on 127.0.0.1:%d in %.2f s (pid %d, %s)", self._port, time.perf_counter() - t0,
                 self.pid, self._dir)
        return self

    def _make_dirs(self) -> None:
        if self._given_dir is not None:
            self._given_dir.mkdir(parents=True, exist_ok=True)
            self._dir = self._given_dir.resolve()
        else:
            self._dir = Path(tempfile.mkdtemp(prefix="sdfunc-mariadb-"))
        if len(os.fsencode(self._dir / "mariadb.sock")) > MAX_SOCKET_PATH:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="sdfunc-my-", dir="/tmp"))

    def _install_db(self) -> None:
        assert self._dir is not None and self._tools is not None
        data = self._dir / "data"
        if (data / "mysql").is_dir():
            log.info("reusing the data directory %s", data)
            return
        cmd = [str(self._tools.install_db), "--no-defaults", f"--datadir={data}", *_user_args(),
               "--auth-root-authentication-method=normal", "--skip-test-db"]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_clean_env(),
                              cwd=self._dir, timeout=120, check=False)
        if done.returncode != 0:
            out = "\n".join(done.stdout.decode(errors="replace").splitlines()[-25:])
            raise RuntimeError(f"mariadb-install-db failed with status {done.returncode}:\n{out}")

    def _launch(self) -> bool:
        """Start mariadbd on a fresh free port; True once it answers, False if it exited first."""
        assert self._dir is not None and self._tools is not None
        self._port = _free_port()
        cmd = [*_die_with_caller(), str(self._tools.server), "--no-defaults", f"--datadir={self._dir / 'data'}",
               *_user_args(), f"--socket={self.socket_path}", f"--port={self._port}", "--bind-address=127.0.0.1",
               f"--pid-file={self._dir / 'mariadbd.pid'}", f"--log-error={self.error_log}",
               "--skip-name-resolve", "--character-set-server=utf8mb4", *self._server_args]
        with open(self._dir / "console.log", "ab") as console:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=console,
                                          env=_clean_env(), cwd=self._dir, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            if self._ping():
                return True
            time.sleep(0.01)
        raise RuntimeError(f"mariadbd did not answer on {self.socket_path} within {READY_TIMEOUT_S:.0f} s; "
                           f"the end of its log:\n{self._log_tails()}")

    def _ping(self) -> bool:
        """Whether the server sends its greeting on the socket (what `mariadb-admin ping` waits for)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            try:
                s.connect(str(self.socket_path))
                return len(s.recv(4)) > 0
            except OSError:
                return False

    def _log_tails(self) -> str:
        assert self._dir is not None
        return "\n".join(t for t in (_tail(self.error_log), _tail(self._dir / "console.log", 5)) if t)

    def sql(self, *statements: str) -> str:
        """Run statements as root through the `mariadb` client on the socket; its tab-separated output."""
        self._started()
        assert self._tools is not None
        cmd = [str(self._tools.client), "--no-defaults", f"--socket={self.socket_path}", "--user=root",
               "--batch", "--skip-column-names"]
        done = subprocess.run(cmd, input=";\n".join(statements) + ";\n", capture_output=True, text=True,
                              env=_clean_env(), timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"mariadb client failed with status {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def create_database(self, name: str) -> str:
        """A new, empty database `name` (letters, digits, _) for the `sdfunc` user; its URL. An existing one
        is an error, so that a test never gets another test's tables."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"database name {name!r}: use 1 to 64 letters, digits or _")
        self.sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4",
                 f"GRANT ALL PRIVILEGES ON `{name}`.* TO '{USER}'@'127.0.0.1', '{USER}'@'localhost'")
        return self.url_for(name)

    def stop(self) -> None:
        """Shut the server down cleanly (SIGKILL after 20 s) and remove the temporary directory."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)  # mariadbd's clean shutdown, as `mariadb-admin shutdown`
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("mariadbd (pid %d) still up %.0f s after SIGTERM, killing it", proc.pid,
                            STOP_TIMEOUT_S)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            log.info("MariaDB on port %d stopped in %.2f s", self._port, time.perf_counter() - t0)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        if self._dir is not None and self._given_dir is None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    def __enter__(self) -> MariaDB:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _user_args() -> list[str]:
    """mariadbd refuses to run as root unless told to; as anyone else it runs as that user."""
    return ["--user=root"] if os.geteuid() == 0 else []


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.harness.mariadb", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-dir", type=Path, help="keep the data directory here (default: a temporary one)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="--OPTION=VALUE",
                        help="extra mariadbd option (repeatable; write it as --server-arg=--OPTION=VALUE)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if find_server() is None:
        log.error("MariaDB not found (mariadbd, mariadb-install-db, mariadb); install mariadb-server")
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the with block below then stops the server
    with MariaDB(args.base_dir, server_args=args.server_arg) as db:
        log.info("url: %s", db.url)
        log.info("root url: %s", db.root_url)
        log.info("socket: %s; Ctrl-C stops the server", db.socket_path)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
