"""``dsm_stt.scale`` on Serve's autoscaling: a local Ray (two CPUs) and a deployment of the tiny
talkative model that Serve grows from one replica to two under load and shrinks back when the
load goes, the replica it removes finishing its sessions (last words, close 1001) instead of
having them cut when Serve's grace period runs out.

Marked ``slow`` (about 40 s); ``.ci/run`` runs it after the default suite. Skipped, with the
reason, where Ray Serve is not installed.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="needs Ray Serve: pip install 'dsm-stt[ray]'")
serve = pytest.importorskip("ray.serve", reason="needs Ray Serve: pip install 'dsm-stt[ray]'")

import websockets  # noqa: E402
from engine_support import exact_config  # noqa: E402
from server_support import (  # noqa: E402
    connect,
    events,
    free_port,
    recv,
    reference_words,
    send_frames,
    silence,
    speechlike,
    words_of,
    write_talkative_checkpoint,
    write_wav,
)

from dsm_stt.scale import serve as ray_serve  # noqa: E402
from dsm_stt.server.config import ServerConfig  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SLOTS = 8
INIT = {
    "num_cpus": 2,
    "object_store_memory": 200 * 2**20,
    "include_dashboard": False,
    "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}},
}


class Cluster:
    """Where the deployment listens, and its cluster view."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/api/asr-streaming"
        self.http = f"http://127.0.0.1:{self.port}"
        self.config = ServerConfig(
            model=str(checkpoint), host="127.0.0.1", port=self.port, log_level="warning"
        ).replace(engine=exact_config(batch_size=SLOTS))

    def wait_for(self, condition, what: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                view = httpx.get(f"{self.http}/api/cluster", timeout=10.0).json()
                if condition(view):
                    return view
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    checkpoint = write_talkative_checkpoint(tmp_path_factory.mktemp("talkative") / "ckpt")
    try:
        yield Cluster(checkpoint)
    finally:
        ray_serve.stop()
        serve.shutdown()
        ray.shutdown()


def test_autoscaling_adds_a_replica_under_load_and_drains_the_one_it_removes(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A deployment on Serve's autoscaling (1 to 2 replicas, 2 sessions per replica as the
    target). Five open sessions bring up a second replica; a newcomer goes to it (the most
    free slots); when the five leave, Serve removes the newer replica, which drains: the
    newcomer gets its last words and close 1001, not a cut when the grace period runs out."""
    from server_support import FRAME

    autoscaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "initial_replicas": 1,
        "target_ongoing_requests": 2,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 1.0,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 1.0,
    }
    ray_serve.start(
        cluster.config, replicas=None, autoscaling=autoscaling, threads=1, init_options=INIT
    )
    cluster.wait_for(lambda v: v["ready_replicas"] == 1, "the first replica")
    pcm = np.concatenate([silence(0.5), speechlike(2.5, 22)])
    (expected,) = reference_words(cluster.checkpoint, [write_wav(tmp_path / "x.wav", pcm)], SLOTS)

    async def newcomer(ready: asyncio.Event) -> tuple[list, int | None, float]:
        async with await connect(cluster.url) as ws:
            assert (await recv(ws))["type"] == "Ready"
            await send_frames(ws, pcm)  # no Flush: the drain says the last words
            msgs: list[dict] = []
            while len([m for m in msgs if m["type"] == "Step"]) < pcm.size // FRAME:
                msgs.append(await recv(ws))
            ready.set()
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    msgs.append(await recv(ws, timeout=60))
            close = ws.protocol.close_rcvd
            return words_of(events(msgs)), None if close is None else close.code, time.monotonic()

    async def main() -> tuple[list, int | None, float, dict, dict]:
        loop = asyncio.get_running_loop()
        holders = [await connect(cluster.url) for _ in range(5)]
        assert [(await recv(ws))["type"] for ws in holders] == ["Ready"] * 5
        up = await loop.run_in_executor(
            None, lambda: cluster.wait_for(lambda v: v["ready_replicas"] == 2, "a second replica")
        )
        ready = asyncio.Event()
        late = asyncio.ensure_future(newcomer(ready))
        await asyncio.wait_for(ready.wait(), 30)
        placed = await loop.run_in_executor(
            None,
            lambda: cluster.wait_for(
                lambda v: (
                    sorted(r["open_sessions"] for r in v["replicas"] if not r["lost"]) == [1, 5]
                ),
                "the newcomer alone on the added replica (the five on the first)",
                timeout=10,
            ),
        )
        for ws in holders:
            await ws.close()
        left = time.monotonic()
        words, code, closed = await asyncio.wait_for(late, 90)
        down = await loop.run_in_executor(
            None,
            lambda: cluster.wait_for(lambda v: v["live_replicas"] == 1, "back to one", 30),
        )
        return words, code, closed - left, {"up": up, "placed": placed}, down

    words, code, after, views, down = asyncio.run(main())
    print(f"the newcomer was drained {after:.1f} s after the others left")
    placed = {r["replica"]: r["open_sessions"] for r in views["placed"]["replicas"]}
    # the replica Serve removed is the newcomer's (newest first), the five's stays
    assert [r["replica"] for r in down["replicas"] if not r["lost"]] == [
        k for k, n in placed.items() if n == 5
    ]
    assert expected == words  # its last words came out
    assert code == 1001  # going away: the replica was removed, the session was not cut
    assert down["total_slots"] == SLOTS
