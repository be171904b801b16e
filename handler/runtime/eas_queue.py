"""PAI-EAS's queue service (the API edition's asynchronous queue), wire-compatible with the `eas_prediction` SDK.

Contract:
- Queues of a service `<service>` (any name): an input queue per queueable API path (`<service>/sdapi/v1/txt2img`,
  `<service>/sdapi/v1/img2img`) and one sink, `<service>/sink`, that receives every result of that service's
  input queues in the order they finished.
- A put is a task (handler.runtime.tasks): validated and refused now (422) like a synchronous request, charged to
  the caller's consumer (or `alwayson_scripts.uid` where allowed) when it runs, once. Its tags (the put's query
  parameters, and `requestId`) travel with its result. Inputs are taken by any instance's task runners.
- A sink result is delivered at least once until it is committed (or deleted, or truncated): a watcher gets the
  uncommitted results from its start index on, in index order, never more than its window of uncommitted ones
  at a time; a watcher that reconnects gets the uncommitted ones again. `auto_commit` commits each on delivery.
- Callers see their own entries only; admins (and the service token) see every consumer's.
- A watcher runs on its HTTP thread and reads the database: it never holds the device or a queue place. It looks
  every `tasks.watch_poll_seconds`, and at once when a task of its worker finishes. A worker serves at most
  `tasks.max_watchers` at once (more: 503), and ends them when the instance stops.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from handler.contract.eas_queue import MAX_INDEX, RESERVED, Frame
from handler.contract.schemas import (
    MAX_JSON_DEPTH,
    GenerationRequest,
    Img2ImgRequest,
    Txt2ImgRequest,
    nested_deeper,
)
from handler.errors import InvalidRequest, NotFound, NotReady
from handler.records.queue import Entry, QueueStore

log = logging.getLogger(__name__)

INPUT_PATHS = {"sdapi/v1/txt2img": "txt2img", "sdapi/v1/img2img": "img2img"}
SINK = "sink"
SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_TAGS, MAX_TAG_KEY, MAX_TAG_VALUE = 32, 64, 128  # a task's `tag` column holds 128
MAX_LENGTH = 100  # entries one `get` returns
MAX_GET_WAIT = 30.0  # seconds a `get` waits for an entry (it holds an HTTP thread meanwhile)


@dataclass(frozen=True)
class QueueName:
    """A queue addressed as `/api/predict/<service>/<path>`."""

    service: str
    path: str

    @property
    def name(self) -> str:
        return f"{self.service}/{self.path}"

    @property
    def is_sink(self) -> bool:
        return self.path == SINK

    @property
    def mode(self) -> str:
        return INPUT_PATHS[self.path]


def queue_name(service: str, path: str) -> QueueName:
    """The queue at `<service>/<path>`; 404 for a service name or path sdfunc does not serve as a queue."""
    path = path.strip("/")
    if not SERVICE_NAME.fullmatch(service):
        raise NotFound(f"queue service name {service!r}: letters, digits, '_', '.', '-' (at most 64)")
    if path != SINK and path not in INPUT_PATHS:
        raise NotFound(f"no queue at {service}/{path}: the input queues are "
                       f"{', '.join(f'{service}/{p}' for p in INPUT_PATHS)} and results come from {service}/{SINK}")
    return QueueName(service, path)


def _integer(args: dict[str, str], key: str, default: int, *, low: int = 0, high: int = MAX_INDEX) -> int:
    raw = args.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{key}: must be an integer, not {raw[:40]!r}", field=key) from None
    if not low <= value <= high:
        raise InvalidRequest(f"{key}: must be between {low} and {high}", field=key)
    return value


def _flag(args: dict[str, str], key: str, default: bool) -> bool:
    raw = args.get(key)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("true", "1"):
        return True
    if raw.lower() in ("false", "0"):
        return False
    raise InvalidRequest(f"{key}: must be true or false", field=key)


def _seconds(args: dict[str, str], key: str, default: float) -> float:
    """A duration as the SDK writes it ('5s', '500ms', '1m', or a number of seconds), capped at MAX_GET_WAIT."""
    raw = (args.get(key) or "").strip().lower()
    if not raw:
        return default
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", raw)
    if match is None:
        raise InvalidRequest(f"{key}: a duration such as '5s' or '500ms'", field=key)
    value = float(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match.group(2)]
    return min(value, MAX_GET_WAIT)


def indexes(args: dict[str, str], key: str = "_indexes_") -> list[int]:
    """`_indexes_=1,2,3` as integers (at least one, each positive)."""
    raw = args.get(key, "")
    try:
        values = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise InvalidRequest(f"{key}: comma-separated positive integers", field=key) from None
    if not values or any(not 0 < v <= MAX_INDEX for v in values) or len(values) > 1000:
        raise InvalidRequest(f"{key}: 1 to 1000 comma-separated positive integers", field=key)
    return values


def tags_of(args: dict[str, str]) -> dict[str, str]:
    """The query parameters that are not the protocol's: a put's tags, a watch's or get's tag filter."""
    tags = {k: v for k, v in args.items() if k not in RESERVED}
    if len(tags) > MAX_TAGS:
        raise InvalidRequest(f"tags: at most {MAX_TAGS} query parameters", field="tags")
    for key, value in tags.items():
        if not 0 < len(key) <= MAX_TAG_KEY or len(value) > MAX_TAG_VALUE:
            raise InvalidRequest(f"tags: a tag name has 1-{MAX_TAG_KEY} characters and a value at most "
                                 f"{MAX_TAG_VALUE}", field=key[:MAX_TAG_KEY] or "tags")
    return tags


def parse_put(name: QueueName, data: bytes) -> GenerationRequest:
    """A put's body: the JSON request of the queue's API path (422 naming the field otherwise)."""
    if name.is_sink:
        raise InvalidRequest(f"{name.name}: results are put on a sink by the service, not by clients; put requests "
                             f"on {name.service}/sdapi/v1/txt2img or img2img", field="queue")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("body: the queued request must be JSON (the API path's request body)",
                             field="body") from None
    except RecursionError:
        body = None
    if body is None or nested_deeper(body):
        raise InvalidRequest(f"body: JSON nested more than {MAX_JSON_DEPTH} deep", field="body")
    if not isinstance(body, dict):
        raise InvalidRequest("body: the request body must be a JSON object", field="body")
    model = Txt2ImgRequest if name.mode == "txt2img" else Img2ImgRequest
    return model.model_validate(body)  # a pydantic ValidationError: the app answers 422 naming every invalid field


@dataclass
class WatchParams:
    """A sink watcher's query: `_index_`, `_window_`, `_index_only_`, `_auto_commit_` and tag filters."""

    start: int
    window: int
    index_only: bool
    auto_commit: bool
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, name: QueueName, args: dict[str, str]) -> WatchParams:
        if not name.is_sink:
            raise InvalidRequest(f"{name.name}: watch a sink ({name.service}/{SINK}); input queues are taken by "
                                 "the service's workers", field="_watch_")
        return cls(start=_integer(args, "_index_", 0), window=_integer(args, "_window_", 1, low=1, high=1000),
                   index_only=_flag(args, "_index_only_", False), auto_commit=_flag(args, "_auto_commit_", False),
                   tags=tags_of(args))


def frame(entry: Entry, *, index_only: bool = False) -> Frame:
    return Frame(index=entry.index, data=b"" if index_only else entry.data, tags=entry.tags)


class QueueService:
    """The queue operations of one worker; `stopping()` tells watchers to end (the instance is stopping)."""

    def __init__(self, store: QueueStore, *, max_watchers: int, poll_seconds: float,
                 stopping: Callable[[], bool]) -> None:
        self.store = store
        self.poll_seconds = poll_seconds
        self.stopping = stopping
        self.max_watchers = max_watchers
        self._watchers = threading.BoundedSemaphore(max_watchers) if max_watchers else None
        self._lock = threading.Lock()
        self._news = threading.Condition()  # notified when a task of this worker finishes
        self.watching = 0

    def notify(self) -> None:
        """A task finished on this worker: its watchers and waiting gets look now instead of at their next poll
        (results finished on other instances are seen at the next poll)."""
        with self._news:
            self._news.notify_all()

    def wait_for_news(self, seconds: float) -> None:
        """Wait up to `seconds`, less when a task of this worker finishes meanwhile."""
        with self._news:
            self._news.wait(seconds)

    # watchers ---------------------------------------------------------------------------------------------
    def end_watchers_when(self, condition: Callable[[], bool]) -> None:
        """Watchers also end when `condition()` holds (the gunicorn worker is shutting down: a watcher must not
        hold its graceful stop for `graceful_timeout`)."""
        stopping = self.stopping
        self.stopping = lambda: stopping() or condition()

    def admit_watcher(self) -> None:
        """Take a watcher place (503 when all `tasks.max_watchers` are taken); `release_watcher` gives it back."""
        if self._watchers is None or not self._watchers.acquire(blocking=False):
            raise NotReady(f"this instance serves {self.max_watchers} sink watcher(s) at once (tasks.max_watchers); "
                           "retry, or close another watcher", headers={"Retry-After": "1"})
        with self._lock:
            self.watching += 1

    def release_watcher(self) -> None:
        with self._lock:
            self.watching -= 1
        if self._watchers is not None:
            self._watchers.release()

    def watch(self, name: QueueName, consumer: str | None, params: WatchParams, send: Callable[[Frame], None],
              wait: Callable[[float], bool]) -> None:
        """Deliver `name`'s results to one watcher until `wait(seconds)` says the client went away (False) or the
        instance stops. `send` raises when the connection is gone."""
        delivered: list[int] = []  # sent, not yet committed: at most `window`
        while not self.stopping():
            if delivered:
                done = self.store.committed(name.name, delivered)
                delivered = [i for i in delivered if i not in done]
            room = params.window - len(delivered)
            for entry in self.store.pending(name.name, consumer, start=params.start, limit=room, skip=delivered,
                                            tags=params.tags):
                send(frame(entry, index_only=params.index_only))
                if params.auto_commit:
                    self.store.commit(name.name, consumer, [entry.index])
                else:
                    delivered.append(entry.index)
            if not wait(self.poll_seconds):
                return

    # the other verbs --------------------------------------------------------------------------------------
    def get(self, name: QueueName, consumer: str | None, args: dict[str, str]) -> list[Frame]:
        """`get`: up to `_length_` entries from `_index_` on, waiting up to `_timeout_` for the first (a waiting
        get takes a watcher place: 503 when none is free); on a sink, `_auto_delete_` (default true) commits what it
        returns. An input queue's entries are only shown (the service's workers take them)."""
        start = _integer(args, "_index_", 0)
        length = _integer(args, "_length_", 1, low=1, high=MAX_LENGTH)
        timeout = _seconds(args, "_timeout_", 0.0)
        auto_delete = _flag(args, "_auto_delete_", True)
        filters = tags_of(args)
        if args.get("requestId"):
            filters["requestId"] = args["requestId"]
        deadline = time.monotonic() + timeout
        waiting = False  # a get that waits holds a watcher place meanwhile (it holds an HTTP thread as one does)
        try:
            while True:
                if name.is_sink:
                    entries = self.store.pending(name.name, consumer, start=start, limit=length, tags=filters)
                else:
                    entries = self.store.inputs(name.name, consumer, start=start, limit=length, tags=filters)
                left = deadline - time.monotonic()
                if entries or left <= 0 or self.stopping():
                    break
                if not waiting:
                    self.admit_watcher()
                    waiting = True
                self.wait_for_news(min(self.poll_seconds, left))
        finally:
            if waiting:
                self.release_watcher()
        if name.is_sink and auto_delete and entries:
            self.store.commit(name.name, consumer, [e.index for e in entries])
        return [frame(e) for e in entries]

    def commit(self, name: QueueName, consumer: str | None, args: dict[str, str]) -> None:
        """`commit` (PUT `_indexes_`): those results are never delivered again; 404 naming unknown indexes."""
        if not name.is_sink:
            raise InvalidRequest(f"{name.name}: commit the results of a sink ({name.service}/{SINK})",
                                 field="_indexes_")
        unknown = self.store.commit(name.name, consumer, indexes(args))
        if unknown:
            raise NotFound(f"_indexes_: no result {', '.join(map(str, unknown[:10]))} on {name.name}; nothing was "
                           "committed", field="_indexes_")

    def delete(self, name: QueueName, consumer: str | None, args: dict[str, str]) -> int:
        """`delete` (DELETE `_indexes_`) or `truncate` (DELETE `_index_` and `_trunc_=true`: everything below
        `_index_`). On a sink the results are committed; on an input queue the requests no worker took yet are
        cancelled (their tasks fail, not charged). Returns how many entries it removed."""
        if _flag(args, "_trunc_", False):
            before = _integer(args, "_index_", 0, low=1)
            if name.is_sink:
                return self.store.truncate_sink(name.name, consumer, before)
            return self.store.cancel(name.name, consumer, before=before)[0]
        wanted = indexes(args)
        if name.is_sink:
            unknown = self.store.commit(name.name, consumer, wanted)
            removed = len(wanted) - len(unknown)
        else:
            removed, unknown = self.store.cancel(name.name, consumer, indexes=wanted)
        if unknown:
            raise NotFound(f"_indexes_: no entry {', '.join(map(str, unknown[:10]))} on {name.name}; nothing was "
                           "deleted", field="_indexes_")
        return removed

    def search(self, name: QueueName, consumer: str | None, args: dict[str, str],
               position: Callable[[str], int | None]) -> dict[str, Any]:
        """`search` (`_search_=true&_index_=N`): where entry N is (404 when there is none)."""
        index = _integer(args, "_index_", 0, low=1)
        found = self.store.find(name.name, consumer, index, sink=name.is_sink)
        if found is None:
            raise NotFound(f"_index_: no entry {index} on {name.name}", field="_index_")
        waiting = position(found["id"]) if not name.is_sink else None
        return {"index": index, "queue": name.name, "task_id": found["id"], "status": found["status"],
                "IsPending": waiting is not None, "WaitCount": (waiting - 1) if waiting is not None else 0,
                **({"committed": bool(found["committed"])} if name.is_sink else {})}
