"""Tests of dsm_stt.cpu.features: the family table, reading the flags, restricting a CPU to a
lesser family, and the kernels switch."""

from __future__ import annotations

import pytest

from dsm_stt.cpu import features
from dsm_stt.cpu.features import FAMILIES, CpuFeatures, detect, family, kernels_enabled

AMX = {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "amx_int8", "amx_tile", "avx512_bf16"}


@pytest.mark.parametrize(
    ("arch", "flags", "expected"),
    [
        ("x86_64", AMX, "amx"),
        ("x86_64", AMX - {"amx_int8", "amx_tile"}, "avx512_vnni"),
        ("x86_64", {"avx2", "fma", "avx512f", "avx512bw"}, "avx512"),
        ("x86_64", {"avx2", "fma", "avx_vnni"}, "avx2"),  # AVX-VNNI alone is not AVX512-VNNI
        ("x86_64", {"sse4_2"}, "generic"),
        ("aarch64", {"asimd", "bf16"}, "aarch64"),
    ],
)
def test_each_cpu_gets_the_first_family_it_meets(arch: str, flags: set, expected: str) -> None:
    cpu = CpuFeatures(arch, frozenset(flags))
    assert cpu.family.name == expected


def test_x86_flags_count_on_x86_only() -> None:
    """Under an emulator /proc/cpuinfo is the host's: an aarch64 process may read x86 flags."""
    arm = CpuFeatures("aarch64", frozenset(AMX))
    assert not (arm.amx or arm.vnni or arm.native_bf16) and arm.family.name == "aarch64"
    assert CpuFeatures("aarch64", frozenset({"asimd", "bf16"})).native_bf16
    assert arm.restricted_to("generic").family.name == "generic"


def test_features_say_what_the_kernels_need() -> None:
    amx = CpuFeatures("x86_64", frozenset(AMX))
    assert amx.amx and amx.vnni and amx.native_bf16
    avx2 = CpuFeatures("x86_64", frozenset({"avx2", "fma"}))
    assert not (avx2.amx or avx2.vnni or avx2.native_bf16)
    assert "avx2" in avx2.describe()


def test_a_cpu_can_be_restricted_to_a_lesser_family_only() -> None:
    amx = CpuFeatures("x86_64", frozenset(AMX | {"sse4_2"}))
    for name in ("avx512_vnni", "avx512", "avx2", "generic"):
        lesser = amx.restricted_to(name)
        assert lesser.family.name == name and lesser.emulated == name
        assert "sse4_2" in lesser.flags  # flags no family names stay
    avx2 = amx.restricted_to("avx2")
    assert not avx2.vnni and not avx2.amx and not avx2.native_bf16
    with pytest.raises(ValueError, match="only be restricted to a lesser one"):
        avx2.restricted_to("amx")
    with pytest.raises(ValueError, match="not aarch64"):
        amx.restricted_to("aarch64")
    with pytest.raises(ValueError, match="unknown CPU family 'sse9'"):
        family("sse9")


def test_the_environment_restricts_the_detected_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    real = detect()
    detect.cache_clear()
    try:
        monkeypatch.setenv(features.FAMILY_ENV, "generic")
        restricted = detect()
        assert restricted.family.name == "generic" and restricted.emulated == "generic"
    finally:
        monkeypatch.undo()
        detect.cache_clear()
    assert detect() == real


@pytest.mark.parametrize(
    ("value", "enabled"),
    [("", True), ("on", True), ("off", False), ("0", False), ("FALSE", False), ("no", False)],
)
def test_kernels_can_be_switched_off(
    monkeypatch: pytest.MonkeyPatch, value: str, enabled: bool
) -> None:
    monkeypatch.setenv(features.KERNELS_ENV, value)
    assert kernels_enabled() is enabled


def test_the_family_table_names_each_family_once() -> None:
    names = [f.name for f in FAMILIES]
    assert len(names) == len(set(names)) and names[-1] == "generic"
