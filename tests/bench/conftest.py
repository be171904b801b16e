"""Fixtures the benchmark tests share."""

from __future__ import annotations

import logging
import signal

import pytest


@pytest.fixture
def restored_process_state():
    """`main` installs a SIGTERM handler and the bench's root log handler; give the test process its own back."""
    root = logging.getLogger()
    saved = signal.getsignal(signal.SIGTERM), root.handlers[:], root.level
    yield
    signal.signal(signal.SIGTERM, saved[0])
    root.handlers[:] = saved[1]
    root.setLevel(saved[2])
