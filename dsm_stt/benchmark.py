"""The engine micro-benchmark behind ``dsm-stt bench``.

Owns the measurement protocol: warm-up steps, then ``steps`` timed steps of the whole batch with
every slot active, each split into Mimi, LM and host overhead (numpy in → tokens out, sampling,
transfers); medians; ``realtime_streams = B * 80 / step_ms``; peak memory. It runs the two
halves the scheduler and the server call (``Engine.begin_step``, then ``end_step``), so it
also reports ``output_ms``: when a step's tokens are on the host, which is what a server's
messages wait for. The attention caches start ``context_fill`` full (1.0 by default: sessions
past their first ring of positions, the steady state; on CPU a step in a session's first
minute reads only the part of the LM's ring filled so far, and costs less). Comparisons
against the reference package live in ``bench/`` scripts, which run both in one process.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .engine.engine import Engine
from .engine.state import EngineState


@dataclass(frozen=True)
class BenchResult:
    model: str
    device: str
    dtype: str
    quantize: str
    batch_size: int
    steps: int
    step_ms: float
    mimi_ms: float
    lm_ms: float
    host_ms: float
    realtime_streams: float
    peak_rss_mb: float
    kv_mb_per_stream: float
    gpu_peak_mb: float | None = None
    w8a8_kernel: str | None = None  # the int8 product's kernel with quantize w8a8
    # until the step's tokens are on the host: what a server's messages wait for (the Mimi
    # half runs after them)
    output_ms: float | None = None
    context_fill: float = 1.0  # how full the attention caches were (1.0: steady state)
    kv_cache: str = "float"  # the LM's KV ring: the model's dtype, or int8 rows
    fused_layers: bool = False  # the LM's steps ran one compiled call per layer
    path: str = ""  # the engine's plan in words (``Plan.describe``)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        gpu = f", GPU peak {self.gpu_peak_mb:.0f} MB" if self.gpu_peak_mb is not None else ""
        output = f"; tokens out after {self.output_ms:.1f}" if self.output_ms is not None else ""
        quant = {
            "int8": ", int8 weights",
            "w8a8": ", int8 weights and activations",
            "w4a8": ", int4 weights and int8 activations",
        }.get(self.quantize, "")
        if self.w8a8_kernel:
            quant += f" via {self.w8a8_kernel}"
        if self.kv_cache == "int8":
            quant += ", int8 KV cache"
        if self.fused_layers:
            quant += ", fused layers"
        return (
            f"{self.model} on {self.device} ({self.dtype}{quant}), batch {self.batch_size}: "
            f"step {self.step_ms:.1f} ms (Mimi {self.mimi_ms:.1f}, LM {self.lm_ms:.1f}, "
            f"host {self.host_ms:.1f}{output}) → {self.realtime_streams:.2f} real-time streams; "
            f"peak RSS {self.peak_rss_mb:.0f} MB, KV {self.kv_mb_per_stream:.1f} MB/stream"
            f"{gpu}"
        )


def assume_history(state: EngineState, fill: float) -> None:
    """Every slot of ``state`` as far into its stream as ``fill`` of each attention cache's
    ring (LM and Mimi encoder): 1.0 is a session past its first ring of positions."""
    if not 0.0 <= fill <= 1.0:
        raise ValueError(f"--context-fill must be within 0..1, got {fill}")
    for cache in (state.lm, state.mimi.kv):
        cache.assume_history(round(fill * cache.context))


def run_benchmark(
    engine: Engine, steps: int, warmup: int = 3, seed: int = 0, context_fill: float = 1.0
) -> BenchResult:
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    B, F = engine.batch_size, engine.frame_size
    rng = np.random.default_rng(seed)
    pcm = (0.1 * rng.standard_normal((B, F))).astype(np.float32)
    active = np.ones(B, bool)
    no_reset = np.zeros(B, bool)
    engine.step(pcm, active, np.ones(B, bool))
    assume_history(engine.state, context_fill)
    for _ in range(warmup):
        engine.step(pcm, active, no_reset)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    totals, outputs, mimi, lm = [], [], [], []
    for _ in range(steps):
        marks: list[float] = []
        start = time.perf_counter()
        engine.begin_step(pcm, active, no_reset, marks)  # what Engine.step does, timed apart
        output = time.perf_counter()
        engine.end_step(marks)
        end = time.perf_counter()
        lm_end, mimi_start, mimi_end = marks
        totals.append((end - start) * 1e3)
        outputs.append((output - start) * 1e3)
        lm.append((lm_end - start) * 1e3)
        mimi.append((mimi_end - mimi_start) * 1e3)
    step_ms = statistics.median(totals)
    mimi_ms, lm_ms = statistics.median(mimi), statistics.median(lm)
    gpu = None
    if engine.device.type == "cuda":
        gpu = torch.cuda.max_memory_allocated(engine.device) / 2**20
    return BenchResult(
        model=engine.name,
        device=str(engine.device),
        dtype=str(engine.dtype).replace("torch.", ""),
        quantize=engine.quantize,
        batch_size=B,
        steps=steps,
        step_ms=round(step_ms, 3),
        mimi_ms=round(mimi_ms, 3),
        lm_ms=round(lm_ms, 3),
        host_ms=round(max(step_ms - mimi_ms - lm_ms, 0.0), 3),
        output_ms=round(statistics.median(outputs), 3),
        realtime_streams=round(B * 80.0 / step_ms, 3),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        kv_mb_per_stream=round(engine.state.kv_bytes_per_slot() / 2**20, 2),
        gpu_peak_mb=gpu,
        w8a8_kernel=engine.w8a8_kernel,
        context_fill=context_fill,
        kv_cache=engine.kv_cache,
        fused_layers=engine.fused_layers,
        path=engine.plan.describe(),
    )
