"""The ``dsm-stt`` command as a user meets it: help and versions, inputs and weights checked before
the model loads, one line per error, outputs that never overwrite each other, and quiet output
when stderr is not a terminal. (The commands' results are tested beside their modules: transcribe
in test_transcriber, stream and mic in test_client, eval in test_evaluation.)"""

from __future__ import annotations

import argparse
import io
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_audio import encode
from test_transcriber import _write_wav

import dsm_stt.loading
from dsm_stt import __version__
from dsm_stt.cli import build_parser, main


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_flag_says_what_it_does_and_its_default() -> None:
    missing = []
    for name, command in _subcommands().items():
        for action in command._actions:
            if not action.option_strings or action.dest in ("help", "version"):
                continue
            text = action.help or ""
            if len(text) < 15 or "default" not in text.lower():
                missing.append(f"{name} {action.option_strings[0]}: {text!r}")
    assert not missing, "\n".join(missing)
    assert set(_subcommands()) >= {"transcribe", "eval", "serve", "stream", "mic", "bench"}


@pytest.mark.parametrize("command", [[], *([c] for c in _subcommands())])
def test_version_on_every_command(command: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        main([*command, "--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"dsm-stt {__version__}\n"


def test_python_dash_m() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dsm_stt", "eval", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout) == (0, f"dsm-stt {__version__}\n")


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model is a test failure: what is checked must be checked before it."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(dsm_stt.loading, "load_engine", refuse)


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty Hugging Face cache and HF_HUB_OFFLINE: no hub model can be had."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_bad_inputs_are_named_before_the_model_loads(
    no_model: None, offline_hub: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    video = tmp_path / "clip.mp4"
    video.write_bytes(encode(np.zeros((1, 0)), 48000, "aac", "mp4", video=True, audio=False))
    typo = tmp_path / "meeting.wva"
    start = time.perf_counter()
    assert main(["transcribe", str(typo), str(video)]) == 2
    assert time.perf_counter() - start < 1.0
    # one line each, and not a word about the model (that nobody could download here)
    assert capsys.readouterr().err.splitlines() == [
        f"dsm-stt: error: {typo}: no such file",
        f"dsm-stt: error: {video}: no audio stream (the file (MOV) holds 1 video stream (mpeg4))",
    ]


def test_weights_missing_offline_is_one_line_within_a_second(
    offline_hub: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    wav = _write_wav(tmp_path / "a.wav", 0.5, 16000, 0)
    start = time.perf_counter()
    assert main(["transcribe", str(wav)]) == 2
    assert time.perf_counter() - start < 1.0
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("dsm-stt: error: kyutai/stt-1b-en_fr-candle: 'config.json' is not in")
    assert f"Hugging Face cache ({offline_hub})" in line and "HF_HUB_OFFLINE is set" in line
    assert "`hf download kyutai/stt-1b-en_fr-candle`" in line


def test_output_dir_mirrors_same_stem_inputs(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = _write_wav(tmp_path / "a" / "x.wav", 1.0, 16000, 1)
    two = _write_wav(tmp_path / "b" / "x.wav", 1.5, 24000, 2)
    out = tmp_path / "out"
    args = ["transcribe", "--model", str(tiny_checkpoint), "--exact", "--format", "json"]
    assert main([*args, "--output-dir", str(out), str(one), str(two)]) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json"))
    assert written == ["a/x.json", "b/x.json"]
    durations = [json.loads((out / w).read_text())["duration"] for w in written]
    assert durations == pytest.approx([1.0, 1.5], abs=0.01)
    assert capsys.readouterr() == ("", "")  # stderr is no terminal here: quiet


def test_output_dir_refuses_two_inputs_for_one_name(
    no_model: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    wav = _write_wav(tmp_path / "talk.wav", 0.5, 16000, 0)
    flac = tmp_path / "talk.flac"
    flac.write_bytes(encode(np.zeros((1, 8000)), 16000, "flac", "flac"))
    out = tmp_path / "out"
    assert main(["transcribe", "--output-dir", str(out), str(wav), str(flac)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"dsm-stt: error: {wav} and {flac} would both be written to {out / 'talk.txt'}: "
        "rename one, or transcribe them in two runs with different --output-dir"
    )
    assert not out.exists()


def test_verbose_shows_the_loading_and_each_file_when_not_a_terminal(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    wav = _write_wav(tmp_path / "a.wav", 1.0, 16000, 0)
    base = ["transcribe", "--model", str(tiny_checkpoint), "--exact", str(wav)]
    assert main([*base, "--verbose"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"dsm-stt: loading {tiny_checkpoint} on cpu"
    assert err[1].startswith("dsm-stt: engine: cpu") and err[1].endswith("the float path, as asked")
    assert err[2].startswith(f"dsm-stt: {tiny_checkpoint} loaded in ")
    assert err[3].startswith(f"{wav}: 1.0 s of audio in ") and err[3].endswith("x real time")
    assert len(err) == 4
    assert main([*base, "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit):
        main([*base, "--quiet", "--verbose"])  # one or the other


def test_progress_line_on_a_terminal(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setenv("COLUMNS", "300")
    files = [_write_wav(tmp_path / f"{n}.wav", 1.0, 16000, n) for n in range(2)]
    assert main(["transcribe", "--model", str(tiny_checkpoint), "--exact", *map(str, files)]) == 0
    shown = term.getvalue()
    assert "\rtranscribing: " in shown and "% of 2.0 s audio, 0:0" in shown
    assert "ETA " in shown and "x real time, " in shown and "/2 files" in shown
    assert "\r\x1b[K2 files, 2.0 s of audio in 0:" in shown  # the batch's closing line
    assert "\r\x1b[K0.wav: 1.0 s of audio in " not in shown  # full paths, as given
    assert f"\r\x1b[K{files[0]}: 1.0 s of audio in " in shown


def test_serve_start_line_names_the_version(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import dsm_stt.server.app as app

    seen = {}

    def fake_serve(config: object, engine: object, torch_thread: object) -> int:
        seen["engine"] = engine
        torch_thread.shutdown()  # type: ignore[attr-defined]
        return 0

    monkeypatch.setattr(app, "serve", fake_serve)
    monkeypatch.setattr(app, "load_engine", lambda config: "an engine")
    with caplog.at_level(logging.INFO, logger="dsm_stt"):
        assert main(["serve", "--random-weights", "--model", "tiny", "--port", "8123"]) == 0
    assert seen == {"engine": "an engine"}
    assert (
        f"dsm-stt {__version__}: serving tiny on http://127.0.0.1:8123 (WebSocket "
        "/api/asr-streaming) once the model is loaded and warmed up" in caplog.text
    )


def test_ctrl_c_anywhere_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import dsm_stt.doctor

    def interrupted(model: str) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(dsm_stt.doctor, "report", interrupted)
    assert main(["doctor"]) == 130
    assert capsys.readouterr().err == "dsm-stt: interrupted\n"


def test_serve_on_a_taken_port_says_so_before_loading(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import socket

    import dsm_stt.server.app as app

    def refuse(config: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(app, "load_engine", refuse)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--random-weights", "--model", "tiny", "--port", str(port)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"dsm-stt: error: cannot listen on 127.0.0.1:{port}: Address already in use; another "
        "server runs there? pick another --port"
    )


def test_serve_without_the_weights_is_one_line(
    offline_hub: Path, capsys: pytest.CaptureFixture
) -> None:
    start = time.perf_counter()
    assert main(["serve", "--model", "kyutai/stt-2.6b-en", "--port", "0"]) == 2
    assert time.perf_counter() - start < 1.0
    (line,) = capsys.readouterr().err.splitlines()
    assert "HF_HUB_OFFLINE is set" in line and "`hf download kyutai/stt-2.6b-en`" in line


def test_serve_flags_set_the_server_limits() -> None:
    from dsm_stt.cli import _server_config, build_parser

    args = build_parser().parse_args(
        ["serve", "--max-buffered-seconds", "3", "--read-ahead-mb", "0", "--max-connections", "7"]
    )
    config = _server_config(args)
    assert (config.max_buffered_seconds, config.read_ahead_mb, config.max_connections) == (3, 0, 7)
    default = _server_config(build_parser().parse_args(["serve"]))
    assert (default.max_buffered_seconds, default.read_ahead_mb) == (10.0, 512.0)
    assert default.ws_compression is False
    assert _server_config(build_parser().parse_args(["serve", "--ws-compression"])).ws_compression


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-replicas", "3"], "--max-replicas and --address are for --ray"),
        (["--address", "auto"], "--max-replicas and --address are for --ray"),
        (["--replicas-per-gpu", "2"], "--replicas-per-gpu is for --ray"),
        (["--ray", "--ws-compression"], "--ws-compression does not apply with --ray"),
    ],
)
def test_ray_flags_without_ray_are_refused(
    flags: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["serve", *flags]) == 2
    assert message in capsys.readouterr().err


def test_cuda_graphs_are_the_default_on_cuda_with_greedy_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --[no-]cuda-graphs, an engine on CUDA (asked, or auto on a machine with one)
    with greedy decoding over a float KV cache replays captured steps; nothing else does."""
    import torch

    from dsm_stt.cli import _graphs_by_default, _server_config, build_parser
    from dsm_stt.config import EngineConfig

    def serve_graphs(*flags: str) -> bool:
        return _server_config(build_parser().parse_args(["serve", *flags])).engine.cuda_graphs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not serve_graphs() and not serve_graphs("--device", "auto")
    assert _graphs_by_default(EngineConfig(device="cuda"))  # asked for: no device needed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert serve_graphs() and serve_graphs("--device", "cuda")
    assert serve_graphs("--cuda-graphs")
    assert not serve_graphs("--no-cuda-graphs")
    assert not serve_graphs("--temperature", "0.5")
    assert not serve_graphs("--device", "cpu")
    assert not _graphs_by_default(EngineConfig(device="auto", kv_cache="int8"))
    bench = build_parser().parse_args(["bench", "--no-cuda-graphs"])
    assert bench.cuda_graphs is False
    assert build_parser().parse_args(["bench"]).cuda_graphs is None
