"""``dsm_stt.scale`` over two Ray nodes: a head and a worker node started on this machine by
Ray's own ``cluster_utils`` (two raylets, one CPU each), so each replica of the tiny talkative
model runs on its own node, and Serve runs a proxy on each node (the worker's on a port of its
own, since both share this machine's addresses). Sessions enter through both proxies at once;
each one reaches a replica on either node, gets its words, and the slot board sees both
nodes. The kill test of a lost replica runs on one node in ``test_ray_serve.py``.

Marked ``slow`` (some 40 s); ``.ci/run`` runs it after the default suite. Skipped, with the
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

from engine_support import exact_config  # noqa: E402
from server_support import (  # noqa: E402
    free_port,
    reference_words,
    silence,
    speechlike,
    transcribe_session,
    write_talkative_checkpoint,
    write_wav,
)

from dsm_stt.scale import serve as ray_serve  # noqa: E402
from dsm_stt.server.config import ServerConfig  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SLOTS = 8


class TwoNodes:
    def __init__(self, checkpoint: Path) -> None:
        from ray.cluster_utils import Cluster

        self.checkpoint = checkpoint
        self.head_port, self.worker_port = free_port(), free_port()
        memory = 100 * 2**20
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "object_store_memory": memory,
                "include_dashboard": False,
            },
        )
        # the worker node's proxy listens on its own port (Serve reads this on worker nodes)
        env = {"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(self.worker_port)}
        self.cluster.add_node(num_cpus=1, object_store_memory=memory, env_vars=env)
        ray.init(
            address=self.cluster.address,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}},
        )
        config = ServerConfig(
            model=str(checkpoint), host="127.0.0.1", port=self.head_port, log_level="warning"
        ).replace(engine=exact_config(batch_size=SLOTS))
        ray_serve.start(config, replicas=2, threads=1)
        self.view = self.wait_for(lambda v: v["ready_replicas"] == 2, "both replicas ready")

    def http(self, port: int) -> str:
        return f"http://127.0.0.1:{port}"

    def wait_for(self, condition, what: str, timeout: float = 90.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                view = httpx.get(f"{self.http(self.head_port)}/api/cluster", timeout=10).json()
                if condition(view):
                    return view
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.3)

    def close(self) -> None:
        ray_serve.stop()
        serve.shutdown()
        ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    checkpoint = write_talkative_checkpoint(tmp_path_factory.mktemp("talkative") / "ckpt")
    running = TwoNodes(checkpoint)
    try:
        yield running
    finally:
        running.close()


def test_each_node_has_a_replica_and_a_proxy(nodes: TwoNodes) -> None:
    replicas = [r for r in nodes.view["replicas"] if not r["lost"]]
    assert len({r["node"] for r in replicas}) == 2  # one replica per node
    proxies = serve.status().proxies
    assert len(proxies) == 2 and all(str(s).endswith("HEALTHY") for s in proxies.values())
    # both proxies answer the cluster routes, with the same cluster
    for port in (nodes.head_port, nodes.worker_port):
        (module,) = httpx.get(f"{nodes.http(port)}/api/modules_info", timeout=10).json()
        assert module["total_slots"] == str(2 * SLOTS)
        health = httpx.get(f"{nodes.http(port)}/health", timeout=10).json()
        assert health["ready_replicas"] == 2


def test_sessions_through_both_proxies_reach_both_nodes(nodes: TwoNodes, tmp_path: Path) -> None:
    pcms = [
        np.concatenate([silence(0.5), speechlike(2.0, 120 + i), silence(1.0)]) for i in range(8)
    ]
    files = [write_wav(tmp_path / f"{i}.wav", pcm) for i, pcm in enumerate(pcms)]
    solo = [reference_words(nodes.checkpoint, [f], SLOTS)[0] for f in files]
    together = reference_words(nodes.checkpoint, files, SLOTS)
    before = {r["replica"]: r["sessions_served"] for r in nodes.view["replicas"]}
    ports = [nodes.head_port, nodes.worker_port] * 4  # four sessions through each proxy

    async def main() -> list[list]:
        return list(
            await asyncio.gather(
                *(
                    transcribe_session(f"ws://127.0.0.1:{port}/api/asr-streaming", pcm, pace=0.02)
                    for port, pcm in zip(ports, pcms, strict=True)
                )
            )
        )

    results = asyncio.run(main())  # every session got Ready
    for i, words in enumerate(results):
        # its solo run, or (at one of the tiny model's near-ties) its run beside the others
        assert words in (solo[i], together[i]), i
    view = nodes.wait_for(
        lambda v: (
            sum(r["sessions_served"] - before.get(r["replica"], 0) for r in v["replicas"]) == 8
        ),
        "the replicas' posts to catch up",
    )
    served = {r["node"]: r["sessions_served"] - before[r["replica"]] for r in view["replicas"]}
    print("sessions per node:", served)
    assert len(served) == 2 and all(n > 0 for n in served.values())  # both nodes served
