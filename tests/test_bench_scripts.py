"""Tests of the measuring scripts under bench/ that have no module of their own: the batch ×
precision sweep and the logit-agreement report, run end to end on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from engine_support import KERNELS_PROBLEM

from dsm_stt.config import EngineConfig
from dsm_stt.cpu.plan import choose
from dsm_stt.cpu.quantize import w8a8_kernels

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_script(name: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(BENCH / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_sweep_builds_each_precision_apart() -> None:
    report = run_script(
        "sweep.py",
        *("--model", "tiny", "--random-weights", "--device", "cpu"),
        *("--batch-sizes", "1,8", "--steps", "1", "--warmup", "1", "--json"),
        *("--precisions", "bfloat16+w8a8,float32+int8,bfloat16"),
    )
    rows = [(r["precision"], r["batch_size"], r["dtype"], r["quantize"]) for r in report["results"]]
    # run from the most to the least precise, and a precision run after a quantized one
    # gets unquantized weights
    assert rows == [
        ("float32+int8", 1, "float32", "int8"),
        ("float32+int8", 8, "float32", "int8"),
        ("bfloat16", 1, "bfloat16", "none"),
        ("bfloat16", 8, "bfloat16", "none"),
        ("bfloat16+w8a8", 1, "bfloat16", "w8a8"),
        ("bfloat16+w8a8", 8, "bfloat16", "w8a8"),
    ]
    assert all(r["step_ms"] > 0 and r["realtime_streams"] > 0 for r in report["results"])
    # each batch size runs the w8a8 kernel the engine picks for it (a new build if it differs)
    kernels = [(r["batch_size"], r["w8a8_kernel"]) for r in report["results"]]
    assert kernels[:4] == [(1, None), (8, None)] * 2
    picked = [
        (b, choose(EngineConfig(batch_size=b, device="cpu", quantize="w8a8")).w8a8_kernel)
        for b in (1, 8)
    ]
    assert kernels[4:] == picked


def test_agreement_compares_every_variant_with_float32() -> None:
    report = run_script(
        "agreement.py", "--model", "tiny", "--random-weights", "--steps", "6", "--json"
    )
    variants = report["variants"]
    assert report["steps"] == 6
    assert {"bfloat16", "bfloat16+int8", "float32+int8"} <= set(variants)
    kernels = w8a8_kernels()
    assert {f"bfloat16+w8a8 ({k})" for k in kernels} <= set(variants)
    if KERNELS_PROBLEM is None:
        assert {"bfloat16, int8 KV", *(f"bfloat16+w8a8 ({k}), int8 KV" for k in kernels)} <= set(
            variants
        )
    assert any(name.startswith("auto (cpu") for name in variants)
    for result in variants.values():
        assert 0 < result["max_abs_dlogit"] < 1.0
        assert 0 <= result["mean_abs_dlogit"] <= result["max_abs_dlogit"]
        assert 0 <= result["argmax_agreement"] <= 1
    words = report["words"]
    assert words["steps"] == 6 and 0 <= words["step_agreement"] <= 1
    assert words["same_words"] == (words["wer_auto_vs_exact"] == 0)
    mimi = report["mimi"]
    if mimi is not None:  # the compiled Mimi (AVX2 machines): its codes against the float path
        assert mimi["frames"] == 6 and 0.99 <= mimi["code_agreement"] <= 1


def test_soak_holds_a_long_session_and_churn() -> None:
    """The soak script, briefly: a session of 36 s of audio sent as fast as the server takes
    it, then 4 clients churning for 6 s; nothing lost, every slot back."""
    report = run_script(
        "soak.py", "--hours", "0.01", "--churn-minutes", "0.1", "--sessions", "4", "--json"
    )
    long = report["long_session"]
    assert long["error"] is None and long["audio_hours"] == 0.01
    assert long["words"] > 20 and long["timestamps_monotonic"] and long["within_audio"]
    churn = report["churn"]
    assert churn["finished"] > 4 and churn["mismatch"] == 0
    assert churn["used_slots_after"] == 0
    assert churn["rss_mib_by_minute"] and churn["rss_mib_by_minute"][0] > 0


def load_bench_module(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_third_party_reads_the_scripts_output_and_judges_each_client() -> None:
    """bench/third_party.py without the third-party repositories: what Kyutai's and Unmute's
    file scripts print is read back into (text, start) pairs, and a run is judged on them."""
    tp = load_bench_module("third_party")
    kyutai_stdout = (
        "hello  two words \n\n"
        "   1.00 -   1.20  hello\n"
        "   1.50 -   1.50  \n"
        "  12.34 -  13.00  two words\n"
    )
    assert tp.parse_kyutai(kyutai_stdout) == [("hello", 1.0), ("", 1.5), ("two words", 12.34)]
    assert tp.parse_kyutai("hello") == []  # cut off before its table: no words
    unmute_stdout = (
        "NEWSAPI_API_KEY is not set.\n"
        "type='Word' text='hello' start_time=1.0\n"
        "type='Word' text=\"it's\" start_time=2.1234\n"
    )
    assert tp.parse_unmute(unmute_stdout) == [("hello", 1.0), ("it's", 2.12)]

    expected = [("hello", 1.0), ("it's", 2.12)]
    same = {"exit_code": 0, "disconnected": False} | tp.compare(expected, expected)
    assert tp.verdict(same) == []
    short = {"exit_code": 1, "disconnected": True} | tp.compare(expected[:1], expected)
    assert short["first_difference"] == {"index": 1, "got": None, "expected": ["it's", 2.12]}
    assert tp.verdict(short) == ["exit code 1", "disconnected", "1 words printed, 2 expected"]
    moved = tp.compare([("hello", 1.0), ("it's", 2.2)], expected)
    assert not moved["equal"] and moved["first_difference"]["index"] == 1
    nothing = {"exit_code": 0, "disconnected": False} | tp.compare([], [])
    assert tp.verdict(nothing) == ["the solo run heard no words: nothing to compare"]


def test_third_party_names_a_missing_package_before_starting_anything(tmp_path: Path) -> None:
    script = tmp_path / "scripts" / "stt_from_file_rust_server.py"
    script.parent.mkdir()
    script.write_text("import numpy\nimport a_package_nobody_installed\n")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "third_party.py"), "--dsm-repo", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "missing package providing 'a_package_nobody_installed'" in proc.stderr
    assert proc.stdout == ""  # no server was started, no summary printed


@pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="bench/ray_overhead.py needs Ray Serve: pip install 'dsm-stt[ray]'",
)
def test_ray_overhead_measures_both_paths() -> None:
    """bench/ray_overhead.py, briefly: one session on each path after the warm-up; every
    figure is there for both, and both paths heard as many words (same model, same audio)."""
    report = run_script("ray_overhead.py", "--connections", "1", "--seconds", "0.5", "--json")
    for side in ("direct", "ray"):
        assert report[side]["connect"]["n"] == 1 and report[side]["flush"]["n"] == 1
        assert report[side]["step"]["n"] > 5
        assert all(report[side][k]["p50_ms"] > 0 for k in ("connect", "step", "flush"))
    assert report["direct"]["word"]["n"] == report["ray"]["word"]["n"]


def test_protocol_decode_times_both_paths_on_the_same_samples() -> None:
    report = run_script("protocol_decode.py", "--frames", "20", "--rounds", "1", "--json")
    # the script exits non-zero unless both paths decode the frames to their samples
    for key in ("float32_frame_us", "float32_frame_general_us", "float64_frame_us"):
        assert report[key] > 0
