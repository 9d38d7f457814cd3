"""``FreeSlotsRouter``: Ray Serve sends each new request to the replica with the most free slots.

A replica's slots are its engine's batch; each open WebSocket holds one for its whole life and
is one of the replica's ongoing requests in Serve's books. Serve's default router (power of two
choices) compares the ongoing requests of two random replicas: with equal slot counts that is
nearly the same answer, but two random picks can miss the one free replica of many, and it
does not know that replicas differ in size (a GPU's 64 slots beside a CPU's 8). This router
ranks every replica by free slots: ``total_slots`` from the replica's routing stats
(``SttReplica.record_routing_stats``, refreshed every few seconds) minus the larger of what the
replica last reported in use and the requests this router has in flight to it (exact and
immediate: it counts up on sending, down on completion). Serve then probes the first rank and
falls back to the next ones; a replica at ``max_ongoing_requests`` is skipped by Serve itself.

``RequestRouter`` is marked alpha in Ray Serve; the ``ray`` extra pins the Ray version it was
tested with, and ``serve.py`` falls back to Serve's default router when this import fails.
Deliberately not here: locality (a speech stream is one request; the ingress hop dominates) and
model multiplexing (one model per deployment).
"""

from __future__ import annotations

import time
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

__all__ = ["FreeSlotsRouter", "free_slots"]


def free_slots(stats: dict, in_flight: int, capacity: int | None = None) -> float:
    """A replica's free slots from its routing stats and this router's in-flight count. A
    replica that has not reported yet (it has just started: Serve routes only to replicas
    that are up) counts as ``capacity`` slots (its ``max_ongoing_requests`` less the HTTP
    headroom) with this router's requests in use; without ``capacity``, as empty but
    unsized: behind any replica known to have a slot."""
    total = stats.get("total_slots")
    if total is None:
        if capacity is None:
            return 0.5 - in_flight
        return float(capacity - in_flight)
    used = max(int(stats.get("used_slots", 0)), in_flight)
    return float(int(total) - used)


class FreeSlotsRouter(RequestRouter):
    """Ranks replicas by free slots, most first, one replica per rank.

    Serve routes a burst of requests concurrently, and its own queue-length cache is
    overwritten by what replicas report, which lags the requests just sent. So this router
    counts for itself: a slot is reserved on the replica it ranks first (until that replica is
    sent a request, or ``RESERVATION_S`` has passed and the choice went unused), and each sent
    request counts as open until Serve says it completed (``on_request_completed`` fires for
    rejected and failed requests too).
    """

    RESERVATION_S = 2.0

    def initialize_state(self, headroom: int | None = None, **kwargs: Any) -> None:
        """``headroom``: requests a replica takes beyond its slots (``request_router_kwargs``),
        which sizes a replica that has not reported its slots yet."""
        super().initialize_state(**kwargs)
        self._dsm_headroom = headroom

    def _capacity(self, replica: RunningReplica) -> int | None:
        headroom = getattr(self, "_dsm_headroom", None)
        if headroom is None:
            return None
        return max(int(replica.max_ongoing_requests) - int(headroom), 0)

    def _books(self) -> tuple[dict[Any, list[float]], dict[Any, int]]:
        if not hasattr(self, "_dsm_reserved"):
            self._dsm_reserved: dict[Any, list[float]] = {}
            self._dsm_open: dict[Any, int] = {}
        now = time.monotonic()
        for replica_id, stamps in list(self._dsm_reserved.items()):
            stamps[:] = [t for t in stamps if now - t < self.RESERVATION_S]
            if not stamps:
                del self._dsm_reserved[replica_id]
        return self._dsm_reserved, self._dsm_open

    def in_flight(self, replica_id: Any) -> int:
        """Requests this router has open on a replica, plus its reservations there."""
        reserved, open_ = self._books()
        return open_.get(replica_id, 0) + len(reserved.get(replica_id, ()))

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []

        def score(replica: RunningReplica) -> float:
            return free_slots(
                replica.routing_stats or {},
                self.in_flight(replica.replica_id),
                self._capacity(replica),
            )

        ranked = sorted(candidate_replicas, key=score, reverse=True)
        reserved, _ = self._books()
        reserved.setdefault(ranked[0].replica_id, []).append(time.monotonic())
        return [[replica] for replica in ranked]

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)
        reserved, open_ = self._books()
        stamps = reserved.get(replica_id)
        if stamps:
            stamps.pop(0)
        open_[replica_id] = open_.get(replica_id, 0) + 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        _, open_ = self._books()
        if open_.get(replica_id, 0) > 0:
            open_[replica_id] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        reserved, open_ = self._books()
        reserved.pop(replica_id, None)
        open_.pop(replica_id, None)
