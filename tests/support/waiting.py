"""Waiting on a condition instead of sleeping: poll a predicate until it holds, fail the test after a timeout.

The timeout bounds the wait so that a broken condition fails instead of hanging; it is not a claim about speed.
Use it wherever a test needs something to have happened (a log line written, a request admitted, a worker
replaced) before it goes on."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_POLL = threading.Event()  # never set: its wait() is the pause between two polls


def wait_for(predicate: Callable[[], T], timeout: float = 60, what: str | Callable[[], str] = "condition",
             interval: float = 0.01) -> T:
    """Call `predicate` until it returns a true value and return that value. After `timeout` seconds fail with
    an AssertionError naming `what` (a function is called then, for a message that shows the state at the end,
    such as a server's log)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            message = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}")
        _POLL.wait(interval)
