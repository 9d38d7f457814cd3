"""Tests of dsm_stt.config: the ``auto`` device / dtype rules and EngineConfig validation."""

from __future__ import annotations

import pytest
import torch

from dsm_stt import config
from dsm_stt.config import EngineConfig, resolve_dtype
from dsm_stt.cpu.features import CpuFeatures


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_on_cpu_follows_native_bf16(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    flags = {"avx2", "fma", "avx512f", "avx512bw"} | ({"avx512_bf16"} if native else set())
    monkeypatch.setattr(config, "detect", lambda: CpuFeatures("x86_64", frozenset(flags)))
    expected = torch.bfloat16 if native else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    cpu = CpuFeatures("x86_64", frozenset(flags))
    assert resolve_dtype("auto", torch.device("cpu"), cpu) == expected
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32


def test_auto_dtype_on_cuda_is_bf16() -> None:
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("batch_size", 0),
        ("temperature", -1.0),
        ("device", "tpu"),
        ("dtype", "int8"),
        ("quantize", "int4"),
        ("kv_cache", "int4"),
    ],
)
def test_invalid_settings_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field.replace("_", " ") if "_" in field else field):
        EngineConfig(**{field: value})


def test_an_int8_kv_cache_is_for_the_cpu_only() -> None:
    assert EngineConfig(kv_cache="int8", device="cpu").kv_cache == "int8"
    with pytest.raises(ValueError, match="kv cache int8 runs on CPU only, not 'cuda'"):
        EngineConfig(kv_cache="int8", device="cuda")
    with pytest.raises(ValueError, match="kv cache int8 runs on CPU only: no CUDA graphs"):
        EngineConfig(kv_cache="int8", cuda_graphs=True)
