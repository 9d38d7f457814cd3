"""Engines for tests: the exact float path unless a test asks for a precision, and the skip
marks of the paths that need the compiled kernels or an int8 CPU product."""

from __future__ import annotations

import pytest
import torch

from dsm_stt.config import EngineConfig
from dsm_stt.cpu.kernels import build
from dsm_stt.engine.engine import Engine
from dsm_stt.loading import build_engine

EXACT = {"dtype": "float32", "quantize": "none", "kv_cache": "float"}

KERNELS_PROBLEM = build.problem()  # builds them once per machine (cached afterwards)
needs_kernels = pytest.mark.skipif(
    KERNELS_PROBLEM is not None, reason=f"needs the compiled CPU kernels: {KERNELS_PROBLEM}"
)


def make_engine(model, batch_size: int = 1, **settings) -> Engine:
    """An engine for ``model`` built as ``dsm-stt`` builds one (plan, install), on the CPU
    unless ``device`` says otherwise; precisions not given are the exact float path. A
    ``dtype`` may be given as a torch dtype."""
    dtype = settings.get("dtype")
    if isinstance(dtype, torch.dtype):
        settings["dtype"] = str(dtype).removeprefix("torch.")
    config = EngineConfig(
        batch_size=batch_size, device=settings.pop("device", "cpu"), **(EXACT | settings)
    )
    return build_engine(model, config, announce=lambda line: None)


def exact_config(**settings) -> EngineConfig:
    """An ``EngineConfig`` on the CPU whose precisions default to the exact float path."""
    return EngineConfig(**({"device": "cpu"} | EXACT | settings))
