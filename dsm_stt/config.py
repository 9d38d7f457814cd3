"""Operator settings, parsed once at the boundary: which device and dtype the engine runs on,
how many slots it has, how it samples.

Owns ``EngineConfig`` and the ``auto`` rules for device and dtype. What the checkpoint says
about its architecture lives in ``model/config.py``; server settings live with the server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .cpu.features import CpuFeatures, detect

# the choices of each setting, written once (the CLI's flags take theirs from here)
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", "float32", "bfloat16")  # what the CLI offers (float16: TOML only)
QUANTIZE = ("auto", "none", "int8", "w8a8", "w4a8")
KV_CACHES = ("auto", "float", "int8")  # the LM's KV ring: the model's dtype, or int8 rows (CPU)
EXACT = {"dtype": "float32", "quantize": "none", "kv_cache": "float"}  # what --exact sets


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available")
    return torch.device(name)


def resolve_dtype(
    name: str, device: torch.device, features: CpuFeatures | None = None
) -> torch.dtype:
    """``auto`` for the model's dtype alone: bf16 on CUDA and on CPUs with native bf16
    arithmetic (``features``, default this CPU's), float32 elsewhere. (The CPU plan's ``auto``
    may pick bf16 on other CPUs too, where it was measured faster: ``cpu.plan.AUTO``.)"""
    if name == "auto":
        features = detect() if features is None else features
        if device.type == "cuda" or (device.type == "cpu" and features.native_bf16):
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs: slots, placement, precisions, sampling. ``auto`` values are
    resolved by ``cpu.plan.choose`` (``loading.build_engine``) from the device and CPU."""

    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    temperature: float = 0.0
    seed: int = 0
    quantize: str = "auto"
    cuda_graphs: bool = False  # replay captured steps (CUDA only, greedy only)
    kv_cache: str = "auto"  # "int8": the LM's KV ring as int8 rows with scales (CPU only)
    lookahead: bool = False  # each slot's next LM position computed after its frame (eager)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        # bool is an int: True would pass for 1 (the TOML and the CLI give floats)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise ValueError(f"temperature must be a number, got {self.temperature!r}")
        # NaN compares false with everything, so "< 0" alone would let it (and inf) through
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 and finite, got {self.temperature}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.quantize not in QUANTIZE:
            raise ValueError(
                f"quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}"
            )
        if self.kv_cache not in KV_CACHES:
            raise ValueError(
                f"kv cache must be one of {', '.join(KV_CACHES)}, got {self.kv_cache!r}"
            )
        if self.kv_cache == "int8" and self.device not in ("auto", "cpu"):
            raise ValueError(f"kv cache int8 runs on CPU only, not {self.device!r}")
        if self.kv_cache == "int8" and self.cuda_graphs:
            raise ValueError("kv cache int8 runs on CPU only: no CUDA graphs")
        if self.cuda_graphs and self.device not in ("auto", "cuda"):
            raise ValueError(f"CUDA graphs need the cuda device, not {self.device!r}")
        if self.cuda_graphs and self.temperature > 0:
            raise ValueError("CUDA graphs replay greedy steps: temperature must be 0")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(
                f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}"
            )

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)
