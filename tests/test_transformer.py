"""Tests of dsm_stt.model.transformer's streaming step: which ring entries a step attends
over (only the filled part on CPU), that this gives the whole ring's result,
``KVCache.assume_history``, and the int8 ring."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.nn import functional as F

from dsm_stt.model import transformer
from dsm_stt.model.kernels import int8_attention, int8_kv_problem, kernel_paths, quantize_rows
from dsm_stt.model.transformer import Attention, KVCache, LMLayer, Transformer

DIM, HEADS, CONTEXT = 32, 4, 12


def make_transformer(seed: int = 0, dim: int = DIM, heads: int = HEADS) -> Transformer:
    torch.manual_seed(seed)
    layers = [LMLayer(dim, heads, 48, CONTEXT, 10000.0, 1e-5) for _ in range(2)]
    return Transformer(
        layers, num_heads=heads, head_dim=dim // heads, context=CONTEXT, max_period=10000.0
    ).eval()


def stream(
    model: Transformer,
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    dtype: torch.dtype = torch.float32,
) -> tuple[list[torch.Tensor], KVCache]:
    """Run ``steps`` (input, active mask, reset mask) on a fresh 3-slot cache of ``dtype``:
    the active slots' outputs of every step, and the cache."""
    cache = model.allocate_cache(3, dtype=dtype)
    outs = []
    with torch.no_grad():
        for x, active, reset in steps:
            cache.reset(reset)
            outs.append(model.step(x, cache, active)[active])
    return outs, cache


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of key entries every attention call of a streaming step reads."""
    seen: list[int] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append(k.shape[-2])
        assert attn_mask.shape[-1] == k.shape[-2] == v.shape[-2]
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen


def test_a_step_reads_only_the_ring_entries_filled_so_far(spans: list[int]) -> None:
    model = make_transformer()
    cache = model.allocate_cache(3)
    active = torch.tensor([True, True, False])
    with torch.no_grad():
        for _ in range(3):  # T=1: the entries of positions 0..t, the trash entry never
            model.step(torch.randn(3, 1, DIM), cache, active)
        assert spans == [1, 1, 2, 2, 3, 3]  # two layers, one call each
        spans.clear()
        model.step(torch.randn(3, 2, DIM), cache, active)  # T=2 from position 3
        assert spans == [5, 5]
        spans.clear()
        cache.reset(torch.tensor([True, False, False]))  # the other slot still needs 6
        model.step(torch.randn(3, 1, DIM), cache, active)
        assert spans == [6, 6]
        spans.clear()
        for _ in range(CONTEXT):  # past the first ring: the whole ring, never more
            model.step(torch.randn(3, 1, DIM), cache, active)
        assert spans[-2:] == [CONTEXT, CONTEXT] and max(spans) == CONTEXT
        spans.clear()
        model.step(torch.randn(1, 1, DIM), cache.prefix(1), active[:1])  # only slot 0: 13 in
        assert spans == [CONTEXT, CONTEXT]
        spans.clear()
        # an idle slot far in does not widen the others' span (its output is ignored)
        cache.reset(torch.tensor([False, True, True]))
        model.step(torch.randn(3, 1, DIM), cache, torch.tensor([False, True, True]))
        assert spans == [1, 1]


def test_reading_the_filled_entries_gives_the_whole_ring_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Same steps (joins, pauses, a reset, past the window) with the span rule and with every
    step reading the whole ring: the same outputs for every active slot, the same state."""
    model = make_transformer(seed=1)
    g = torch.Generator().manual_seed(2)
    steps = [
        (torch.randn(3, 1, DIM, generator=g), torch.tensor(act), torch.tensor(rst))
        for act, rst in [([True, False, False], [True, True, True])] * 4
        + [([True, True, False], [False, False, False])] * 6
        + [([True, True, True], [False, True, False])]
        + [([True, False, True], [False, False, False])] * 14
    ]

    spanned, cache_a = stream(model, steps)
    monkeypatch.setattr(Transformer, "_span", staticmethod(lambda cache, T, active: cache.context))
    whole, cache_b = stream(model, steps)
    for a, b in zip(spanned, whole, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert torch.equal(cache_a.key_positions, cache_b.key_positions)
    assert torch.equal(cache_a.positions, cache_b.positions)
    torch.testing.assert_close(cache_a.keys[:, :, :, :CONTEXT], cache_b.keys[:, :, :, :CONTEXT])


def test_assume_history_places_every_slot_that_far_in(spans: list[int]) -> None:
    model = make_transformer()
    cache = model.allocate_cache(2)
    cache.assume_history(5)
    assert cache.positions.tolist() == [5, 5]
    assert cache.key_positions[0].tolist() == [0, 1, 2, 3, 4] + [-1] * (CONTEXT + 1 - 5)
    with torch.no_grad():
        model.step(torch.randn(2, 1, DIM), cache, torch.ones(2, dtype=torch.bool))
    assert spans == [6, 6] and cache.positions.tolist() == [6, 6]
    spans.clear()
    cache.assume_history(CONTEXT)  # a full ring: the step's key replaces position 0's
    with torch.no_grad():
        model.step(torch.randn(2, 1, DIM), cache, torch.ones(2, dtype=torch.bool))
    assert spans == [CONTEXT, CONTEXT]
    assert cache.key_positions[1, :CONTEXT].tolist() == [CONTEXT, *range(1, CONTEXT)]
    cache.assume_history(0)
    assert cache.positions.tolist() == [0, 0] and (cache.key_positions == -1).all()
    for bad in (-1, CONTEXT + 1):
        with pytest.raises(ValueError, match=rf"within 0\.\.{CONTEXT} positions, got {bad}"):
            cache.assume_history(bad)


needs_kernel = pytest.mark.skipif(int8_kv_problem() is not None, reason=f"{int8_kv_problem()}")


@needs_kernel
@pytest.mark.parametrize("path", kernel_paths() if int8_kv_problem() is None else [])
@pytest.mark.parametrize(("dim", "heads"), [(DIM, HEADS), (256, 2)], ids=["hd8", "hd128"])
def test_an_int8_ring_equals_a_float_ring_holding_the_rounded_rows(
    monkeypatch: pytest.MonkeyPatch, dim: int, heads: int, path: str
) -> None:
    """Joins, pauses, a reset, T=2 and the wrap, once with an int8 ring and once with a float32
    ring whose new keys and values are rounded to int8 rows the same way: the same outputs
    and the same ring contents, so the int8 path stores every row where the float path does
    and attends over the same entries (each kernel path; the vnni one rounds the query and
    the softmax weights to 16 bits, hence its looser tolerance)."""
    monkeypatch.setattr(transformer, "int8_attention", functools.partial(int8_attention, path=path))
    model = make_transformer(seed=3, dim=dim, heads=heads)
    g = torch.Generator().manual_seed(4)
    steps = [
        (torch.randn(3, T, dim, generator=g), torch.tensor(act), torch.tensor(rst))
        for T, act, rst in [(1, [True, False, False], [True, True, True])] * 3
        + [(2, [True, True, False], [False, False, False])] * 4
        + [(1, [True, True, True], [False, True, False])]
        + [(1, [True, False, True], [False, False, False])] * 12
    ]

    int8_outs, int8_cache = stream(model, steps, torch.int8)
    assert int8_cache.quantized and int8_cache.keys.dtype == torch.int8
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


@needs_kernel
def test_int8_cache_views_moves_and_size() -> None:
    cache = KVCache.allocate(2, 3, 4, 8, CONTEXT, dtype=torch.int8)
    floats = KVCache.allocate(2, 3, 4, 8, CONTEXT, dtype=torch.bfloat16)
    assert cache.key_scales.shape == cache.value_scales.shape == (2, 3, 4, CONTEXT + 1)
    assert not floats.quantized and floats.key_scales is None
    # int8 rows + one float32 scale per row against bf16 rows: (8 + 4) / 16 of the entries
    entries = 2 * 2 * 4 * (CONTEXT + 1)
    assert cache.nbytes_per_slot() - entries * 12 == floats.nbytes_per_slot() - entries * 16
    head = cache.prefix(2)
    head.key_scales[1].fill_(0.5)  # a view: writes land in the cache
    assert (cache.key_scales[1, 1] == 0.5).all() and (cache.key_scales[0, 1] == 1).all()
    cache.keys[:, 2] = 7
    cache.key_scales[:, 2] = 3.0
    cache.value_scales[:, 2] = 2.0
    cache.move(2, 0)
    assert (cache.keys[:, 0] == 7).all()
    assert (cache.key_scales[:, 0] == 3).all() and (cache.value_scales[:, 0] == 2).all()
    with pytest.raises(ValueError, match="float or int8 entries, not torch.int32"):
        KVCache.allocate(1, 1, 1, 8, CONTEXT, dtype=torch.int32)
