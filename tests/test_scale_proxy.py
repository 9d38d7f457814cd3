"""``dsm_stt.scale.proxy``: the middleware in Serve's proxy that tells a session its replica was
lost. Driven here without Ray, by stand-ins for the proxy's app (what it relays from a replica)
and for the client's socket: a WebSocket the replica accepted and then neither closed nor saw
leave gets the protocol's error and close 1011; every other ending is left as it was.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgpack
import pytest

from dsm_stt.scale.proxy import LOST_CODE, LOST_MESSAGE, LOST_REASON, ReplicaLoss, middlewares


def run(relay: Any, path: str = "/api/asr-streaming", kind: str = "websocket") -> list[dict]:
    """What the client's side receives when ``relay`` (the proxy's app) runs under the
    middleware; the client sends nothing until the relay asks for a message, then leaves."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": kind, "path": path}
    asyncio.run(ReplicaLoss(relay)(scope, receive, send))
    return sent


def accepts_then(*messages: dict) -> Any:
    async def relay(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "websocket.accept"})
        for message in messages:
            await send(message)

    return relay


STEP = {"type": "websocket.send", "bytes": msgpack.packb({"type": "Step", "step_idx": 0})}


def test_a_replica_that_vanished_mid_session_is_named_and_the_close_is_1011() -> None:
    sent = run(accepts_then(STEP))  # the relay ends: the replica is gone, no close came
    assert sent[:2] == [{"type": "websocket.accept"}, STEP]
    error, close = sent[2:]
    assert msgpack.unpackb(error["bytes"]) == {"type": "Error", "message": LOST_MESSAGE}
    assert close == {"type": "websocket.close", "code": LOST_CODE, "reason": LOST_REASON}
    assert (LOST_CODE, LOST_REASON) == (1011, "replica lost")


def test_the_realtime_route_gets_an_openai_error_event() -> None:
    sent = run(accepts_then(), path="/v1/realtime")
    event = json.loads(sent[1]["text"])
    assert event["type"] == "error" and event["event_id"].startswith("event_")
    assert event["error"]["type"] == "server_error"
    assert event["error"]["code"] == "replica_lost"
    assert event["error"]["message"] == LOST_MESSAGE
    assert sent[2]["code"] == LOST_CODE
    openai_types = pytest.importorskip("openai.types.realtime", reason="the test extra has it")
    import pydantic

    pydantic.TypeAdapter(openai_types.RealtimeServerEvent).validate_python(event)


def test_a_session_the_replica_closed_is_left_alone() -> None:
    close = {"type": "websocket.close", "code": 1000, "reason": ""}
    assert run(accepts_then(STEP, close)) == [{"type": "websocket.accept"}, STEP, close]


def test_a_client_that_left_is_not_written_to() -> None:
    async def relay(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "websocket.accept"})
        assert (await receive())["type"] == "websocket.disconnect"

    assert run(relay) == [{"type": "websocket.accept"}]


def test_refusals_and_plain_http_pass_through() -> None:
    denial = [
        {"type": "websocket.http.response.start", "status": 401, "headers": []},
        {"type": "websocket.http.response.body", "body": b"no"},
    ]

    async def refuse(scope: dict, receive: Any, send: Any) -> None:
        for message in denial:
            await send(message)

    assert run(refuse) == denial

    async def never_accepts(scope: dict, receive: Any, send: Any) -> None:
        return None  # the replica was lost before accepting: the proxy answers the upgrade

    assert run(never_accepts) == []

    async def http(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    assert [m["type"] for m in run(http, kind="http")] == [
        "http.response.start",
        "http.response.body",
    ]


def test_a_client_gone_before_the_error_does_not_raise() -> None:
    async def relay(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "websocket.accept"})

    calls: list[dict] = []

    async def send(message: dict) -> None:
        calls.append(message)
        if message["type"] != "websocket.accept":
            raise OSError("connection reset")

    async def receive() -> dict:
        raise AssertionError("not read")

    asyncio.run(ReplicaLoss(relay)({"type": "websocket", "path": "/"}, receive, send))
    assert [m["type"] for m in calls] == ["websocket.accept", "websocket.send"]


def test_serve_accepts_the_callback() -> None:
    pytest.importorskip("ray.serve", reason="needs Ray Serve: pip install 'dsm-stt[ray]'")
    from ray.serve._private.http_util import validate_http_proxy_callback_return

    (middleware,) = validate_http_proxy_callback_return(middlewares())
    assert middleware.cls is ReplicaLoss
