"""The ingress's word when a replica is lost: ``ReplicaLoss``, an ASGI middleware in Serve's proxy.

A WebSocket through Ray Serve runs in two processes: Serve's HTTP proxy holds the client's
socket and relays each ASGI message to and from the replica that serves the session. When that
replica dies (its process killed, its node lost), the proxy's relay ends without the replica
having closed the socket, and Serve's proxy then simply returns: the client would read a
dropped connection (1006, abnormal closure) and nothing that says why.

``ReplicaLoss`` wraps the proxy's app and watches each WebSocket's messages: one the replica
accepted, that neither the replica closed nor the client left, gets, when the relay ends, the
error the session's own protocol speaks (moshi-server's ``Error`` message on the moshi
WebSocket, an OpenAI ``error`` event on ``/v1/realtime``) and then a close with code 1011 and
the reason ``replica lost``. The client can tell it from a session that ended (1000), a server
going away (1001) or a refusal, and reconnect: the new session goes to a live replica while
Serve starts a replacement.

Serve loads proxy middlewares from the import path in ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
(read by each proxy when it starts): ``serve.start`` sets it for the proxies it starts, and a
cluster started by hand (``ray start``) needs it in its environment (docs/scale-out.md).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = [
    "CALLBACK",
    "CALLBACK_ENV",
    "LOST_CODE",
    "LOST_MESSAGE",
    "LOST_REASON",
    "ReplicaLoss",
    "middlewares",
]

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "dsm_stt.scale.proxy:middlewares"
LOST_CODE = 1011  # internal error: the server could not go on with the session
LOST_REASON = "replica lost"
LOST_MESSAGE = (
    "the server replica serving this session stopped (Ray Serve is starting another): "
    "reconnect to start a new session"
)
REALTIME_PATH = "/v1/realtime"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def middlewares() -> list[Any]:
    """What Serve's proxy calls through ``CALLBACK_ENV``: the middlewares it wraps its app in."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLoss)]


def lost_frame(path: str) -> dict[str, Any]:
    """The ASGI message that tells a session on ``path`` its replica was lost."""
    if path.rstrip("/") == REALTIME_PATH:
        from ..server.realtime_items import server_event

        error = {
            "type": "server_error",
            "code": "replica_lost",
            "message": LOST_MESSAGE,
            "param": None,
            "event_id": None,
        }
        return {"type": "websocket.send", "text": json.dumps(server_event("error", error=error))}
    from ..server.protocol import Error, encode_server_message

    return {"type": "websocket.send", "bytes": encode_server_message(Error(LOST_MESSAGE))}


class ReplicaLoss:
    """ASGI middleware: a WebSocket whose replica vanished is told so, then closed with 1011."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        accepted = ended = False  # ended: the replica closed, or the client left

        async def watched_receive() -> dict[str, Any]:
            nonlocal ended
            message = await receive()
            if message["type"] == "websocket.disconnect":
                ended = True
            return message

        async def watched_send(message: dict[str, Any]) -> None:
            nonlocal accepted, ended
            kind = message["type"]
            if kind == "websocket.accept":
                accepted = True
            elif kind == "websocket.close" or kind.startswith("websocket.http.response"):
                ended = True
            await send(message)

        try:
            await self.app(scope, watched_receive, watched_send)
        finally:
            if accepted and not ended:
                await self._say_lost(scope, send)

    @staticmethod
    async def _say_lost(scope: Scope, send: Send) -> None:
        try:
            await send(lost_frame(scope.get("path", "")))
            await send({"type": "websocket.close", "code": LOST_CODE, "reason": LOST_REASON})
        except Exception:
            pass
