"""PAI-EAS's queue service over HTTP and WebSocket: `/api/predict/<service>/<path>` (handler.runtime.eas_queue).

The verbs, as the `eas_prediction` SDK and PAI-EAS's plain-HTTP samples call them (the token bare in
`Authorization`, as every route; `X-EAS-QueueService-Redis-Uid` / `-Gid` are accepted and not needed):

    POST   <service>/sdapi/v1/txt2img?task_id=...   put: the body is the API request; 200, the index as the body
                                                    and `X-Eas-Queueservice-Request-Id`; query parameters are tags
    GET    <queue>?_index_=&_length_=&_timeout_=    get: a protobuf DataFrameListProto (sink: `_auto_delete_`)
    GET    <service>/sink?_watch_=true&...          watch (a WebSocket): one protobuf DataFrameProto per message
    PUT    <service>/sink?_indexes_=1,2             commit
    DELETE <queue>?_indexes_=1,2                    delete; `?_index_=N&_trunc_=true` truncate below N
    GET    <queue>?_attrs_=true                     attributes (JSON); `?_search_=true&_index_=N` search (JSON)

This protocol is not part of the OpenAPI document (protobuf bodies, a WebSocket); docs/eas-queue.md describes it.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed

from handler.api.sdapi import charged_consumer, check_inputs
from handler.contract.eas_queue import PROTOBUF, REQUEST_ID_HEADER, encode_frame, encode_frame_list
from handler.errors import Conflict, InvalidRequest, NotReady, ServiceError
from handler.records.metering import IDEMPOTENCY_HEADER
from handler.runtime.eas_queue import QueueName, QueueService, WatchParams, parse_put, queue_name, tags_of
from handler.runtime.service import Service

log = logging.getLogger(__name__)

bp = Blueprint("eas_queue", __name__, url_prefix="/api/predict")
# simple_websocket's options for the watcher: ping a silent peer (a vanished one frees its place), and a client
# that sends more than a ping's worth is cut off (nothing it sends is read, so nothing may pile up).
SERVER_OPTIONS = {"ping_interval": 20, "max_message_size": 1024}
sock = Sock()


@bp.record_once
def _configure(state: Any) -> None:
    state.app.config.setdefault("SOCK_SERVER_OPTIONS", SERVER_OPTIONS)
ROUTE = "/<svc>/<path:path>"


def service() -> Service:
    return current_app.extensions["sdfunc"]


def queues() -> QueueService:
    found = service().queues
    if found is None:
        raise InvalidRequest("the queue service needs the records database (SDFUNC_RECORD_REQUESTS=true)",
                             field="queue")
    return found


def scope() -> str | None:
    """Whose entries the caller sees: its own, or every consumer's for an admin (and the service token)."""
    return None if g.caller.admin else g.caller.consumer


def _args() -> dict[str, str]:
    return request.args.to_dict(flat=True)


@bp.before_request
def _admit_watcher() -> None:
    """A watch is checked (its queue, its query) and given a watcher place before the WebSocket handshake, so a
    refusal is an HTTP error the client sees at once."""
    if request.url_rule is None or not request.url_rule.websocket:
        return
    args = request.view_args or {}
    g.watch = WatchParams.parse(queue_name(args.get("svc", ""), args.get("path", "")), _args())
    if service().admission.stopping:
        raise NotReady("the instance is stopping; watch another instance", headers={"Retry-After": "1"})
    queues().admit_watcher()
    g.watcher_admitted = True


@bp.teardown_request
def _release_watcher(_exc: BaseException | None) -> None:
    if g.pop("watcher_admitted", False):
        queues().release_watcher()


class ProtocolViolation(Exception):
    """A watcher's client sent a data message."""


@sock.route(ROUTE, bp=bp)
def watch(ws: Any, svc: str, path: str) -> None:
    """The sink's results, one DataFrameProto per binary message, until the client leaves or the instance stops."""
    name: QueueName = queue_name(svc, path)

    def wait(seconds: float) -> bool:
        # The client sends nothing but pings, which the library's own thread answers (it also notices a close and,
        # with `ping_interval`, a peer that vanished); anything else it sends ends the watch.
        queues().wait_for_news(seconds)
        if ws.connected and ws.receive(timeout=0) is not None:
            raise ProtocolViolation
        return ws.connected

    try:
        queues().watch(name, scope(), g.watch, lambda frame: ws.send(encode_frame(frame)), wait)
        if ws.connected:  # the instance stops (1001: going away); the SDK reconnects, to another instance
            ws.close(reason=1001, message="the instance is stopping; reconnect")
    except (ConnectionClosed, OSError):
        pass  # the client went away
    except ProtocolViolation:
        ws.close(reason=1003, message="a watcher sends nothing but pings")
    except ServiceError as exc:  # the database is unreachable: the client should come back later (1013)
        log.warning("sink watcher ended: %s", exc.message)
        ws.close(reason=1013, message=exc.message[:120])


@bp.route(ROUTE, methods=["POST"])
def put(svc: str, path: str) -> Response:
    """Put a request on an input queue: a task (tags: the query parameters), answered with its index."""
    queues()  # the records database is on
    name = queue_name(svc, path)
    body = parse_put(name, request.get_data(cache=True))
    tags = tags_of(_args())
    consumer = charged_consumer(body)
    check_inputs(name.mode, body, queued=True)
    request_id = g.request_id
    task, _ = service().submit_task(
        name.mode, body, consumer, tag=tags.get("task_id"), callback_url=None, queue=name.name,
        tags={**tags, "requestId": request_id})
    if task.get("index") is None or task.get("queue") != name.name:  # the Idempotency-Key of another submission
        raise Conflict(f"Idempotency-Key: already used for task {task['task_id']}, not put on {name.name}",
                       field=IDEMPOTENCY_HEADER)
    response = Response(str(task["index"]), mimetype="text/plain")
    response.headers[REQUEST_ID_HEADER] = (task.get("tags") or {}).get("requestId", request_id)
    return response


@bp.route(ROUTE, methods=["GET"])
def get(svc: str, path: str) -> Response:
    """`_attrs_`, `_search_`, or get entries (protobuf)."""
    name, args = queue_name(svc, path), _args()
    if args.get("_watch_", "").lower() == "true":
        raise InvalidRequest("_watch_: a watch is a WebSocket (Upgrade: websocket) on the sink", field="_watch_")
    if args.get("_attrs_", "").lower() == "true":
        return jsonify(queues().store.attributes(name.name, scope(), sink=name.is_sink))
    if args.get("_search_", "").lower() == "true":
        return jsonify(queues().search(name, scope(), args, service().task_position))
    frames = queues().get(name, scope(), args)
    return Response(encode_frame_list(frames), mimetype=PROTOBUF)


@bp.route(ROUTE, methods=["PUT"])
def commit(svc: str, path: str) -> Response:
    """Commit sink results by `_indexes_`."""
    queues().commit(queue_name(svc, path), scope(), _args())
    return Response("OK", mimetype="text/plain")


@bp.route(ROUTE, methods=["DELETE"])
def delete(svc: str, path: str) -> Response:
    """Delete entries by `_indexes_`, or truncate below `_index_` with `_trunc_=true`."""
    removed = queues().delete(queue_name(svc, path), scope(), _args())
    return Response(f"OK {removed}", mimetype="text/plain")
