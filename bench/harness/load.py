"""The closed loop the benchmarks drive a server with: c client threads, each sending its next request when its
previous one is done, until a fixed number has been sent.

`closed_loop(clients, request, total)` calls `request(client, i)` for i = 0 .. total-1, spread over one thread per
client, all released together. It returns the `perf_counter` at the release and the answers in order of i; the
caller decides where its wall time ends (the last answer, or the last result that arrived elsewhere).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

C = TypeVar("C")
A = TypeVar("A")


def closed_loop(clients: Sequence[C], request: Callable[[C, int], A], total: int) -> tuple[float, list[A]]:
    """(perf_counter at the threads' release, the `total` answers in order of their index)."""
    lock = threading.Lock()
    taken = 0
    answers: list[A | None] = [None] * total
    start = threading.Barrier(len(clients) + 1)

    def loop(client: C) -> None:
        nonlocal taken
        start.wait()
        while True:
            with lock:
                if taken >= total:
                    return
                index, taken = taken, taken + 1
            answers[index] = request(client, index)

    threads = [threading.Thread(target=loop, args=(c,), name=f"bench-client-{i}", daemon=True)
               for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    start.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    return started, [a for a in answers if a is not None]
