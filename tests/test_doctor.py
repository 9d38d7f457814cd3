"""Tests of dsm_stt.doctor and the CLI's start-up contract: the report's parts (with and
without the kernels, never building them), the Hugging Face cache listing, ``--exact``,
``--version`` and ``python -m dsm_stt``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dsm_stt.cli import main
from dsm_stt.config import EngineConfig
from dsm_stt.cpu.features import detect
from dsm_stt.cpu.kernels import build


def fake_hub_cache(root: Path, repo: str) -> None:
    """A Hugging Face cache holding one snapshot of ``repo`` (the hub's on-disk layout)."""
    folder = root / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / "abc").write_text("{}")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to("../../blobs/abc")


def test_doctor_reports_what_a_bug_report_needs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from huggingface_hub import constants

    fake_hub_cache(tmp_path, "kyutai/stt-1b-en_fr-candle")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    # nothing built or cached: the doctor must not compile (it loads a cached build only)
    monkeypatch.setattr(build, "_compile", lambda progress: pytest.fail("doctor built"))
    monkeypatch.setattr(build, "_built", [])
    monkeypatch.setattr(build, "cached", lambda: False)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    device = EngineConfig().torch_device().type
    for part in (
        "dsm-stt 0.1.0",
        "torch ",
        "CUDA: ",
        f"CPU family: {detect().family.name}",
        "C++ compiler: ",
        "CPU kernels: ",
        f"auto at 1 slot(s): {device} (",
        "auto at 8 slot(s): ",
        f"Hugging Face cache: {tmp_path}",
    ):
        assert part in out, part
    assert "model kyutai/stt-1b-en_fr-candle: " in out  # the cache listing
    assert "model kyutai/stt-1b-en_fr-candle: in the cache" in out
    assert "  why: " in out
    assert main(["doctor", "--model", "kyutai/stt-2.6b-en"]) == 0
    assert "model kyutai/stt-2.6b-en: not in the cache" in capsys.readouterr().out


def test_doctor_in_the_no_kernel_mode(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DSM_STT_KERNELS", "off")
    monkeypatch.setattr(build, "_built", [])
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "CPU kernels: unavailable: the compiled CPU kernels are off (DSM_STT_KERNELS=off)" in out
    assert "DSM_STT_KERNELS=off" in out
    assert "int8 KV cache" not in out.split("auto at 1 slot(s):")[1].splitlines()[0]
    assert main(["doctor", "--build"]) == 0
    assert "cannot be built: the compiled CPU kernels are off" in capsys.readouterr().err


def test_exact_is_the_float_path_and_refuses_contradictions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["bench", "--random-weights", "--model", "tiny", "--steps", "1", "--warmup", "0"]
    assert main([*args, "--exact"]) == 0
    captured = capsys.readouterr()
    assert "float32" in captured.out and "the float path, as asked" in captured.err
    assert main([*args, "--exact", "--quantize", "w8a8"]) == 2
    assert "--exact runs --quantize none; it cannot take --quantize w8a8" in capsys.readouterr().err


def test_version_and_module_entry_point() -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    proc = subprocess.run(
        [sys.executable, "-m", "dsm_stt", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "dsm-stt 0.1.0"
