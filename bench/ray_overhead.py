"""Overhead of the Ray Serve path against a direct connection, measured in the same run.

Starts a direct ``dsm-stt serve`` process and a local Ray Serve deployment of the same model
(``--replicas``, one by default) behind Serve's HTTP proxy, then opens ``--connections``
sessions one after another on each, alternating direct and Ray so that both see the same
machine load. Each session:

* **connect**: from opening the WebSocket to its ``Ready`` message;
* **step**: streams ``--seconds`` of speech-like audio as 80 ms frames paced by the wall clock
  (``--pace`` times real time); the k-th ``Step`` the server sends answers the k-th frame, and
  its latency is ``recv(Step k) - send(frame k)``;
* **word**: ``recv(Word) - send(frame holding the word's start_time)``, for the words the
  model sent while streaming (this includes the model's own text delay, the same on both
  paths: compare the difference, not the absolute figure);
* **flush**: from sending ``Flush`` after the last frame to ``Flushed``.

It prints median and p90 of each, for both paths, with the Ray/direct ratio and difference;
``--json`` prints one object instead.

The model is the tests' talkative checkpoint (a tiny random model whose words follow the audio:
``tests/server_support.py``) with ``--exact --batch-size 8``, or ``--serve "ARGS"`` (the flags
of ``dsm-stt serve``, without ``--host``/``--port``). Ray is started locally and kept small
(``--num-cpus`` 2, a 200 MiB object store); both servers run ``--threads`` torch threads.

    python bench/ray_overhead.py --connections 20
    python bench/ray_overhead.py --serve "--model kyutai/stt-1b-en_fr" --threads 4 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from server_support import (
    FRAME,
    SAMPLE_RATE,
    audio_msg,
    bench_load,
    connect,
    free_port,
    pack,
    silence,
    speechlike,
    write_talkative_checkpoint,
)

FRAME_SECONDS = FRAME / SAMPLE_RATE
TIMEOUT = 60.0


async def one_session(url: str, pcm: np.ndarray, pace: float) -> dict[str, Any]:
    """One session's figures, in seconds."""
    loop = asyncio.get_running_loop()
    frames = [pcm[i : i + FRAME] for i in range(0, pcm.size - FRAME + 1, FRAME)]
    sent: list[float] = []
    steps: list[float] = []
    words: list[tuple[float, float]] = []  # (receive time, start_time)
    t_open = loop.time()
    async with await connect(url) as ws:
        first = msgpack.unpackb(await asyncio.wait_for(ws.recv(), TIMEOUT))
        if first["type"] != "Ready":
            raise RuntimeError(f"not Ready: {first}")
        ready = loop.time() - t_open
        flush_sent = float("inf")

        async def send() -> None:
            nonlocal flush_sent
            t0 = loop.time()
            for k, frame in enumerate(frames):
                delay = t0 + k * pace * FRAME_SECONDS - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent.append(loop.time())
                await ws.send(audio_msg(frame))
            flush_sent = loop.time()
            await ws.send(pack({"type": "Flush", "id": 1}))

        async def receive() -> float:
            while True:
                msg = msgpack.unpackb(await asyncio.wait_for(ws.recv(), TIMEOUT))
                now = loop.time()
                if msg["type"] == "Step":
                    steps.append(now)
                elif msg["type"] == "Word" and msg["text"].strip() and now < flush_sent:
                    words.append((now, msg["start_time"]))
                elif msg["type"] == "Error":
                    raise RuntimeError(f"server error: {msg['message']}")
                elif msg["type"] == "Flushed":
                    return now

        _, flushed = await asyncio.gather(send(), receive())
    n = min(len(steps), len(sent))
    word_lat = []
    for recv_time, start in words:
        k = min(int(start / FRAME_SECONDS), len(sent) - 1)
        word_lat.append(recv_time - sent[k])
    return {
        "connect": [ready],
        "step": [steps[k] - sent[k] for k in range(n)],
        "word": word_lat,
        "flush": [flushed - flush_sent],
    }


def stats(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    a = np.asarray(values) * 1000.0
    return {
        "n": int(a.size),
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p90_ms": round(float(np.percentile(a, 90)), 2),
    }


class RayDeployment:
    """The same server on a local Ray Serve, its proxy on a free loopback port."""

    def __init__(
        self, serve_args: list[str], replicas: int, threads: int, num_cpus: int, env: dict
    ) -> None:
        from dsm_stt.cli import _server_config, build_parser
        from dsm_stt.scale import serve as ray_serve

        self.port = free_port()
        self.http = f"http://127.0.0.1:{self.port}"
        args = [*serve_args, "--host", "127.0.0.1", "--port", str(self.port)]
        config = _server_config(
            build_parser().parse_args(["serve", *args, "--log-level", "warning"])
        )
        self.url = f"ws://127.0.0.1:{self.port}{config.path}"
        started = time.monotonic()
        ray_serve.start(
            config,
            replicas=replicas,
            threads=threads,
            init_options={
                "num_cpus": num_cpus,
                "object_store_memory": 200 * 2**20,
                "include_dashboard": False,
                "log_to_driver": False,
                "runtime_env": {"env_vars": env},
            },
        )
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                view = httpx.get(f"{self.http}/api/cluster", timeout=5.0).json()
                if view.get("ready_replicas") == replicas:
                    break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the Ray replicas were not ready after 300 s")
            time.sleep(0.2)
        self.startup_s = time.monotonic() - started

    def stop(self) -> None:
        import ray
        from ray import serve

        from dsm_stt.scale import serve as ray_serve

        with contextlib.suppress(Exception):
            ray_serve.stop(10.0)
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{'figure':<22}{'direct':>10}{'ray':>10}{'ray/direct':>12}{'ray-direct':>12}",
    ]
    for name in ("connect", "step", "word", "flush"):
        d, r = report["direct"][name], report["ray"][name]
        for q in ("p50_ms", "p90_ms"):
            if d.get(q) is None or r.get(q) is None:
                lines.append(f"{name + ' ' + q:<22}{'-':>10}{'-':>10}")
                continue
            ratio = r[q] / d[q] if d[q] > 0 else None
            lines.append(
                f"{name + ' ' + q:<22}{d[q]:>10.1f}{r[q]:>10.1f}"
                f"{(f'{ratio:.2f}x' if ratio is not None else '-'):>12}{r[q] - d[q]:>+12.1f}"
            )
    lines.append(
        f"(n: connect {report['direct']['connect']['n']}, "
        f"words direct {report['direct']['word']['n']} / ray {report['ray']['word']['n']}; "
        f"Ray start-up {report['ray_startup_s']:.1f} s)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", metavar="ARGS", help="dsm-stt serve flags (default: tiny)")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--connections", type=int, default=20, help="sessions on each path")
    parser.add_argument("--seconds", type=float, default=2.0, help="audio per session")
    parser.add_argument("--pace", type=float, default=1.0, help="x real time between frames")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server")
    parser.add_argument("--num-cpus", type=int, default=2, help="the local Ray's CPUs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.serve is None:
        checkpoint = write_talkative_checkpoint(Path(tempfile.mkdtemp()) / "ckpt")
        serve_args = ["--model", str(checkpoint), "--exact", "--batch-size", "8"]
        env["HF_HUB_OFFLINE"] = "1"
    else:
        serve_args = shlex.split(args.serve)
    pcm = np.concatenate([silence(0.5), speechlike(args.seconds, seed=3)])

    direct = bench_load.ServedProcess(serve_args, 300.0, env=dict(os.environ, **env))
    ray_dep = None
    sys.stdout.flush()
    stdout = os.dup(1)
    os.dup2(2, 1)  # what Ray's processes print goes to stderr: stdout holds the report only
    try:
        ray_dep = RayDeployment(serve_args, args.replicas, args.threads, args.num_cpus, env)
        figures: dict[str, dict[str, list[float]]] = {
            side: {k: [] for k in ("connect", "step", "word", "flush")}
            for side in ("direct", "ray")
        }

        async def measure() -> None:
            for url in (direct.url, ray_dep.url):  # a warm-up session each, not counted
                await one_session(url, pcm, args.pace)
            for _ in range(args.connections):
                for side, url in (("direct", direct.url), ("ray", ray_dep.url)):
                    for key, values in (await one_session(url, pcm, args.pace)).items():
                        figures[side][key].extend(values)

        asyncio.run(measure())
    finally:
        if ray_dep is not None:
            ray_dep.stop()
        direct.stop()
        sys.stdout.flush()
        os.dup2(stdout, 1)
        os.close(stdout)

    report: dict[str, Any] = {
        "connections": args.connections,
        "seconds": args.seconds,
        "pace": args.pace,
        "replicas": args.replicas,
        "threads": args.threads,
        "serve_args": args.serve or "talkative tiny checkpoint --exact --batch-size 8",
        "ray_startup_s": round(ray_dep.startup_s, 1),
    }
    for side in ("direct", "ray"):
        report[side] = {k: stats(v) for k, v in figures[side].items()}
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
