"""Live serving on Ray Serve: one replica per device, each the unchanged server app.

Owns ``SttReplica`` (a Serve deployment class whose ASGI ingress is ``create_app``: its own
engine, slots, runner and lifespan, so a replica behaves exactly as ``dsm-stt serve`` on one
device), ``deployment`` (the bound Serve application: replica count or autoscaling, resources
per replica, the free-slots router), ``app_builder`` (the same, from a Serve config file that
``serve deploy`` reads; ``dsm-stt ray-config`` writes one), and ``run`` (what
``dsm-stt serve --ray`` calls: connect to or start Ray, start Serve's HTTP proxy on the
server's host and port, deploy, wait for a signal, tear down).

Serve's proxy is the one ingress: it routes WebSocket upgrades and HTTP requests to replicas,
and a WebSocket stays on the replica it was routed to until it closes. When that replica dies
the proxy drops the socket without a close frame (the client reads 1006, abnormal closure;
docs/scale-out.md); new sessions go to the live replicas while Serve starts a replacement.
``stop`` has every replica drain its sessions before the deployment is deleted (``board.py``).

Routing: ``router.FreeSlotsRouter`` where Ray has ``RequestRouter`` (alpha; the ``ray`` extra
pins Ray), Serve's default power-of-two router otherwise. Either way a replica past its slots
answers moshi-server's "no free channels" (or holds the newcomer up to ``queue_timeout``), so
a client that retries finds room wherever there is some; with the free-slots router it gets
that answer only when every replica is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import ray
from ray import serve

from ..server.app import create_app
from ..server.config import ServerConfig
from .board import BOARD_NAME, BOARD_NAMESPACE, ClusterRoutes, cluster_view, get_board
from .proxy import CALLBACK, CALLBACK_ENV

log = logging.getLogger(__name__)

__all__ = [
    "APP_NAME",
    "HTTP_HEADROOM",
    "SttReplica",
    "app_builder",
    "autoscaling_config",
    "deployment",
    "run",
]

APP_NAME = "dsm-stt"
# Ongoing requests a replica takes beyond its slots: health checks, metrics, file POSTs that
# wait for a slot. A WebSocket past the slots still reaches a replica, which says "no free
# channels" (or queues it for ``queue_timeout``) as a single server would.
HTTP_HEADROOM = 16
STATS_PERIOD_S = 0.5  # how often each replica reports its slots (router and slot board)
# Serve's controller starts the proxies, which inherit its environment: this one has them wrap
# their app in ``proxy.ReplicaLoss`` (a lost replica's sessions get an Error and close 1011)
CONTROLLER_OPTIONS = {"runtime_env": {"env_vars": {CALLBACK_ENV: CALLBACK}}}


@serve.ingress()
class SttReplica:
    """One replica: the server app over its own engine (loaded by the app's lifespan)."""

    def __init__(self, config: ServerConfig, threads: int | None = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.config = config
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.board = get_board()
        self.server_app: Any = None
        self._draining: Any = None  # the drain's future, once the board has asked for it

    def __serve_build_asgi_app__(self) -> Any:
        self.server_app = create_app(self.config)
        return ClusterRoutes(
            self.server_app, self.board, self.replica, self.figures, self._drain, _stopping
        )

    def figures(self) -> dict[str, Any]:
        """This replica's slots and sessions, as the router and the board read them."""
        context = self.server_app.state.server if self.server_app is not None else None
        runner = context.runner if context is not None else None
        if runner is None:
            return {"ready": False, "node": ray.get_runtime_context().get_node_id()}
        served = context.metrics.registry.get_sample_value("asr_connect_total") or 0.0
        return {
            "ready": bool(context.ready),
            "used_slots": int(runner.used_slots),
            "total_slots": int(runner.total_slots),
            "open_sessions": len(context.sessions),
            "sessions_served": int(served),
            "node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "rss_mib": _rss_mib(),
            "drained": self._draining is not None and self._draining.done(),
        }

    async def record_routing_stats(self) -> dict[str, Any]:
        """Serve calls this every ``STATS_PERIOD_S``: the router ranks replicas by it (the
        same figures go to the slot board from ``ClusterRoutes``)."""
        return self.figures()

    def _drain(self) -> None:
        """Finish every session (last words, close 1001), once, on the app's event loop."""
        context = self.server_app.state.server if self.server_app is not None else None
        if self._draining is not None or context is None or context.loop is None:
            return
        self._draining = asyncio.run_coroutine_threadsafe(context.drain(), context.loop)


def _rss_mib() -> int | None:
    """This process's resident memory in MiB (Linux; None elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def _stopping() -> bool:
    """Whether Serve has begun this replica's graceful shutdown (scaled down, replaced, or its
    application deleted). Serve tells a replica's own code only once its requests are over,
    and a WebSocket never ends by itself, so this reads the flag Serve sets on the replica
    actor when the shutdown starts (Ray's internals: the ``ray`` extra pins the version, and
    ``tests/test_ray_autoscaling.py`` fails if it moves). False where it cannot be read."""
    global _STOPPING_UNREADABLE
    try:
        actors = ray._private.worker.global_worker.actors  # this process's actor instance
        return any(bool(a._replica_impl._shutting_down) for a in actors.values())
    except Exception as exc:
        if not _STOPPING_UNREADABLE:
            _STOPPING_UNREADABLE = True
            log.warning("cannot tell when Serve stops this replica (%s): no drain", exc)
        return False


_STOPPING_UNREADABLE = False


def _router_config() -> Any:
    """The free-slots router where this Ray has the API, else Serve's default router."""
    from ray.serve.config import RequestRouterConfig

    settings: dict[str, Any] = {
        "request_routing_stats_period_s": STATS_PERIOD_S,
        "request_routing_stats_timeout_s": 2.0,
    }
    try:
        from .router import FreeSlotsRouter
    except ImportError as exc:  # RequestRouter moved or went away: keep serving
        log.warning("Ray Serve has no RequestRouter (%s): power-of-two routing", exc)
    else:
        settings["request_router_class"] = FreeSlotsRouter
        settings["request_router_kwargs"] = {"headroom": HTTP_HEADROOM}
    return RequestRouterConfig(**settings)


def deployment(
    config: ServerConfig,
    replicas: int | None = 1,
    autoscaling: dict[str, Any] | None = None,
    cpus_per_replica: float | None = None,
    threads: int | None = None,
    replicas_per_gpu: int = 1,
) -> Any:
    """The Serve application: ``replicas`` copies of the server (or ``autoscaling``: Serve's
    autoscaling config, on ongoing requests, i.e. slots in use). On CUDA each replica takes
    a ``1 / replicas_per_gpu`` share of a GPU (several processes, each its own event loop, on
    one GPU); on CPU ``cpus_per_replica`` (default: ``threads`` or 1)."""
    if not isinstance(replicas_per_gpu, int) or replicas_per_gpu < 1:
        raise ValueError(f"replicas per GPU must be an integer >= 1, got {replicas_per_gpu!r}")
    slots = config.engine.batch_size
    cuda = _on_gpus(config)
    resources: dict[str, Any] = (
        {"num_gpus": gpu_share(replicas_per_gpu), "num_cpus": cpus_per_replica or 1}
        if cuda
        else {"num_cpus": cpus_per_replica or threads or 1}
    )
    if threads:
        resources["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(threads)}}
    options: dict[str, Any] = {
        "name": "SttReplica",
        "max_ongoing_requests": slots + HTTP_HEADROOM,
        "ray_actor_options": resources,
        "request_router_config": _router_config(),
        "graceful_shutdown_timeout_s": config.shutdown_timeout + 5,
        "health_check_period_s": 2.0,
    }
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas
    return serve.deployment(SttReplica).options(**options).bind(config, threads)


def autoscaling_config(min_replicas: int, max_replicas: int, slots: int) -> dict[str, Any]:
    """Serve's autoscaling config for replicas of ``slots`` slots, between ``min_replicas``
    and ``max_replicas``: it aims at 3/4 of each replica's slots in use (room for a burst
    while a new replica loads), adds a replica after 10 s above that and removes one after
    5 min below (a removed replica drains: its sessions end with their last words)."""
    return {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "initial_replicas": min_replicas,
        "target_ongoing_requests": max(1.0, 0.75 * slots),
        "upscale_delay_s": 10.0,
        "downscale_delay_s": 300.0,
    }


def gpu_share(replicas_per_gpu: int) -> float:
    """The GPU each of ``replicas_per_gpu`` replicas asks for: 1/K rounded down to Ray's
    resource unit (1/10000), so that K of them always fit one GPU."""
    return math.floor(10_000 / replicas_per_gpu) / 10_000


def _on_gpus(config: ServerConfig) -> bool:
    """Whether replicas take a GPU each: ``cuda`` asked, or ``auto`` on a cluster with GPUs."""
    device = config.engine.device
    has_gpus = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    return device == "cuda" or (device == "auto" and has_gpus)


def cpu_share(replicas: int) -> int:
    """CPUs (and torch threads) for each of ``replicas`` CPU replicas: the cluster's CPUs split
    evenly, at most one node's (a replica runs on one node), at least one."""
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    if not nodes:
        return 1
    return max(1, min(int(sum(nodes) // max(replicas, 1)), int(max(nodes))))


def app_builder(args: dict[str, Any]) -> Any:
    """For ``serve run`` / ``serve deploy``: ``args`` holds ``serve_args`` (the flags of
    ``dsm-stt serve``, as a list), and ``replicas``, ``autoscaling_config``, ``threads``,
    ``replicas_per_gpu``."""
    from ..cli import _server_config, build_parser

    parsed = build_parser().parse_args(["serve", *args.get("serve_args", [])])
    config = _server_config(parsed)
    replicas = int(args.get("replicas", 1))
    autoscaling = args.get("autoscaling_config")
    threads = args.get("threads")
    if threads is None and ray.is_initialized() and not _on_gpus(config):
        threads = cpu_share(replicas if autoscaling is None else autoscaling.get("max_replicas", 1))
    return deployment(
        config,
        replicas=replicas,
        autoscaling=autoscaling,
        threads=threads,
        replicas_per_gpu=args.get("replicas_per_gpu", 1),
    )


def ray_config(
    serve_args: list[str],
    replicas: int,
    threads: int | None,
    host: str,
    port: int,
    autoscaling: dict[str, Any] | None = None,
    replicas_per_gpu: int = 1,
) -> str:
    """A Serve config file (YAML) that ``serve deploy`` accepts, for ``dsm-stt ray-config``."""
    import json

    app_args: dict[str, Any] = {"serve_args": serve_args, "replicas": replicas}
    if replicas_per_gpu != 1:
        app_args["replicas_per_gpu"] = replicas_per_gpu
    if threads:
        app_args["threads"] = threads
    if autoscaling is not None:
        app_args["autoscaling_config"] = autoscaling
    # JSON is YAML: no YAML writer needed, and the quoting is exact
    document = {
        "proxy_location": "EveryNode",
        "controller_options": CONTROLLER_OPTIONS,
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "dsm_stt.scale.serve:app_builder",
                "args": app_args,
            }
        ],
    }
    return json.dumps(document, indent=2) + "\n"


def start(
    config: ServerConfig,
    replicas: int | None,
    address: str | None = None,
    autoscaling: dict[str, Any] | None = None,
    threads: int | None = None,
    init_options: dict[str, Any] | None = None,
    replicas_per_gpu: int = 1,
) -> None:
    """Connect to Ray (``address``; None: start a local one), start Serve's proxy on the
    config's host and port, deploy and wait until every replica is up."""
    if not ray.is_initialized():
        ray.init(address=address, **(init_options or {}))
    if threads is None and not _on_gpus(config):
        most = replicas if autoscaling is None else autoscaling.get("max_replicas", 1)
        threads = cpu_share(most or 1)
    serve.start(
        http_options={"host": config.host, "port": config.port},
        controller_options=CONTROLLER_OPTIONS,  # the proxies a new Serve starts load it
    )
    serve.run(
        deployment(
            config, replicas, autoscaling, threads=threads, replicas_per_gpu=replicas_per_gpu
        ),
        name=APP_NAME,
        route_prefix="/",
        blocking=False,
    )


def stop(drain_timeout: float = 30.0) -> None:
    """Drain every replica's sessions (up to ``drain_timeout`` seconds), then delete the
    application and the slot board."""
    try:
        board = ray.get_actor(BOARD_NAME, namespace=BOARD_NAMESPACE)
    except Exception:
        board = None
    if board is not None:
        with contextlib.suppress(Exception):
            ray.get(board.drain.remote(), timeout=5)
            deadline = time.monotonic() + drain_timeout
            while time.monotonic() < deadline:
                view = cluster_view(ray.get(board.read.remote(), timeout=5))
                if view["drained"]:  # every live replica has finished its sessions
                    break
                time.sleep(STATS_PERIOD_S)
    with contextlib.suppress(Exception):
        serve.delete(APP_NAME)
    if board is not None:
        with contextlib.suppress(Exception):
            ray.kill(board)


def run(
    config: ServerConfig,
    replicas: int | None,
    address: str | None = None,
    autoscaling: dict[str, Any] | None = None,
    threads: int | None = None,
    replicas_per_gpu: int = 1,
) -> int:
    """``dsm-stt serve --ray``: serve until SIGINT/SIGTERM, then drain and tear down."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        start(config, replicas, address, autoscaling, threads, replicas_per_gpu=replicas_per_gpu)
    except Exception as exc:
        log.error("Ray Serve did not start: %s", exc)
        stop()
        return 1
    log.info(
        "serving on http://%s:%d through Ray Serve (%s replicas); GET /api/cluster for slots",
        config.host,
        config.port,
        replicas if autoscaling is None else "autoscaling",
    )
    done.wait()
    log.info("stopping: replicas finish their sessions")
    stop(config.shutdown_timeout)
    return 0


def replace_engine(config: ServerConfig, **changes: Any) -> ServerConfig:
    """``config`` with engine settings changed (tests size replicas with it)."""
    return config.replace(engine=dataclasses.replace(config.engine, **changes))
