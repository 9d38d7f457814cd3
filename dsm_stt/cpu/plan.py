"""Which precisions and kernels an engine runs: ``auto`` resolved from the device, the CPU's
family and the batch size.

Owns ``Plan`` (the resolved choice, with the reason for it in words) and ``choose``, and the
table ``AUTO`` of what ``auto`` picks per CPU family, with what was measured for it. A family
marked untested gets the choice of the nearest measured one, and says so. Building the kernels
is left to the first call that needs them; ``choose`` only asks whether they can be had where a
chosen path needs them (``kernels_problem``), and falls back to plain PyTorch, with the reason,
where they cannot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import EngineConfig, resolve_dtype
from .features import CpuFeatures, detect
from .quantize import activation_bits, int8_supported, w8a8_kernels


@dataclass(frozen=True)
class Choice:
    """What ``auto`` picks on one CPU family, and what that was measured at."""

    dtype: str  # "auto" (bf16 where the CPU has native bf16, else float32), or a dtype name
    quantize: str
    kv_cache: str
    measured: str  # stt-1b, random weights, ``dsm-stt bench`` (or "untested: ...")
    # float32 products on the compiled AVX2 kernels where the kernels run: Mimi's projections,
    # few-output convolutions, layer step and codebook search, and the LM's text head where
    # the LM computes in float32 (``float_linear``, ``mimi_step``, ``codebook``)
    float_kernels: bool = False


# One row per family of ``features.FAMILIES``. Figures: docs/performance.md, where each
# comes with its machine and date.
AUTO: dict[str, Choice] = {
    "amx": Choice(
        "bfloat16",
        "w8a8",
        "int8",
        "stt-1b 51.7 ms/step at 1 slot, 6.20 real-time streams at 8 (2-core Xeon VM with AMX)",
    ),
    "avx512_vnni": Choice(
        "bfloat16",
        "w8a8",
        "int8",
        "stt-1b 51.9 ms/step at 1 slot on the AMX VM made to use the vnni kernel (no VNNI-only "
        "CPU measured)",
    ),
    "avx512": Choice(
        "auto",
        "w8a8",
        "int8",
        "untested: the AVX2 family's choice (no native bf16; the AVX2 kernels run here)",
        float_kernels=True,
    ),
    "avx2": Choice(
        "auto",
        "w8a8",
        "int8",
        "stt-1b 52.5 ms/step at 1 slot, 3.36 real-time streams at 8 (2-core AMD EPYC, AVX2 "
        "only; float32 beside the int8 products: bf16, emulated there, read 71.7 ms)",
        float_kernels=True,
    ),
    "aarch64": Choice(
        "auto", "none", "float", "untested: no ARM machine was measured; the float path"
    ),
    "generic": Choice("float32", "none", "float", "untested: the float path"),
}


@dataclass(frozen=True)
class Plan:
    """The resolved configuration of an engine's model (``install.install`` applies it)."""

    device: str  # torch device type
    dtype: torch.dtype
    quantize: str  # none | int8 | w8a8 | w4a8
    kv_cache: str  # float | int8
    # with quantize w8a8: fbgemm | onednn | amx | vnni | avx2; with w4a8: avx2_int4
    w8a8_kernel: str | None = None
    w8a8_bits: int | None = None  # the activation grid of w8a8
    fused_layers: bool = False  # one compiled call per LM layer (cpu.fused)
    compiled_codebooks: bool = False  # Mimi's codebook search in one compiled call
    # Mimi's float32 products, layer step and codebook distances, and a float32 LM's text
    # head, on this package's AVX2 kernels (float32, another order of summation: the same
    # codes and tokens but at near-ties)
    float_kernels: bool = False
    family: str = ""  # the CPU family (CPU plans)
    reason: str = ""  # why, in words

    @property
    def needs_kernels(self) -> bool:
        """Whether this plan runs this package's compiled CPU kernels."""
        return (
            self.kv_cache == "int8"
            or self.w8a8_kernel in ("amx", "vnni", "avx2", "avx2_int4")
            or self.fused_layers
            or self.compiled_codebooks
            or self.float_kernels
        )

    @property
    def exact(self) -> bool:
        """The float path: nothing quantized, nothing compiled (same results as the model)."""
        return self.quantize == "none" and self.kv_cache == "float" and not self.needs_kernels

    def describe(self, reason: bool = True) -> str:
        """One line: the chosen path and (``reason``) why."""
        parts = [self.device + (f" ({self.family})" if self.family else ""), _dtype(self.dtype)]
        if self.quantize == "int8":
            parts.append("int8 weights")
        elif self.quantize == "w8a8":
            parts.append(f"w8a8 on {self.w8a8_kernel} ({self.w8a8_bits}-bit activations)")
        elif self.quantize == "w4a8":
            parts.append("w4a8 on avx2 (int4 weights in groups of 64, 8-bit activations)")
        if self.kv_cache == "int8":
            parts.append("int8 KV cache")
        if self.fused_layers:
            parts.append("fused layer step")
        if self.float_kernels:
            parts.append("Mimi on the compiled float32 kernels")
            if self.dtype == torch.float32:
                parts.append("compiled text head")
        elif self.compiled_codebooks:
            parts.append("compiled codebook search")
        return ", ".join(parts) + (f"; {self.reason}" if reason and self.reason else "")


def exact_plan(config: EngineConfig) -> Plan:
    """The float path on ``config``'s device, in its dtype (``auto``: float32)."""
    device = config.torch_device()
    dtype = resolve_dtype("float32" if config.dtype == "auto" else config.dtype, device)
    return Plan(device.type, dtype, "none", "float", reason="the float path")


def kernels_problem(product: str | None = None) -> str | None:
    """None when the compiled kernels are ready (built now if need be) and, with ``product``
    (``amx`` or ``vnni``), when that int8 product runs here (the OS may refuse the AMX tiles,
    a compiler may lack them); else why not."""
    from .kernels.build import problem
    from .kernels.ops import amx_problem, avx2_problem, vnni_problem

    reason = problem()
    if reason is None and product is not None:
        reason = {"amx": amx_problem, "vnni": vnni_problem, "avx2": avx2_problem}[product]()
    return reason


def choose(
    config: EngineConfig,
    features: CpuFeatures | None = None,
    kernels_problem: Callable[[str | None], str | None] = kernels_problem,
) -> Plan:
    """``config`` with every ``auto`` resolved. On CPU, ``AUTO`` says what the family gets;
    ``kernels_problem`` (by default builds them now) is asked only where a chosen path runs
    the compiled kernels, and the plan falls back to plain PyTorch (or from the ``amx`` to the
    ``vnni`` product) where it answers a reason."""
    device = config.torch_device()
    if device.type != "cpu":
        quantize = "none" if config.quantize == "auto" else config.quantize
        kv = "float" if config.kv_cache == "auto" else config.kv_cache
        dtype = resolve_dtype(config.dtype, device)
        if quantize in ("w8a8", "w4a8"):
            raise ValueError(f"quantize {quantize} runs on CPU only, not {device.type}")
        if kv == "int8":
            raise ValueError(f"kv cache int8 runs on CPU only, not {device.type}")
        if quantize == "int8" and not int8_supported(device.type):
            raise ValueError(
                f"quantize int8: this PyTorch build has no int8 kernel for "
                f"{device.type} (use none on this device)"
            )
        why = "auto: bf16 on CUDA" if device.type == "cuda" else "auto: the float path"
        return Plan(device.type, dtype, quantize, kv, reason=why if config.dtype == "auto" else "")
    features = detect() if features is None else features
    family = features.family.name
    choice = AUTO[family]
    auto = [name for name in ("dtype", "quantize", "kv_cache") if getattr(config, name) == "auto"]
    dtype_name = choice.dtype if config.dtype == "auto" else config.dtype
    dtype = resolve_dtype(dtype_name, device, features)
    quantize = choice.quantize if config.quantize == "auto" else config.quantize
    kv = choice.kv_cache if config.kv_cache == "auto" else config.kv_cache
    if quantize == "w8a8" and not w8a8_kernels(own=False) and config.quantize == "auto":
        quantize = "none"  # a PyTorch build without fbgemm / oneDNN int8 (e.g. some ARM ones)
    if quantize == "int8" and not int8_supported("cpu"):
        raise ValueError("quantize int8: this PyTorch build has no int8 kernel for cpu")
    reasons = []
    if auto:
        reasons.append(f"auto ({', '.join(auto)}): {choice.measured}")
    if quantize == "w4a8" and not _has_avx2(features):
        raise ValueError("quantize w4a8 runs on this package's AVX2 kernel: this CPU has no AVX2")
    candidates = _own_kernels(features) if quantize == "w8a8" else []
    candidates = ["avx2"] if quantize == "w4a8" else candidates
    wants_kernels = kv == "int8" or bool(candidates)
    problem = kernels_problem(None) if wants_kernels else None
    own = None
    if problem is not None:
        if config.kv_cache == "int8":
            raise ValueError(f"kv cache int8: {problem}")
        if quantize == "w4a8":
            raise ValueError(f"quantize w4a8: {problem}")
        reasons.append(f"without the compiled kernels ({problem})")
        kv = "float" if kv == "int8" else kv
    else:
        for candidate in candidates:
            refused = kernels_problem(candidate)
            if refused is None:
                own = candidate
                break
            reasons.append(f"not the {candidate} kernel ({refused})")
    kernel = bits = None
    if quantize == "w4a8":
        if own is None:
            raise ValueError(f"quantize w4a8: {reasons[-1]}")  # the avx2 product's refusal
        kernel, bits = "avx2_int4", 8
    elif quantize == "w8a8":
        kernel = own or _torch_kernel(features, config.batch_size)
        if kernel is None:
            raise ValueError(
                "quantize w8a8: this PyTorch build has no fbgemm or oneDNN int8 kernels"
            )
        bits = activation_bits(kernel, features)
    kernels = problem is None and (kv == "int8" or own is not None)
    if not reasons:
        exact = quantize == "none" and kv == "float"
        reasons.append("the float path, as asked" if exact else "as asked")
    return Plan(
        "cpu",
        dtype,
        quantize,
        kv,
        kernel,
        bits,
        fused_layers=own is not None and kv == "int8" and dtype in _FUSED_DTYPES,
        compiled_codebooks=kernels,
        float_kernels=kernels and choice.float_kernels and _has_avx2(features),
        family=family,
        reason="; ".join(reasons),
    )


_FUSED_DTYPES = (torch.float32, torch.bfloat16)  # what the fused layer step computes in


def _own_kernels(features: CpuFeatures) -> list[str]:
    """This package's w8a8 kernels the CPU has, fastest first: ``amx`` with AMX tiles, then
    ``vnni`` with AVX512-VNNI (AMX CPUs have both), then ``avx2`` (every x86-64 CPU with AVX2
    and FMA; all need the compiled kernels)."""
    avx2 = _has_avx2(features)
    return [k for k, has in (("amx", features.amx), ("vnni", features.vnni), ("avx2", avx2)) if has]


def _has_avx2(features: CpuFeatures) -> bool:
    return features.arch == "x86_64" and features.has("avx2") and features.has("fma")


def _torch_kernel(features: CpuFeatures, batch_size: int) -> str | None:
    """PyTorch's w8a8 kernel: oneDNN from 8 slots on with AMX tiles (its GEMM uses them:
    full LM step, 8 slots 115 -> 107 ms, 32: 296 -> 265 against fbgemm on the AMX VM), else
    fbgemm (faster at one slot: 55 against 58 ms), else whichever this build has."""
    available = w8a8_kernels(own=False)
    if "onednn" in available and batch_size >= 8 and features.amx:
        return "onednn"
    return available[0] if available else None


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
