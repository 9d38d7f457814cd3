"""Tests of dsm_stt.cpu.kvcache: the int8 KV ring as a cache type. Over joins, pauses, resets,
two-position steps and the wrap it must store and attend exactly what a float ring holding
the same rounded rows does (each compiled attention path), and its views, moves and size must
cover its scales."""

from __future__ import annotations

import functools

import pytest
import torch
from engine_support import needs_kernels
from test_transformer import CONTEXT, DIM, HEADS, make_transformer, stream

from dsm_stt.cpu import kvcache
from dsm_stt.cpu.kernels.build import problem
from dsm_stt.cpu.kernels.ops import int8_attention, kernel_paths, quantize_rows
from dsm_stt.cpu.kvcache import Int8KVCache
from dsm_stt.model.transformer import Attention, KVCache

PATHS = kernel_paths() if problem() is None else []


@needs_kernels
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("dim", "heads"), [(DIM, HEADS), (256, 2)], ids=["hd8", "hd128"])
def test_an_int8_ring_equals_a_float_ring_holding_the_rounded_rows(
    monkeypatch: pytest.MonkeyPatch, dim: int, heads: int, path: str
) -> None:
    """Joins, pauses, a reset, T=2 and the wrap, once with an int8 ring and once with a float32
    ring whose new keys and values are rounded to int8 rows the same way: the same outputs
    and the same ring contents, so the int8 path stores every row where the float path does
    and attends over the same entries (each kernel path; the vnni one rounds the query and
    the softmax weights to 16 bits, hence its looser tolerance)."""
    monkeypatch.setattr(kvcache, "int8_attention", functools.partial(int8_attention, path=path))
    model = make_transformer(seed=3, dim=dim, heads=heads)
    g = torch.Generator().manual_seed(4)
    steps = [
        (torch.randn(3, T, dim, generator=g), torch.tensor(act), torch.tensor(rst))
        for T, act, rst in [(1, [True, False, False], [True, True, True])] * 3
        + [(2, [True, True, False], [False, False, False])] * 4
        + [(1, [True, True, True], [False, True, False])]
        + [(1, [True, False, True], [False, False, False])] * 12
    ]

    int8_outs, int8_cache = stream(model, steps, Int8KVCache)
    assert isinstance(int8_cache, Int8KVCache) and int8_cache.keys.dtype == torch.int8
    qkv = Attention._qkv

    def rounded(self, x, rot):
        q, k, v = qkv(self, x, rot)
        return q, *(r.float() * s[..., None] for r, s in map(quantize_rows, (k, v)))

    monkeypatch.setattr(Attention, "_qkv", rounded)
    float_outs, float_cache = stream(model, steps)
    for a, b in zip(int8_outs, float_outs, strict=True):
        if path == "vnni":  # within 2e-4 of the outputs' scale
            torch.testing.assert_close(a, b, atol=2e-4 * b.abs().max().item(), rtol=0)
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(int8_cache.key_positions, float_cache.key_positions)
    ring = slice(0, CONTEXT)  # the trash entry holds whatever inactive slots wrote
    for rows, scales, floats in [
        (int8_cache.keys, int8_cache.key_scales, float_cache.keys),
        (int8_cache.values, int8_cache.value_scales, float_cache.values),
    ]:
        dequantized = (rows.float() * scales[..., None])[:, :, :, ring]
        floats = floats[:, :, :, ring]
        if path == "vnni":  # the first layer's rows exactly; later ones within one int8 step
            torch.testing.assert_close(dequantized[0], floats[0])
            step = scales[:, :, :, ring, None]
            assert ((dequantized - floats).abs() <= step * 1.01).all()
        else:
            torch.testing.assert_close(dequantized, floats)


def test_int8_cache_views_moves_and_size() -> None:
    cache = Int8KVCache.allocate(2, 3, 4, 8, CONTEXT, dtype=torch.bfloat16)
    floats = KVCache.allocate(2, 3, 4, 8, CONTEXT, dtype=torch.bfloat16)
    assert cache.key_scales.shape == cache.value_scales.shape == (2, 3, 4, CONTEXT + 1)
    assert cache.problem(torch.bfloat16) is None and cache.problem(torch.float32) is None
    assert "differs" in floats.problem(torch.float32)
    # int8 rows + one float32 scale per row against bf16 rows: (8 + 4) / 16 of the entries
    entries = 2 * 2 * 4 * (CONTEXT + 1)
    assert cache.nbytes_per_slot() - entries * 12 == floats.nbytes_per_slot() - entries * 16
    head = cache.prefix(2)
    assert isinstance(head, Int8KVCache)
    assert head.key_scales.shape == head.value_scales.shape == (2, 2, 4, CONTEXT + 1)
    head.key_scales[1].fill_(0.5)  # a view: writes land in the cache
    assert (cache.key_scales[1, 1] == 0.5).all() and (cache.key_scales[0, 1] == 1).all()
    assert (cache.key_scales[1, 2] == 1).all()  # past the prefix: untouched
    cache.keys[:, 2] = 7
    cache.key_scales[:, 2] = 3.0
    cache.value_scales[:, 2] = 2.0
    cache.move(2, 0)
    assert (cache.keys[:, 0] == 7).all()
    assert (cache.key_scales[:, 0] == 3).all() and (cache.value_scales[:, 0] == 2).all()
    with pytest.raises(ValueError, match="CPU only"):
        Int8KVCache.allocate(1, 1, 1, 8, CONTEXT, device="meta")
    with pytest.raises(ValueError, match="float entries, not torch.int32"):
        KVCache.allocate(1, 1, 1, 8, CONTEXT, dtype=torch.int32)
