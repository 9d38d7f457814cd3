"""Captured replays of the engine step (CUDA graphs), one pair per batch bucket.

Owns ``StepGraphs``: static input buffers (pcm, active and reset masks) for all slots, and for
each bucket size ``m`` (powers of two below the batch size, and the batch size) two captured
calls on the first ``m`` slots of the engine's state, the two halves of a step: *advance*
(reset, LM, token choice) and *encode* (Mimi → codes stored for the next step). A step on ``n``
slots copies its inputs into the static buffers, marks slots ``n..m`` of the smallest bucket
``m >= n`` inactive (the engine computes inactive slots but never changes their state), replays
the advance capture and returns views of the first ``n`` rows of its static outputs; ``encode``
then replays that bucket's encode capture (the engine's ``end_step``).

Every step reads and writes the preallocated state in place and keeps all its values in tensors
(positions, masks, previous tokens), with no host sync on the hot path, so a replay is the step.
Warm-up and capture run with every slot inactive, so they leave the state as it was.

``capture`` is a parameter: ``cuda_capture`` (``torch.cuda.graph``, one shared memory pool) on
CUDA; tests drive the same buffers with ``eager_capture``, which re-runs the call on replay.
Greedy decoding only (sampling draws from a generator that a capture would freeze).

The captures run with Python's cyclic garbage collector paused (after one collection): a
collection during a capture can free an unreachable older engine, whose graphs' teardown is
not allowed while a stream captures and invalidates the capture (PyTorch no longer collects
before a capture by default).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from .state import EngineState


class SteppedEngine(Protocol):
    """What the captures need of the engine (``engine.Engine``): its state, sizes and the
    two halves of a step."""

    state: EngineState
    batch_size: int
    frame_size: int
    device: torch.device
    temperature: float

    def advance(
        self, active: Tensor, reset: Tensor, state: EngineState
    ) -> tuple[Tensor, Tensor]: ...

    def encode(self, pcm: Tensor, active: Tensor, state: EngineState) -> Tensor: ...


Outputs = tuple[Tensor, ...]
Capture = Callable[[Callable[[], Outputs]], tuple[Callable[[], None], Outputs]]


def buckets_for(batch_size: int) -> list[int]:
    """Powers of two below ``batch_size``, then ``batch_size`` itself."""
    sizes, m = [], 1
    while m < batch_size:
        sizes.append(m)
        m *= 2
    return [*sizes, batch_size]


class _CudaCapturer:
    """``torch.cuda.graph`` captures sharing one memory pool (largest bucket first)."""

    def __init__(self, warmup: int = 2) -> None:
        self.warmup = warmup
        self.pool: Any = None

    def __call__(self, fn: Callable[[], Outputs]) -> tuple[Callable[[], None], Outputs]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = fn()
        if self.pool is None:
            self.pool = graph.pool()
        return graph.replay, outputs  # the bound method keeps the graph alive


def cuda_capture() -> Capture:
    return _CudaCapturer()


def eager_capture() -> Capture:
    """A stand-in with the same contract: replay re-runs ``fn`` into the first outputs."""

    def capture(fn: Callable[[], Outputs]) -> tuple[Callable[[], None], Outputs]:
        outputs = tuple(t.clone() for t in fn())

        def replay() -> None:
            for static, fresh in zip(outputs, fn(), strict=True):
                static.copy_(fresh)

        return replay, outputs

    return capture


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Collect once, then keep the cyclic collector off until the block ends."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class StepGraphs:
    def __init__(
        self, engine: SteppedEngine, capture: Capture, buckets: Sequence[int] | None = None
    ) -> None:
        if engine.temperature > 0:
            raise ValueError("captured steps decode greedily; temperature must be 0")
        B = engine.batch_size
        self.engine = engine
        self.buckets = sorted(set(buckets or buckets_for(B)))
        if self.buckets[-1] != B or self.buckets[0] < 1:
            raise ValueError(f"buckets must lie in 1..{B} and include {B}, got {self.buckets}")
        device = engine.device
        self.pcm = torch.zeros(B, 1, engine.frame_size, device=device)
        self.active = torch.zeros(B, dtype=torch.bool, device=device)
        self.reset = torch.zeros(B, dtype=torch.bool, device=device)
        self._encode: dict[int, tuple[Callable[[], None], Outputs]] = {}
        self._advance: dict[int, tuple[Callable[[], None], Outputs]] = {}
        self._last = self.buckets[-1]  # the bucket of the last advance
        with collector_paused():
            for m in reversed(self.buckets):  # largest first: it sizes the shared pool
                state = engine.state if m == B else engine.state.prefix(m)
                pcm, active, reset = self.pcm[:m], self.active[:m], self.reset[:m]
                self._advance[m] = capture(
                    lambda s=state, a=active, r=reset: engine.advance(a, r, s)
                )
                self._encode[m] = capture(
                    lambda s=state, p=pcm, a=active: (engine.encode(p, a, s),)
                )

    def bucket(self, n: int) -> int:
        return next(m for m in self.buckets if m >= n)

    def advance(self, pcm: Tensor, active: Tensor, reset: Tensor) -> tuple[Tensor, Tensor]:
        """``pcm`` [n, 1, F], masks [n] on the engine's device → tokens [n], VAD [n, H]
        (views of static outputs: read them before the next step); ``encode`` runs the
        step's other half, before the next step."""
        n = pcm.shape[0]
        m = self.bucket(n)
        self.pcm[:n].copy_(pcm)
        self.active[:n].copy_(active)
        self.reset[:n].copy_(reset)
        if m > n:
            self.active[n:m] = False
            self.reset[n:m] = False
        replay, (tokens, vad) = self._advance[m]
        replay()
        self._last = m
        return tokens[:n], vad[:n]

    def encode(self) -> None:
        """The encode half of the last ``advance``'s step (its frames are in the buffers)."""
        self._encode[self._last][0]()
