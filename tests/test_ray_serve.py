"""``dsm_stt.scale``: the server on Ray Serve, two CPU replicas of the tiny talkative model behind
Serve's ingress, on a local Ray started by the test. Sessions spread over both replicas by free
slots and get the words their solo runs get; a replica killed mid-stream ends its own sessions
with a close that says so, the other's finish, and newcomers go to the survivor. And a
corpus on Ray Data: the local command's outputs byte for byte, resume, failures reported.

Skipped, with the reason, where Ray Serve is not installed (``pip install "dsm-stt[ray]"``).
"""

from __future__ import annotations

import asyncio
import contextlib
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
    pack,
    recv,
    recv_until,
    reference_words,
    send_frames,
    silence,
    speechlike,
    transcribe_session,
    words_of,
    write_talkative_checkpoint,
    write_wav,
)

from dsm_stt.scale import serve as ray_serve  # noqa: E402
from dsm_stt.scale.proxy import LOST_MESSAGE  # noqa: E402
from dsm_stt.server.config import ServerConfig  # noqa: E402

pytestmark = pytest.mark.timeout(240)

SLOTS = 8  # per replica: 16 sessions fill both


def test_a_corpus_on_ray_data_gives_the_local_outputs_resumes_and_reports_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Runs before the Serve tests (its own Ray: Serve's replicas would hold every CPU)."""
    pytest.importorskip("ray.data", reason="needs Ray Data: pip install 'dsm-stt[ray]'")
    from dsm_stt.cli import main

    checkpoint = write_talkative_checkpoint(tmp_path / "ckpt")
    inputs = tmp_path / "in"
    inputs.mkdir()
    files = [
        str(write_wav(inputs / f"{i:02d}.wav", np.concatenate([silence(0.5), speechlike(1.0, i)])))
        for i in range(20)
    ]
    bad = inputs / "broken.wav"
    bad.write_bytes(b"RIFF but not audio")
    common = ["--model", str(checkpoint), "--exact", "--batch-size", "4", "--format", "json"]
    assert main(["transcribe", *common, "-o", str(tmp_path / "local"), *files]) == 0
    ray.init(
        num_cpus=2,
        object_store_memory=200 * 2**20,
        include_dashboard=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}},
    )
    try:
        capsys.readouterr()
        on_ray = ["transcribe", *common, "--ray", "--replicas", "1", "-o", str(tmp_path / "ray")]
        assert main([*on_ray, *files, str(bad)]) == 1  # one file failed: said, not dropped
        err = capsys.readouterr().err
        assert "retrying 1 failed file(s) (attempt 2 of 2)" in err
        assert f"failed: {bad}" in err
        assert "20 written, 0 skipped, 1 failed" in err
        assert "x realtime" in err
        for name in sorted(os.listdir(tmp_path / "local")):
            local = (tmp_path / "local" / name).read_bytes()
            assert (tmp_path / "ray" / name).read_bytes() == local, name
        assert len(os.listdir(tmp_path / "ray")) == 20
        # resume: a finished output is skipped, a removed one is done again
        os.remove(tmp_path / "ray" / "07.json")
        assert main([*on_ray, *files]) == 0
        assert "1 written, 19 skipped, 0 failed" in capsys.readouterr().err
        assert (tmp_path / "ray" / "07.json").read_bytes() == (
            tmp_path / "local" / "07.json"
        ).read_bytes()
    finally:
        ray.shutdown()


class Cluster:
    """The Serve deployment on a local Ray, and what the tests read from it."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/api/asr-streaming"
        self.http = f"http://127.0.0.1:{self.port}"
        self.config = config = ServerConfig(
            model=str(checkpoint), host="127.0.0.1", port=self.port, log_level="warning"
        ).replace(engine=exact_config(batch_size=SLOTS))
        ray_serve.start(
            config,
            replicas=2,
            threads=1,
            init_options={
                "num_cpus": 2,
                "object_store_memory": 200 * 2**20,
                "include_dashboard": False,
                "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}},
            },
        )
        self.wait_for(lambda view: view["ready_replicas"] == 2, "both replicas ready")

    def view(self) -> dict:
        return httpx.get(f"{self.http}/api/cluster", timeout=10.0).json()

    def live(self) -> dict[str, dict]:
        return {r["replica"]: r for r in self.view()["replicas"] if not r["lost"]}

    def wait_for(self, condition, what: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                view = self.view()
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


def signals(count: int, seconds: float, first_seed: int) -> list[np.ndarray]:
    return [
        np.concatenate([silence(0.5), speechlike(seconds, first_seed + i), silence(1.0)])
        for i in range(count)
    ]


class Outcomes(list):
    """The words a signal may get: its solo run, or its run beside the other signals. The
    exact path's matrix products round by the number of rows (PyTorch's GEMM picks its
    blocking by it), and the tiny model's near-ties turn that into a word here and there (on a
    2-core AMD EPYC with AVX2 one signal of 16 loses its last word beside others), so a
    session whose neighbours change every step may get either; equality is membership."""

    def __eq__(self, other: object) -> bool:
        return other in list(self)

    __hash__ = None  # type: ignore[assignment]


def expected_words(cluster: Cluster, pcms: list[np.ndarray], directory: Path) -> list[Outcomes]:
    """Each signal's solo run (alone in a batch of ``SLOTS``: what a session alone on a
    replica gets) and its run beside the others (all of them through ``SLOTS`` slots)."""
    files = [write_wav(directory / f"{i}.wav", pcm) for i, pcm in enumerate(pcms)]
    solo = [reference_words(cluster.checkpoint, [f], SLOTS)[0] for f in files]
    together = reference_words(cluster.checkpoint, files, SLOTS)
    return [Outcomes([s, t]) for s, t in zip(solo, together, strict=True)]


def test_sessions_spread_over_both_replicas_by_free_slots(
    cluster: Cluster, tmp_path: Path, record_property
) -> None:
    pcms = signals(16, 2.0, first_seed=40)
    expected = expected_words(cluster, pcms, tmp_path)
    before = {k: r["sessions_served"] for k, r in cluster.live().items()}

    async def main() -> list[list]:
        return list(
            await asyncio.gather(*(transcribe_session(cluster.url, pcm, pace=0.02) for pcm in pcms))
        )

    results = asyncio.run(main())  # every session got Ready: none met "no free channels"
    # each session's words are its solo run's (or, at a near-tie, its run beside others)
    assert all(expected[i] == words for i, words in enumerate(results)), results
    view = cluster.wait_for(
        lambda v: (
            sum(r["sessions_served"] for r in v["replicas"] if not r["lost"]) - sum(before.values())
            == 16
        ),
        "the replicas' posts to catch up",
    )
    served = {
        r["replica"]: r["sessions_served"] - before[r["replica"]]
        for r in view["replicas"]
        if not r["lost"]
    }
    assert all(r["rss_mib"] > 0 for r in view["replicas"] if not r["lost"])  # memory, too
    record_property("sessions_per_replica", served)
    print("sessions per replica:", served)
    # 16 at once over 2 x 8 slots: only an even split leaves nobody refused
    assert sorted(served.values()) == [SLOTS, SLOTS]
    # the moshi-server answer sums the cluster
    (module,) = httpx.get(f"{cluster.http}/api/modules_info", timeout=10).json()
    assert module["total_slots"] == str(2 * SLOTS)
    assert {r["replica"] for r in module["replicas"]} == set(served)
    assert httpx.get(f"{cluster.http}/health", timeout=10).json()["ready_replicas"] == 2
    metrics = httpx.get(f"{cluster.http}/metrics", timeout=10).text
    for replica, count in served.items():
        line = f'asr_cluster_sessions_served{{replica="{replica}"}} '
        assert any(x.startswith(line) for x in metrics.splitlines()), replica
        assert count > 0


def test_file_routes_go_through_the_ingress(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The OpenAI file route answers through Serve what ``dsm-stt transcribe`` says."""
    from dsm_stt.cli import main

    wav = write_wav(tmp_path / "file.wav", signals(1, 2.0, first_seed=90)[0])
    capsys.readouterr()
    assert main(["transcribe", "--model", str(cluster.checkpoint), "--exact", str(wav)]) == 0
    local = capsys.readouterr().out
    answer = httpx.post(
        f"{cluster.http}/v1/audio/transcriptions",
        files={"file": ("file.wav", wav.read_bytes(), "audio/wav"), "model": (None, "whisper-1")},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["text"].split() == local.split()
    assert local.split()  # the talkative model says something


def test_a_realtime_session_goes_through_the_ingress(cluster: Cluster, tmp_path: Path) -> None:
    """OpenAI's Realtime transcription WebSocket through Serve: one commit, the item's
    transcript the words of the same audio's solo run."""
    import base64
    import json

    pcm = signals(1, 2.0, first_seed=95)[0]
    (expected,) = expected_words(cluster, [pcm], tmp_path)
    audio = np.round(pcm * 32768).clip(-32768, 32767).astype("<i2").tobytes()
    url = f"ws://127.0.0.1:{cluster.port}/v1/realtime?intent=transcription"

    async def main() -> list[dict]:
        async def event(ws: websockets.ClientConnection) -> dict:
            return json.loads(await asyncio.wait_for(ws.recv(), 30))

        async with websockets.connect(url, proxy=None, max_size=None) as ws:
            assert (await event(ws))["type"] == "session.created"
            session = {"type": "transcription", "audio": {"input": {"turn_detection": None}}}
            await ws.send(json.dumps({"type": "session.update", "session": session}))
            assert (await event(ws))["type"] == "session.updated"
            for i in range(0, len(audio), 9600):
                chunk = base64.b64encode(audio[i : i + 9600]).decode()
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            seen = []
            while not seen or not seen[-1]["type"].endswith("transcription.completed"):
                seen.append(await event(ws))
            return seen

    seen = asyncio.run(main())
    assert [e for e in seen if e["type"] == "error"] == []
    transcript = seen[-1]["transcript"]
    assert transcript  # the talkative model says something
    assert Outcomes(" ".join(w[0] for w in words) for words in expected) == transcript


def test_no_free_channels_only_when_every_replica_is_full(cluster: Cluster) -> None:
    async def main() -> tuple[dict, list[dict]]:
        held = [await connect(cluster.url) for _ in range(2 * SLOTS)]
        try:
            firsts = [await recv(ws) for ws in held]
            async with await connect(cluster.url) as extra:
                refused = await recv(extra)
            return refused, firsts
        finally:
            for ws in held:
                await ws.close()

    refused, firsts = asyncio.run(main())
    assert [m["type"] for m in firsts] == ["Ready"] * 2 * SLOTS  # every slot of both replicas
    assert refused == {"type": "Error", "message": "no free channels"}  # moshi-server's answer
    cluster.wait_for(lambda v: v["used_slots"] == 0, "the slots to be free again")


def test_without_request_router_serve_default_router_is_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "dsm_stt.scale.router", None)  # import fails
    config = ray_serve._router_config()
    assert "FreeSlotsRouter" not in str(config.request_router_class)
    assert config.request_routing_stats_period_s == ray_serve.STATS_PERIOD_S
    monkeypatch.undo()
    config = ray_serve._router_config()
    assert "FreeSlotsRouter" in str(config.request_router_class)
    assert config.request_router_kwargs == {"headroom": ray_serve.HTTP_HEADROOM}


async def streamed(url: str, pcm: np.ndarray, pace: float) -> dict:
    """One session that may be cut: its words so far, its messages (those the server sent
    before closing included), and how it ended."""
    msgs: list[dict] = []
    async with await connect(url) as ws:
        assert (await recv(ws))["type"] == "Ready"
        sender = asyncio.ensure_future(send_frames(ws, pcm, pace=pace))
        try:
            while not sender.done():
                with contextlib.suppress(asyncio.TimeoutError):
                    msgs.append(await recv(ws, timeout=0.1))
            await sender
            await ws.send(pack({"type": "Flush", "id": 1}))
            msgs += await recv_until(ws, "Flushed", id=1)
        except websockets.ConnectionClosed:
            with contextlib.suppress(websockets.ConnectionClosed, asyncio.TimeoutError):
                while True:  # what came before the close frame
                    msgs.append(await recv(ws, timeout=5.0))
            return {
                "cut": True,
                "words": words_of(events(msgs)),
                "close": ws.protocol.close_rcvd,
                "messages": msgs,
            }
        finally:
            sender.cancel()
    return {"cut": False, "words": words_of(events(msgs)), "close": None, "messages": msgs}


def replica_actor(unique_id: str) -> object:
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith("SERVE_REPLICA::") and entry["name"].endswith(unique_id):
            return ray.get_actor(entry["name"], namespace=entry["namespace"])
    raise AssertionError(f"no actor for replica {unique_id}")


def test_a_killed_replica_ends_its_sessions_and_newcomers_go_to_the_other(
    cluster: Cluster, tmp_path: Path
) -> None:
    pcms = signals(4, 4.0, first_seed=60)
    fresh = signals(4, 1.5, first_seed=80)
    expected = expected_words(cluster, pcms + fresh, tmp_path)

    async def main() -> tuple[list[dict], list[list], str, int]:
        tasks = [asyncio.ensure_future(streamed(cluster.url, pcm, pace=0.06)) for pcm in pcms]
        loop = asyncio.get_running_loop()
        view = await loop.run_in_executor(
            None,
            lambda: cluster.wait_for(
                lambda v: (
                    sorted(r.get("used_slots", 0) for r in v["replicas"] if not r["lost"]) == [2, 2]
                ),
                "two sessions on each replica",
                timeout=20,
            ),
        )
        victim = next(r["replica"] for r in view["replicas"] if not r["lost"])
        ray.kill(replica_actor(victim), no_restart=True)
        # newcomers while the victim is gone: every one is served (by the survivor)
        newcomers = await asyncio.gather(
            *(transcribe_session(cluster.url, pcm, delay=0.5) for pcm in fresh)
        )
        return list(await asyncio.gather(*tasks)), list(newcomers), victim, 2

    results, newcomers, victim, on_victim = asyncio.run(main())
    cut = [r for r in results if r["cut"]]
    whole = [(i, r) for i, r in enumerate(results) if not r["cut"]]
    assert len(cut) == on_victim  # the victim's sessions, and only those, were cut
    for r in cut:
        print(
            "a cut session ended with",
            r["close"],
            [m for m in r["messages"] if m["type"] == "Error"],
        )
        # the ingress says so: moshi-server's Error, then close 1011 "replica lost" (never
        # the 1000 of a session that ended well, nor the bare drop Serve's proxy alone gives)
        assert r["messages"][-1] == {"type": "Error", "message": LOST_MESSAGE}
        assert (r["close"].code, r["close"].reason) == (1011, "replica lost")
        assert not any(m["type"] == "Flushed" for m in r["messages"])
    for i, r in whole:
        assert expected[i] == r["words"]  # the survivor's sessions ran to the end
    assert len(newcomers) == len(fresh)
    assert all(expected[len(pcms) + i] == w for i, w in enumerate(newcomers))
    live = cluster.wait_for(lambda v: True, "a view")["replicas"]
    assert all(r["lost"] for r in live if r["replica"] == victim)


def test_free_slots_ranks_by_what_a_replica_has_free() -> None:
    from dsm_stt.scale.router import free_slots

    # the larger of the replica's report and this proxy's open requests counts as used
    assert free_slots({"total_slots": 8, "used_slots": 3}, 1) == 5
    assert free_slots({"total_slots": 8, "used_slots": 1}, 3) == 5
    assert free_slots({"total_slots": 64, "used_slots": 60}, 0) == 4  # sizes differ
    assert free_slots({"total_slots": 8, "used_slots": 8}, 0) == 0
    # not reported yet (just started): as many free as its size from max_ongoing_requests,
    # less what this proxy has sent it
    assert free_slots({}, 0, capacity=8) == 8
    assert free_slots({}, 3, capacity=8) == 5
    # of unknown size: behind any replica known to have a slot, ahead of full ones
    unknown = free_slots({}, 0)
    assert free_slots({"total_slots": 8, "used_slots": 7}, 0) > unknown > 0


def test_ray_config_is_a_serve_config_that_builds_the_deployment(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import json
    import subprocess
    import sys

    flags = ["--model", "kyutai/stt-1b-en_fr", "--batch-size", "4", "--queue-timeout", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "dsm_stt", "ray-config", "--replicas", "3", "--", *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    document = json.loads(done.stdout)
    (application,) = document["applications"]
    assert application["import_path"] == "dsm_stt.scale.serve:app_builder"
    assert application["args"] == {"serve_args": flags, "replicas": 3}
    assert document["http_options"] == {"host": "127.0.0.1", "port": 8080}
    built = ray_serve.app_builder(application["args"])
    replica = built._bound_deployment
    assert replica.num_replicas == 3
    assert replica.max_ongoing_requests == 4 + ray_serve.HTTP_HEADROOM
    (config, _threads) = built._bound_deployment.init_args
    assert config.engine.batch_size == 4 and config.queue_timeout == 2.0
    # Serve's own schema takes it, with the proxies' middleware (a lost replica's Error)
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(document)
    assert document["controller_options"] == ray_serve.CONTROLLER_OPTIONS
    # --max-replicas: Serve's autoscaling from --replicas up, on 3/4 of the slots
    from dsm_stt.cli import main

    capsys.readouterr()
    assert main(["ray-config", "--replicas", "2", "--max-replicas", "5", "--", *flags]) == 0
    (application,) = json.loads(capsys.readouterr().out)["applications"]
    scaling = application["args"]["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (2, 5)
    assert scaling["target_ongoing_requests"] == 3.0  # 3/4 of 4 slots
    built = ray_serve.app_builder(application["args"]).__dict__["_bound_deployment"]
    assert built._deployment_config.autoscaling_config.max_replicas == 5
    assert main(["ray-config", "--replicas", "3", "--max-replicas", "2"]) == 2
    refused = capsys.readouterr()
    assert "--max-replicas (2) must be at least --replicas (3)" in refused.err
    # --replicas-per-gpu K: in the file, and each replica of the built app asks for 1/K GPU
    on_cuda = ["--model", "kyutai/stt-1b-en_fr", "--device", "cuda"]
    assert main(["ray-config", "--replicas", "4", "--replicas-per-gpu", "4", "--", *on_cuda]) == 0
    (application,) = json.loads(capsys.readouterr().out)["applications"]
    assert application["args"] == {"serve_args": on_cuda, "replicas": 4, "replicas_per_gpu": 4}
    built = ray_serve.app_builder(application["args"]).__dict__["_bound_deployment"]
    assert built.ray_actor_options["num_gpus"] == 0.25 and built.num_replicas == 4
    assert main(["ray-config", "--replicas-per-gpu", "0"]) == 2
    assert "--replicas-per-gpu must be at least 1, got 0" in capsys.readouterr().err


def test_ray_is_imported_only_by_the_ray_paths() -> None:
    """``dsm-stt serve`` and ``transcribe`` without ``--ray`` never load Ray; the server
    package never imports the scale package (it sits on top, as the CLI does)."""
    import subprocess
    import sys

    code = (
        "import sys, dsm_stt.cli, dsm_stt.server.app, dsm_stt.transcriber\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith(('ray.', "
        "'dsm_stt.scale'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]"
    server = Path(ray_serve.__file__).parents[1] / "server"
    for path in sorted(server.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert "scale" not in {
            line.split()[1].lstrip(".").split(".")[0]
            for line in text.splitlines()
            if line.startswith(("from .", "from ..")) and len(line.split()) > 1
        }, path


def test_stopping_drains_every_replica_first(cluster: Cluster, tmp_path: Path) -> None:
    """Last in the module (it deletes the deployment): Serve alone would wait for the open
    WebSockets to end and then kill them; ``stop`` has each replica finish its sessions as
    ``dsm-stt serve`` does on SIGTERM: the last words, then close 1001."""
    import threading

    from server_support import FRAME

    # seeds whose words do not depend on what shares the batch (the tiny model's first word
    # for some others, 31 for one, flips with the batch's other rows by rounding)
    pcms = [np.concatenate([silence(0.5), speechlike(2.5, seed)]) for seed in (21, 22)]
    expected = expected_words(cluster, pcms, tmp_path)

    async def session(pcm: np.ndarray, ready: asyncio.Event) -> tuple[list, int | None]:
        async with await connect(cluster.url) as ws:
            assert (await recv(ws))["type"] == "Ready"
            await send_frames(ws, pcm)  # no trailing silence, no Flush
            msgs: list[dict] = []
            while len([m for m in msgs if m["type"] == "Step"]) < pcm.size // FRAME:
                msgs.append(await recv(ws))
            ready.set()
            with pytest.raises(websockets.ConnectionClosed) as info:
                while True:
                    msgs.append(await recv(ws))
            close = info.value.rcvd
            return words_of(events(msgs)), None if close is None else close.code

    async def main() -> list:
        ready = [asyncio.Event(), asyncio.Event()]
        tasks = [asyncio.ensure_future(session(p, r)) for p, r in zip(pcms, ready, strict=True)]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 30)
        threading.Thread(target=ray_serve.stop, args=(20.0,), daemon=True).start()
        return list(await asyncio.wait_for(asyncio.gather(*tasks), 30))

    results = asyncio.run(main())
    # the last words came out
    assert all(expected[i] == words for i, (words, _) in enumerate(results))
    assert [code for _, code in results] == [1001, 1001]  # "going away", not a dropped socket


def test_each_replica_asks_for_a_gpu_on_cuda_and_for_its_threads_on_cpu() -> None:
    """The resources a replica asks Ray for (no cluster needed: the bound deployment says);
    no GPU was run here, so this is what Ray is asked, not what a GPU does."""
    base = ServerConfig(model="kyutai/stt-1b-en_fr")
    on_cuda = ray_serve.replace_engine(base, device="cuda")
    built = ray_serve.deployment(on_cuda, replicas=4).__dict__["_bound_deployment"]
    assert built.ray_actor_options == {"num_gpus": 1, "num_cpus": 1}
    assert built.num_replicas == 4
    shared = ray_serve.deployment(on_cuda, replicas=6, replicas_per_gpu=3)
    assert shared.__dict__["_bound_deployment"].ray_actor_options["num_gpus"] == 0.3333
    # 1/K in Ray's unit of 1/10000, rounded down: K of them fit one GPU whatever K
    assert all(k * ray_serve.gpu_share(k) <= 1 for k in range(1, 200))
    with pytest.raises(ValueError, match="an integer >= 1, got 2.5"):
        ray_serve.app_builder({"serve_args": ["--device", "cuda"], "replicas_per_gpu": 2.5})
    with pytest.raises(ValueError, match="replicas per GPU must be an integer >= 1"):
        ray_serve.deployment(on_cuda, replicas_per_gpu=0)
    on_cpu = ray_serve.replace_engine(base, device="cpu")
    built = ray_serve.deployment(on_cpu, replicas=2, threads=3).__dict__["_bound_deployment"]
    assert built.ray_actor_options["num_cpus"] == 3 and "num_gpus" not in built.ray_actor_options
    assert built.ray_actor_options["runtime_env"] == {"env_vars": {"OMP_NUM_THREADS": "3"}}
