"""Tests of dsm_stt.model.transformer's streaming step: which ring entries a step attends
over (only the filled part on CPU), that this gives the whole ring's result,
and ``KVCache.assume_history`` (the int8 ring: ``test_kvcache.py``)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from dsm_stt.model.transformer import KVCache, LMLayer, Transformer

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
    cache_type: type[KVCache] = KVCache,
) -> tuple[list[torch.Tensor], KVCache]:
    """Run ``steps`` (input, active mask, reset mask) on a fresh 3-slot cache of
    ``cache_type``: the active slots' outputs of every step, and the cache."""
    cache = model.allocate_cache(3, cache_type=cache_type)
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
