"""bench/load.py against real server processes: N real-time sessions, step lag, word latency,
and the server overhead read from the engine-time metric."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from server_support import bench_load, running_server, write_talkative_checkpoint

from dsm_stt.model.synthetic import random_lm, random_mimi, tiny_config, write_checkpoint

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def load() -> ModuleType:
    return bench_load


def run_json(load: ModuleType, capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert load.main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def finite(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def test_sessions_lag_words_and_overhead_against_a_running_server(
    load: ModuleType, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    checkpoint = write_talkative_checkpoint(tmp_path / "ckpt")
    args = ["--model", str(checkpoint), "--batch-size", "4", "--api-key", "k"]
    with running_server(args, tmp_path / "server.log") as server:
        out = run_json(
            load, capsys, "--url", server.url, "--api-key", "k", "--sessions", "1,2",
            "--seconds", "3",
        )  # fmt: skip
        metrics = server.get("/metrics").text

    frames = 3 * 24000 // 1920
    assert [run["sessions"] for run in out["runs"]] == [1, 2]
    for run in out["runs"]:
        assert run["errors"] == [] and run["ok_sessions"] == run["sessions"]
        assert run["frames_per_session"] == frames
        for session in run["session_results"]:
            # Ready, one Step per frame in order, the Flush answered.
            assert session["ready"] and session["error"] is None and session["flushed"]
            assert session["frames"] == session["steps"] == frames
            assert session["step_idx_increasing"]
        lag = run["lag_ms"]
        # Frames after the 1 s warm-up; a Step never comes before its frame was sent (an
        # off-by-one between Steps and frames would show as lags near -80 ms).
        assert lag["n"] == run["sessions"] * (frames - 12)
        assert all(finite(lag[k]) for k in ("min", "p50", "p95", "p99", "max"))
        assert 0 <= lag["min"] <= lag["p50"] <= lag["p99"] <= lag["max"]
        assert run["passed"] == (lag["p99"] < 80)
        # The talkative model says words: every session has a first word.
        assert run["word_latency_ms"]["n"] >= run["sessions"]
        assert run["first_word_latency_ms"]["n"] == run["sessions"]
        assert finite(run["word_latency_ms"]["p99"])
        # Server figures from /metrics.
        assert finite(run["overhead_ms"]) and run["overhead_ms"] >= 0
        assert 0 < run["engine_ms"] <= run["tick_ms"]
        assert run["steps_per_second"] > 0
    assert out["largest_passing_sessions"] in (None, 1, 2)
    for key in ("word_latency_ms", "first_word_latency_ms", "overhead_ms_per_step"):
        assert key in out
    assert out["overhead_at_sessions"] == 2 and finite(out["overhead_ms_per_step"])

    # The engine-time histogram: one observation per model step, nested in the tick.
    ticks = metric(metrics, "asr_model_step_duration_count")
    assert metric(metrics, "asr_engine_step_duration_count") == ticks > 0
    assert metric(metrics, "asr_model_steps_total") == ticks
    engine = metric(metrics, "asr_engine_step_duration_sum")
    assert 0 < engine <= metric(metrics, "asr_model_step_duration_sum")


def test_serve_starts_and_stops_its_own_server_and_a_range_doubles(
    load: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_json(
        load, capsys, "--serve", "--random-weights --model tiny --batch-size 2",
        "--sessions", "1..2", "--seconds", "1.5", "--warmup", "0.5",
    )  # fmt: skip
    assert out["server_command"][-4:-2] == ["--port", out["url"].split(":")[2].split("/")[0]]
    assert [run["sessions"] for run in out["runs"]] == [1, 2]
    assert all(run["errors"] == [] for run in out["runs"])
    assert load._healthy(load.http_base(out["url"])) is False  # stopped at the end


def test_sessions_spread_over_client_processes_are_measured_as_one_level(
    load: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_json(
        load, capsys, "--serve", "--random-weights --model tiny --batch-size 4",
        "--sessions", "3", "--clients", "2", "--seconds", "2", "--warmup", "0.5",
    )  # fmt: skip
    frames = 2 * 24000 // 1920
    (run,) = out["runs"]
    assert out["clients"] == 2 and run["clients"] == 2
    assert run["errors"] == [] and run["ok_sessions"] == 3
    assert len(run["session_results"]) == 3
    for session in run["session_results"]:
        assert session["ready"] and session["flushed"]
        assert session["frames"] == session["steps"] == frames
    # one lag per frame after the warm-up, from both processes, against one clock: a
    # process on another start time would show lags near ±80 ms × k or Steps before frames
    assert run["lag_ms"]["n"] == 3 * (frames - 6)
    assert 0 <= run["lag_ms"]["min"] <= run["lag_ms"]["max"] < 2000
    assert run["client_late_ms"]["n"] == 3 * frames
    assert run["steps_per_second"] > 0


@pytest.mark.parametrize("dies", ["first", "last"])
def test_a_client_process_that_dies_is_an_error_not_a_wait(
    load: ModuleType, monkeypatch: pytest.MonkeyPatch, dies: str
) -> None:
    real = load._client_process
    victim = 0 if dies == "first" else 1

    def client(conn, level, indices, parent_ends) -> None:
        if indices[0] == victim:  # 2 sessions over 2 processes: process i has session i
            os._exit(3)  # no word to the parent: an OOM kill, a segfault
        real(conn, level, indices, parent_ends)

    monkeypatch.setattr(load, "_client_process", client)
    level = load.Level("ws://127.0.0.1:1/x", None, 2, np.zeros((4, 1920), np.float32), 2, 0.08, 1)
    window = load.MetricsWindow("http://127.0.0.1:1", 2, 0.08, 0.1)
    with pytest.raises(RuntimeError, match=f"process {victim} died \\(exit code 3\\)"):
        load._run_processes(level, 2, window)


def test_a_model_without_vad_heads_gets_one_clear_reason(
    load: ModuleType, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cfg = tiny_config(vad=False)
    checkpoint = write_checkpoint(
        tmp_path / "novad", cfg, random_lm(cfg.lm, seed=0), random_mimi(cfg.mimi, seed=1)
    )
    args = ["--model", str(checkpoint), "--batch-size", "2"]
    with running_server(args, tmp_path / "server.log") as server:
        out = run_json(
            load,
            capsys,
            "--url",
            server.url,
            "--sessions",
            "1,2",
            "--seconds",
            "1.5",
            "--warmup",
            "0.5",
        )
    assert out["largest_passing_sessions"] is None
    for run in out["runs"]:
        assert run["errors"] == [
            "no Step messages: the model has no VAD heads (a -candle checkpoint has them), "
            "so step lag is unknown"
        ]
        assert run["passed"] is False


def test_session_counts(load: ModuleType) -> None:
    assert load.session_counts("1,16,64") == ([1, 16, 64], False)
    assert load.session_counts("1..64") == ([1, 2, 4, 8, 16, 32, 64], True)
    assert load.session_counts("3..20") == ([3, 6, 12, 20], True)
    for bad in ("", "0,1", "8..4", "x"):
        with pytest.raises(Exception, match="--sessions"):
            load.session_counts(bad)


def test_pace_stretches_the_clock_every_latency_is_measured_against(
    load: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    res = load.SessionResult(0, t0=10.0, period=2 * load.FRAME_SECONDS)  # --pace 2
    res.frames_sent = 2
    res.step_recv = [10.2, 10.35]  # frames 0 and 1 exist at 10.16 and 10.32
    res.words = [[10.5, 0.0, 0.16, "hi"]]  # ends 0.16 s into the audio: 10.32 on the wall
    assert res.lags(0.0) == pytest.approx([0.04, 0.03])
    assert res.word_latencies() == pytest.approx([0.18])
    with pytest.raises(SystemExit):
        load.main(["--url", "ws://127.0.0.1:1/x", "--pace", "0"])
    with pytest.raises(SystemExit):
        load.main(["--url", "ws://127.0.0.1:1/x", "--clients", "0"])
    assert "--pace must be between" in capsys.readouterr().err
