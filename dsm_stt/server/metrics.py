"""Prometheus metrics of one server instance, named as moshi-server names them (spec §5.8).

Owns ``ServerMetrics``: the counters, gauge and histograms, registered in a registry of their
own (one per app, so tests can build many apps in one process), and their text exposition.
Who increments what is decided by the runner (model steps) and the routes (connections).

Names: ``asr_connect`` (connections), ``asr_open_channels`` (sessions holding a slot),
``asr_model_step_duration`` (seconds per batched model step), ``asr_connection_num_steps``
(model steps per finished session), plus ``asr_model_steps`` (steps run),
``asr_engine_step_duration`` (the part of each model step spent in the engine call alone, so
that ``asr_model_step_duration`` minus it is the scheduler's host work per step),
``asr_rejected`` (sessions refused, by reason) and ``asr_file_slots_used`` (slots held by
file transcriptions). prometheus_client exposes counters with the conventional ``_total``
suffix (``asr_connect_total``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# moshi-server's step buckets are 20-80 ms; small models on CPU and big GPUs step faster, and a
# loaded CPU slower, so the range is widened on both sides.
STEP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.2, 0.5, 1.0)
SESSION_STEP_BUCKETS = (2, 10, 25, 50, 100, 250, 500, 1000, 2000, 4500, 15000, 45000)

# how late the event loop runs a timer: any lag holds every session's messages back
LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0)

REJECT_REASONS = ("unauthorized", "no_free_channels", "too_slow", "shutting_down")


class ServerMetrics:
    """The metrics of one app, in their own ``CollectorRegistry``."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.connect = Counter("asr_connect", "WebSocket connections accepted", registry=r)
        self.open_channels = Gauge(
            "asr_open_channels", "Sessions currently holding a slot", registry=r
        )
        self.step_duration = Histogram(
            "asr_model_step_duration",
            "Duration of one batched model step in seconds",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.engine_step_duration = Histogram(
            "asr_engine_step_duration",
            "Seconds of one batched model step spent in the engine call (Mimi, LM, sampling), "
            "without the scheduler's per-stream work",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.connection_steps = Histogram(
            "asr_connection_num_steps",
            "Model steps used by a finished session",
            buckets=SESSION_STEP_BUCKETS,
            registry=r,
        )
        self.steps = Counter("asr_model_steps", "Batched model steps run", registry=r)
        self.loop_lag = Histogram(
            "asr_event_loop_lag",
            "How late the event loop ran a 50 ms timer, in seconds",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.loop_lag_max = Gauge(
            "asr_event_loop_lag_max_seconds", "The worst event-loop lag since start", registry=r
        )
        self.accept_failures = Counter(
            "asr_accept_failures",
            "Connections the server could not accept (no file descriptor left)",
            registry=r,
        )
        self.file_slots = Gauge(
            "asr_file_slots_used",
            "Slots held by file transcriptions (both POST routes; --max-file-slots caps them)",
            registry=r,
        )
        self.rejected = Counter(
            "asr_rejected", "Sessions refused or dropped", ["reason"], registry=r
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)  # exported at 0 from the start

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric of this app."""
        return generate_latest(self.registry)
