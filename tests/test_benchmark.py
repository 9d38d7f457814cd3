"""Tests of dsm_stt.benchmark: the fields of a run, how they relate, and the CLI's JSON."""

from __future__ import annotations

import json

import pytest
from engine_support import KERNELS_PROBLEM, make_engine, needs_kernels

from dsm_stt.benchmark import run_benchmark
from dsm_stt.cli import main
from dsm_stt.config import EngineConfig
from dsm_stt.cpu.plan import choose
from dsm_stt.model.synthetic import random_model


def test_a_run_splits_the_step_and_times_the_output() -> None:
    engine = make_engine(random_model("tiny", seed=0), 2)
    result = run_benchmark(engine, steps=3, warmup=1)
    assert (result.model, result.batch_size, result.steps) == ("tiny (random weights)", 2, 3)
    assert (result.device, result.dtype, result.quantize) == ("cpu", "float32", "none")
    assert result.w8a8_kernel is None
    assert 0 < result.lm_ms <= result.output_ms <= result.step_ms  # the LM comes first
    # each step: lm <= output <= total and mimi <= total - lm; medians keep the first three
    assert 0 < result.mimi_ms <= result.step_ms
    assert result.host_ms >= 0
    assert result.realtime_streams == pytest.approx(2 * 80.0 / result.step_ms, rel=1e-3)
    assert result.kv_mb_per_stream > 0 and result.peak_rss_mb > 0
    assert "tokens out after" in result.summary()
    assert engine._pending is None  # every timed step was finished
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        run_benchmark(engine, steps=0)


def test_a_run_times_sessions_as_far_in_as_the_context_fill() -> None:
    engine = make_engine(random_model("tiny", seed=0), 2)
    assert run_benchmark(engine, steps=2, warmup=1).context_fill == 1.0
    lm, mimi = engine.state.lm, engine.state.mimi.kv
    # a full ring, then the warm-up step and two timed steps
    assert lm.positions.tolist() == [lm.context + 3] * 2
    assert mimi.positions.tolist() == [mimi.context + 6] * 2  # two positions per frame
    result = run_benchmark(engine, steps=2, warmup=1, context_fill=0.5)
    assert result.context_fill == 0.5
    assert lm.positions.tolist() == [round(lm.context / 2) + 3] * 2
    with pytest.raises(ValueError, match="--context-fill must be within 0..1, got 1.5"):
        run_benchmark(engine, steps=1, context_fill=1.5)


def test_cli_json_has_the_documented_fields(capsys: pytest.CaptureFixture[str]) -> None:
    args = "bench --random-weights --model tiny --device cpu --batch-size 3 --steps 2 --json"
    args += " --exact"
    assert main([*args.split(), "--warmup", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("step_ms", "mimi_ms", "lm_ms", "realtime_streams", "device", "dtype"):
        assert key in result
    assert result["batch_size"] == 3 and result["peak_rss_mb"] > 0
    assert result["lm_ms"] <= result["output_ms"] <= result["step_ms"]
    assert result["context_fill"] == 1.0
    assert main([*args.split(), "--context-fill", "0.25"]) == 0
    assert json.loads(capsys.readouterr().out)["context_fill"] == 0.25
    assert main([*args.split(), "--context-fill", "2"]) != 0
    assert "--context-fill must be within 0..1" in capsys.readouterr().err
    assert result["kv_cache"] == "float" and result["quantize"] == "none"
    assert result["dtype"] == "float32" and "the float path" in result["path"]


def test_cli_takes_the_auto_path_by_default_and_names_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = "bench --random-weights --model tiny --device cpu --steps 1 --warmup 0 --json"
    assert main(args.split()) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    plan = choose(EngineConfig(batch_size=1, device="cpu"))
    assert (result["quantize"], result["kv_cache"]) == (plan.quantize, plan.kv_cache)
    assert result["dtype"] == str(plan.dtype).removeprefix("torch.")
    assert result["w8a8_kernel"] == plan.w8a8_kernel
    assert result["path"] == plan.describe()
    assert f"dsm-stt: engine: {plan.describe()}" in captured.err  # the one line at start
    if KERNELS_PROBLEM is None and plan.family in ("amx", "avx512_vnni", "avx512", "avx2"):
        assert plan.quantize == "w8a8" and plan.kv_cache == "int8"


@needs_kernels
def test_cli_runs_with_an_int8_kv_cache(capsys: pytest.CaptureFixture[str]) -> None:
    args = "bench --random-weights --model tiny --device cpu --steps 2 --warmup 1 --json"
    args += " --dtype float32 --quantize none"
    assert main([*args.split(), "--kv-cache", "float"]) == 0
    floats = json.loads(capsys.readouterr().out)
    assert main([*args.split(), "--kv-cache", "int8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kv_cache"] == "int8" and result["step_ms"] > 0
    assert result["kv_mb_per_stream"] < floats["kv_mb_per_stream"]  # int8 rows, float32 ring
    assert result["fused_layers"] is False and floats["fused_layers"] is False  # no w8a8
    w8a8 = choose(EngineConfig(batch_size=1, device="cpu", quantize="w8a8", kv_cache="int8"))
    if w8a8.w8a8_kernel in ("amx", "vnni"):  # this package's kernels: one call per layer
        base = args.replace("--quantize none", "--quantize w8a8").split()
        assert main([*base, "--kv-cache", "int8"]) == 0
        fused = json.loads(capsys.readouterr().out)
        assert fused["fused_layers"] is True and fused["w8a8_kernel"] == w8a8.w8a8_kernel
        assert main([*base, "--kv-cache", "float"]) == 0  # a float ring: modules
        assert json.loads(capsys.readouterr().out)["fused_layers"] is False
