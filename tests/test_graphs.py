"""Tests of dsm_stt.engine.graphs: bucket sizes, captured steps that equal eager steps (slots
padded up to a bucket stay untouched), captures that leave the state as it was, and the
refusals. ``eager_capture`` drives the static buffers on CPU; on a CUDA machine the same checks
run with real CUDA graphs."""

from __future__ import annotations

import dataclasses
import gc
import warnings
import weakref

import numpy as np
import pytest
import torch

from dsm_stt.cli import main
from dsm_stt.config import EngineConfig
from dsm_stt.cpu.plan import Plan
from dsm_stt.engine.engine import Engine
from dsm_stt.engine.graphs import buckets_for, eager_capture
from dsm_stt.loading import build_engine, load_engine
from dsm_stt.model.synthetic import random_model
from dsm_stt.model.transformer import KVCache

FRAME = 1920


def tensors(obj: object) -> list[torch.Tensor]:
    """Every tensor of a (nested) state, in a fixed order; of a KV cache, the entries that can
    be read (the last ring entry is where inactive slots write their garbage)."""
    if isinstance(obj, KVCache):
        return [obj.keys[..., :-1, :], obj.values[..., :-1, :], obj.key_positions, obj.positions]
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, list | tuple):
        return [t for item in obj for t in tensors(item)]
    if dataclasses.is_dataclass(obj):
        return [t for f in dataclasses.fields(obj) for t in tensors(getattr(obj, f.name))]
    return []


def snapshot(engine: Engine) -> list[torch.Tensor]:
    return [t.detach().clone().cpu() for t in tensors(engine.state)]


def same_state(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def equivalent_state(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Integer state (positions, codes, tokens) equal; float state (caches, conv buffers)
    equal up to float32 rounding. A captured step computes the slots of its whole bucket, an
    eager one only those in use: the matrix kernels may order a dot product's sums by row
    count (seen on AVX2: 3e-8), each sum's rounding being at most K * 2^-24 of its terms
    (K <= 128 here, activations of order 1), so rtol 1e-5 / atol 1e-6 bound it with room."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x.is_floating_point():
            if not torch.allclose(x, y, rtol=1e-5, atol=1e-6):
                return False
        elif not torch.equal(x, y):
            return False
    return True


def engines(batch_size: int, device: str = "cpu") -> tuple[Engine, Engine]:
    config = EngineConfig(batch_size=batch_size, device=device, dtype="float32")
    return (
        Engine(random_model("tiny", seed=3), config),
        Engine(random_model("tiny", seed=3), config),
    )


def schedule(batch_size: int, steps: int, seed: int) -> list[tuple[np.ndarray, ...]]:
    """Steps whose used prefix varies (1, a non-bucket size, all slots), with resets and
    paused slots inside the prefix."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(steps):
        n = [1, 3, batch_size, 2, 3][i % 5]
        active = np.zeros(batch_size, bool)
        active[:n] = rng.random(n) < 0.8
        active[n - 1] = True
        reset = np.zeros(batch_size, bool)
        reset[:n] = (rng.random(n) < 0.15) | (i == 0)
        pcm = (0.3 * rng.standard_normal((batch_size, FRAME))).astype(np.float32)
        out.append((pcm, active, reset))
    return out


def test_buckets_are_powers_of_two_then_the_batch() -> None:
    assert buckets_for(1) == [1]
    assert buckets_for(5) == [1, 2, 4, 5]
    assert buckets_for(8) == [1, 2, 4, 8]


def check_captured_steps_equal_eager_steps(device: str, capture: object) -> None:
    eager, captured = engines(5, device)
    # some history first, so that the capture meets a state that is not all zeros
    for pcm, active, reset in schedule(5, 4, seed=1):
        eager.step(pcm, active, reset)
        captured.step(pcm, active, reset)
    before = snapshot(captured)
    assert captured.capture_steps(capture)  # type: ignore[arg-type]
    assert same_state(before, snapshot(captured))  # warm-up and capture changed nothing
    assert captured.graphs is not None and captured.graphs.buckets == [1, 2, 4, 5]
    for pcm, active, reset in schedule(5, 15, seed=2):
        marks: list[float] = []
        a = eager.step(pcm, active, reset)
        b = captured.step(pcm, active, reset, marks)
        assert len(marks) == 3  # after the LM, before and after Mimi
        assert a.tokens == b.tokens
        assert np.allclose(a.prs, b.prs, atol=1e-6)
    assert equivalent_state(snapshot(eager), snapshot(captured))


def test_captured_steps_equal_eager_steps() -> None:
    check_captured_steps_equal_eager_steps("cpu", eager_capture())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_steps_equal_eager_steps() -> None:
    check_captured_steps_equal_eager_steps("cuda", None)


def test_captures_run_with_the_collector_paused_after_one_collection() -> None:
    """A collection inside a capture could tear down an older engine's graphs, which CUDA
    refuses while a stream captures: the captures run after one collection, collector off."""
    engine = Engine(random_model("tiny", seed=0), EngineConfig(4, "cpu"))
    freed: list[str] = []

    class Garbage:
        pass

    cycle = Garbage()
    cycle.self = cycle  # only the cyclic collector frees it
    weakref.finalize(cycle, freed.append, "old")
    del cycle
    inner = eager_capture()
    states: list[bool] = []

    def watching(fn):
        states.append(gc.isenabled())
        assert freed == ["old"], "collected before the first capture"
        return inner(fn)

    assert gc.isenabled()
    engine.capture_steps(watching)
    assert states and not any(states)  # every capture (two per bucket) with the collector off
    assert len(states) == 2 * len(engine.graphs.buckets)
    assert gc.isenabled()  # back on afterwards


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_dead_engine_freed_during_capture_does_not_break_it() -> None:
    """The sweep's sequence on a GPU: an engine with graphs dropped into a reference cycle,
    then a new engine captures; its captures hold (no eager fallback warning)."""
    config = EngineConfig(batch_size=8, device="cuda", dtype="float32", cuda_graphs=True)
    old = Engine(random_model("tiny", seed=0), config)
    assert old.graphs is not None
    old.cycle = old
    del old
    thresholds = gc.get_threshold()
    gc.set_threshold(100, 1, 1)  # a full collection every 100 allocations, captures included
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            new = Engine(random_model("tiny", seed=1), dataclasses.replace(config, batch_size=16))
    finally:
        gc.set_threshold(*thresholds)
    assert new.graphs is not None


def test_refusals() -> None:
    engine = Engine(random_model("tiny", seed=0), EngineConfig(2, "cpu", temperature=0.7))
    with pytest.raises(ValueError, match="greedily"):
        engine.capture_steps(eager_capture())
    with pytest.raises(ValueError, match="CUDA"):
        Engine(random_model("tiny", seed=0), EngineConfig(2, "cpu")).capture_steps()


def test_the_option_is_refused_where_it_cannot_work(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="cuda device"):
        EngineConfig(cuda_graphs=True, device="cpu")
    with pytest.raises(ValueError, match="temperature"):
        EngineConfig(cuda_graphs=True, temperature=0.5)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA device"):
            build_engine(random_model("tiny", seed=0), EngineConfig(cuda_graphs=True))
        with pytest.raises(ValueError, match="CUDA device"):  # before looking for the model
            load_engine("no/such-model", EngineConfig(cuda_graphs=True))
    args = "bench --random-weights --model tiny --device cpu --cuda-graphs --steps 1"
    assert main(args.split()) == 2
    assert "CUDA graphs need the cuda device" in capsys.readouterr().err


def test_the_device_side_step_reads_no_value_on_the_host() -> None:
    """What a capture needs: no ``.item()``, no data-dependent shape, no branch on a tensor's
    value. Meta tensors have shapes and no values, so a step that runs on them reads none."""
    plan = Plan("meta", torch.float32, "none", "float")
    engine = Engine(random_model("tiny", seed=0), EngineConfig(3, "cpu"), plan)
    pcm = torch.zeros(3, 1, FRAME, device="meta")
    mask = torch.ones(3, dtype=torch.bool, device="meta")
    for state in (engine.state, engine.state.prefix(2)):
        n = state.batch_size
        tokens, vad = engine.advance(mask[:n], mask[:n], state)
        codes = engine.encode(pcm[:n], mask[:n], state)
        assert tokens.device.type == "meta" and tokens.shape == (n,) and vad.shape[0] == n
        assert codes.device.type == "meta" and codes.shape[0] == n
    with pytest.raises(RuntimeError):  # the probe does catch a host read
        bool(mask.any())
