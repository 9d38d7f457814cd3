"""The slot board: what every replica last said about its slots, and the cluster view of it.

Serve routes each HTTP request to one replica, which alone cannot answer for the cluster. So
each replica posts its figures (slots used and total, open sessions, sessions served, ready)
to one small named actor, ``SlotBoard``, twice a second, and answers the cluster routes from
the board: ``/api/cluster`` (totals and one entry per replica), and, through the ingress,
``/health``, ``/api/modules_info`` and ``/metrics`` (``ClusterRoutes``). A replica that stops
posting (killed, node lost) is shown as lost after ``LOST_AFTER`` seconds and dropped from the
totals; Serve replaces it, and its successor posts under its own id.

The board also carries the teardown's drain order: Serve, deleting a deployment, waits for
ongoing requests to end and then kills the replica, and a WebSocket never ends by itself; so
``serve.stop`` first has the board mark the replicas as ``draining``, each one learns it from
the answer to its next post and finishes its sessions as ``dsm-stt serve`` does on SIGTERM
(last words, close 1001), and only then is the deployment deleted. A replica Serve stops on its own
(autoscaling down, fewer replicas in a new config, a new version rolled out) drains the same
way: ``ClusterRoutes`` asks ``stopping`` at each post, and Serve's wait for the replica's
requests then ends with its sessions instead of cutting them when its grace period runs out.

The board is detached (it must outlive the replica that happens to create it) and takes no
CPU; ``serve.stop`` removes it. What it does not do: history or rates (Prometheus scraping
each replica's own ``/metrics`` does that better).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import ray

__all__ = [
    "BOARD_NAME",
    "BOARD_NAMESPACE",
    "LOST_AFTER",
    "ClusterRoutes",
    "SlotBoard",
    "cluster_view",
    "get_board",
]

BOARD_NAME = "dsm_stt_slot_board"
BOARD_NAMESPACE = "dsm_stt"  # fixed, so that the driver that deployed finds it to remove it
LOST_AFTER = 3.0  # seconds without a post: the replica is lost
FORGET_AFTER = 60.0  # and then no longer listed


@ray.remote(num_cpus=0)
class SlotBoard:
    """Replica id → its last post and when it came."""

    def __init__(self) -> None:
        self.posts: dict[str, tuple[float, dict[str, Any]]] = {}
        self.draining: set[str] = set()

    def post(self, replica: str, figures: dict[str, Any]) -> bool:
        """Record a replica's figures; the answer says whether it should drain."""
        self.posts[replica] = (time.time(), figures)
        return replica in self.draining

    def drain(self) -> None:
        """Every replica that has posted is told to finish its sessions (the teardown's first
        step: Serve itself would wait for WebSockets to end, then kill them). Only those: a
        replica of the next deployment, posting before this board is removed, is not."""
        self.draining |= set(self.posts)

    def read(self) -> dict[str, tuple[float, dict[str, Any]]]:
        now = time.time()
        self.posts = {k: v for k, v in self.posts.items() if now - v[0] < FORGET_AFTER}
        return {k: (now - at, figures) for k, (at, figures) in self.posts.items()}


def get_board(namespace: str = BOARD_NAMESPACE) -> Any:
    """The board actor, created on first use (detached, named ``BOARD_NAME``)."""
    return SlotBoard.options(
        name=BOARD_NAME, namespace=namespace, get_if_exists=True, lifetime="detached"
    ).remote()


def cluster_view(posts: dict[str, tuple[float, dict[str, Any]]]) -> dict[str, Any]:
    """Totals over the live replicas and one entry per replica (lost ones flagged)."""
    replicas = []
    for replica, (age, figures) in sorted(posts.items()):
        replicas.append(
            {"replica": replica, "age_s": round(age, 2), "lost": age >= LOST_AFTER, **figures}
        )
    live = [r for r in replicas if not r["lost"]]
    return {
        "replicas": replicas,
        "live_replicas": len(live),
        "ready_replicas": sum(1 for r in live if r.get("ready")),
        "drained": all(r.get("drained") for r in live),
        "used_slots": sum(int(r.get("used_slots", 0)) for r in live),
        "total_slots": sum(int(r.get("total_slots", 0)) for r in live),
        "open_sessions": sum(int(r.get("open_sessions", 0)) for r in live),
    }


class ClusterRoutes:
    """ASGI: the cluster routes, answered from the board; everything else to ``app``.

    ``/api/modules_info`` keeps moshi-server's shape (one module, used and total slots as
    strings), with the cluster's totals and a ``replicas`` list added; ``/health`` is 200 while
    one replica at least is ready; ``/metrics`` is the serving replica's own metrics plus
    ``asr_cluster_*`` gauges per replica.
    """

    def __init__(
        self,
        app: Any,
        board: Any,
        replica: str,
        figures: Callable[[], dict[str, Any]],
        on_drain: Callable[[], None],
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.app = app
        self.board = board
        self.replica = replica
        self.figures = figures
        self.on_drain = on_drain
        self.stopping = stopping

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":  # the replica's life: post to the board meanwhile
            poster = asyncio.ensure_future(self._post_forever())
            try:
                await self.app(scope, receive, send)
            finally:
                poster.cancel()
            return
        path = scope.get("path", "")
        routes = {
            "/api/cluster": self._cluster,
            "/health": self._health,
            "/api/modules_info": self._modules_info,
            "/metrics": self._metrics,
        }
        if scope["type"] == "http" and scope.get("method") == "GET" and path in routes:
            view = await self.view()
            if view is not None:
                status, body, kind = await routes[path](view, scope, receive)
                await _respond(send, status, body, kind)
                return
        await self.app(scope, receive, send)

    async def _post_forever(self, period: float = 0.5) -> None:
        """Post this replica's figures every ``period`` seconds; drain when the board says,
        or when Serve has begun to stop this replica."""
        while True:
            try:
                draining = await asyncio.wait_for(
                    self.board.post.remote(self.replica, self.figures()), 1.0
                )
            except Exception:  # the board is restarting or gone: post again next time
                draining = False
            if draining or self.stopping():
                self.on_drain()
            await asyncio.sleep(period)

    async def view(self) -> dict[str, Any] | None:
        """The cluster view, or None when the board does not answer within a second (then
        the replica answers for itself)."""
        try:
            posts = await asyncio.wait_for(self.board.read.remote(), 1.0)
        except Exception:
            return None
        return cluster_view(posts) | {"serving_replica": self.replica}

    async def _cluster(self, view: dict, scope: dict, receive: Any) -> tuple[int, bytes, str]:
        return 200, json.dumps(view).encode(), "application/json"

    async def _health(self, view: dict, scope: dict, receive: Any) -> tuple[int, bytes, str]:
        from .. import __version__

        ready = view["ready_replicas"] > 0
        body = {
            "status": "ok" if ready else "starting",
            "version": __version__,
            "ready_replicas": view["ready_replicas"],
            "live_replicas": view["live_replicas"],
        }
        return (200 if ready else 503), json.dumps(body).encode(), "application/json"

    async def _modules_info(self, view: dict, scope: dict, receive: Any) -> tuple[int, bytes, str]:
        status, body = await _inner_get(self.app, scope, receive)
        if status != 200:
            return status, body, "application/json"
        modules = json.loads(body)
        for module in modules:
            module["used_slots"] = str(view["used_slots"])
            module["total_slots"] = str(view["total_slots"])
            module["replicas"] = [
                {k: r.get(k) for k in ("replica", "used_slots", "total_slots", "lost")}
                for r in view["replicas"]
            ]
        return 200, json.dumps(modules).encode(), "application/json"

    async def _metrics(self, view: dict, scope: dict, receive: Any) -> tuple[int, bytes, str]:
        status, body = await _inner_get(self.app, scope, receive)
        lines = [body.decode().rstrip("\n")] if status == 200 else []
        gauges = (
            ("used_slots", "Slots in use on each replica, from the slot board"),
            ("total_slots", "Slots of each replica, from the slot board"),
            ("sessions_served", "Sessions each replica has accepted since it started"),
        )
        for name, help_text in gauges:
            lines += [f"# HELP asr_cluster_{name} {help_text}", f"# TYPE asr_cluster_{name} gauge"]
            for r in view["replicas"]:
                if not r["lost"]:
                    lines.append(f'asr_cluster_{name}{{replica="{r["replica"]}"}} {r.get(name, 0)}')
        return 200, ("\n".join(lines) + "\n").encode(), "text/plain; version=0.0.4; charset=utf-8"


async def _inner_get(app: Any, scope: dict, receive: Any) -> tuple[int, bytes]:
    """Run a GET through ``app`` and collect its status and body."""
    status, chunks = 500, []

    async def collect(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, collect)
    return status, b"".join(chunks)


async def _respond(send: Any, status: int, body: bytes, kind: str) -> None:
    headers = [(b"content-type", kind.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
