"""What this CPU has, and the one table of CPU families the rest of ``cpu/`` reads.

Owns ``CpuFeatures`` (the instruction-set extensions that matter here, read once from the
operating system) and ``FAMILIES``, ordered best first: a CPU belongs to the first family whose
requirements it meets. Adding a family is one row here and, if it gets a path of its own, one
rule in ``plan.py``.

Two environment variables, read once per process:
- ``DSM_STT_KERNELS=off`` (or ``0`` / ``false`` / ``no``): never build or load the compiled
  kernels; everything runs on plain PyTorch.
- ``DSM_STT_CPU_FAMILY=<family>``: behave as a CPU of a lesser family (its features only), for
  testing the paths of CPUs one does not have. It can only remove features, never add them.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

KERNELS_ENV = "DSM_STT_KERNELS"
FAMILY_ENV = "DSM_STT_CPU_FAMILY"

# Linux /proc/cpuinfo flag names this package cares about
_X86_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
)


@dataclass(frozen=True)
class Family:
    """A CPU family: its name, the flags it requires, and what it means in words."""

    name: str
    requires: frozenset[str]
    arch: str  # "x86_64" or "aarch64"
    description: str


FAMILIES: tuple[Family, ...] = (
    Family(
        "amx",
        frozenset({"avx512f", "avx512bw", "avx512_vnni", "amx_int8", "amx_tile"}),
        "x86_64",
        "x86-64 with AMX-INT8 tiles (Intel Sapphire Rapids and later)",
    ),
    Family(
        "avx512_vnni",
        frozenset({"avx512f", "avx512bw", "avx512_vnni"}),
        "x86_64",
        "x86-64 with AVX512-VNNI, no AMX (Intel Cascade Lake / Ice Lake, AMD Zen 4 and later)",
    ),
    Family(
        "avx512",
        frozenset({"avx512f", "avx512bw"}),
        "x86_64",
        "x86-64 with AVX-512, no VNNI (Intel Skylake-SP)",
    ),
    Family(
        "avx2",
        frozenset({"avx2", "fma"}),
        "x86_64",
        "x86-64 with AVX2 only (AMD Zen 1-3, Intel Haswell to Alder Lake)",
    ),
    Family("aarch64", frozenset(), "aarch64", "64-bit ARM (Apple Silicon, Graviton, Ampere)"),
    Family("generic", frozenset(), "", "a CPU without AVX2 (plain PyTorch only)"),
)
FAMILY_NAMES = tuple(f.name for f in FAMILIES)


def family(name: str) -> Family:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise ValueError(f"unknown CPU family {name!r}: expected one of {', '.join(FAMILY_NAMES)}")


@dataclass(frozen=True)
class CpuFeatures:
    """The instruction-set extensions of a CPU (Linux flag names), and its family."""

    arch: str  # platform.machine(), normalized: "x86_64", "aarch64", ...
    flags: frozenset[str]
    model: str = ""  # the CPU's marketing name, where the OS says it
    emulated: str | None = None  # the family DSM_STT_CPU_FAMILY asked for

    @property
    def family(self) -> Family:
        if self.emulated:  # what DSM_STT_CPU_FAMILY asked for (its flags are a subset)
            return family(self.emulated)
        for f in FAMILIES:
            if f.arch and f.arch != self.arch:
                continue
            if f.requires <= self.flags:
                return f
        return FAMILIES[-1]

    def has(self, flag: str) -> bool:
        """Whether the CPU has ``flag`` (x86 flag names count on x86-64 only: an emulator
        may show the host's /proc/cpuinfo)."""
        x86 = flag.startswith(("avx", "amx", "fma", "f16c"))
        return flag in self.flags and (self.arch == "x86_64" or not x86)

    @property
    def vnni(self) -> bool:
        """AVX512-VNNI (``vpdpbusd`` on 512-bit registers), which AMX CPUs also have."""
        return self.has("avx512_vnni")

    @property
    def amx(self) -> bool:
        return self.has("amx_int8") and self.has("amx_tile")

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware (AVX512-BF16 or AMX-BF16; ARM's BF16 extension)."""
        if self.arch == "x86_64":
            return self.has("avx512_bf16") or self.has("amx_bf16")
        return self.arch == "aarch64" and "bf16" in self.flags

    def restricted_to(self, name: str) -> CpuFeatures:
        """These features cut down to those of family ``name`` (which this CPU must reach)."""
        target = family(name)
        if name == self.family.name:  # nothing to remove
            return CpuFeatures(self.arch, self.flags, self.model, emulated=name)
        if target.arch and target.arch != self.arch:
            raise ValueError(f"{FAMILY_ENV}={name}: this CPU is {self.arch}, not {target.arch}")
        order = [f.name for f in FAMILIES if not f.arch or f.arch == self.arch]
        if name not in order or order.index(name) < order.index(self.family.name):
            raise ValueError(
                f"{FAMILY_ENV}={name}: this CPU's family is {self.family.name}; it can only "
                f"be restricted to a lesser one ({', '.join(order[order.index(self.family.name) :])})"
            )
        # drop every vector extension beyond the lesser family's (AVX-512 and AMX of any
        # kind, VNNI); keep what it requires and what no family cares about (sse, ...)
        beyond = {f for f in self.flags if f.startswith(("avx512", "amx", "avx_vnni"))}
        beyond |= frozenset().union(*(f.requires for f in FAMILIES))
        if name == "generic":
            beyond |= {"avx", "avx2", "fma", "f16c"}
        kept = (self.flags - beyond) | (self.flags & target.requires)
        return CpuFeatures(self.arch, frozenset(kept), self.model, emulated=name)

    def describe(self) -> str:
        shown = [flag for flag in _X86_FLAGS if flag in self.flags] if self.arch == "x86_64" else []
        extra = f" (restricted by {FAMILY_ENV}={self.emulated})" if self.emulated else ""
        return f"{self.family.name}{extra}: {self.arch} {' '.join(shown)}".rstrip()


def _read_flags() -> tuple[frozenset[str], str]:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset(), platform.processor()
    flags: frozenset[str] = frozenset()
    model = ""
    for line in info.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:  # x86 / ARM spelling
            flags = frozenset(value.split())
        elif key == "model name" and not model:
            model = value.strip()
    return flags, model


@functools.cache
def detect() -> CpuFeatures:
    """This machine's CPU (read once; restricted where ``DSM_STT_CPU_FAMILY`` says)."""
    arch = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
    flags, model = _read_flags()
    if arch == "aarch64" and not flags and platform.system() == "Darwin":
        flags = _apple_flags()
    features = CpuFeatures(arch, flags, model)
    wanted = os.environ.get(FAMILY_ENV, "").strip()
    if not wanted:
        return features
    try:
        return features.restricted_to(wanted)
    except ValueError as exc:
        warnings.warn(f"{exc}; {FAMILY_ENV} is ignored", stacklevel=2)
        return features


def _apple_flags() -> frozenset[str]:
    # macOS has no /proc/cpuinfo: sysctl says which Arm features the chip has (M1 lacks BF16)
    flags = {"asimd"}
    try:
        out = subprocess.run(
            ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.stdout.strip() == "1":
            flags.add("bf16")
    except (OSError, subprocess.SubprocessError):
        pass
    return frozenset(flags)


def kernels_enabled() -> bool:
    """False where ``DSM_STT_KERNELS`` turns the compiled kernels off."""
    value = os.environ.get(KERNELS_ENV, "").strip().lower()
    return value not in ("off", "0", "false", "no")
