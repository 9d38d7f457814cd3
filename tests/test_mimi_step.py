"""Tests for dsm_stt.cpu.mimi_step: the fused Mimi encoder-transformer step computes the module
path's function (outputs and ring within float32 rounding) for active, idle and restarted
slots, past the ring's wrap, and refuses layers it cannot compute."""

from __future__ import annotations

import pytest
import torch
from test_mimi import TINY, tiny_encoder

from dsm_stt.cpu import mimi_step
from dsm_stt.cpu.float_linear import pack_mimi
from dsm_stt.cpu.kernels import ops
from dsm_stt.cpu.kernels.build import problem as kernels_problem
from dsm_stt.cpu.mimi_step import FusedMimiTransformer
from dsm_stt.model.transformer import Transformer


def _problem() -> str | None:
    return kernels_problem() or ops.avx2_problem()


pytestmark = pytest.mark.skipif(_problem() is not None, reason=f"{_problem()}")


def test_the_fused_step_is_the_module_path_within_float32_rounding() -> None:
    packed = pack_mimi(tiny_encoder(seed=2)).encoder_transformer.transformer
    fused = FusedMimiTransformer(packed)
    B, T, D = 3, 2, TINY.dimension
    mine = fused.allocate_cache(B)
    ref = packed.allocate_cache(B)
    g = torch.Generator().manual_seed(0)
    steps = 3 * TINY.context  # well past the ring's wrap
    for step in range(steps):
        x = torch.randn(B, T, D, generator=g)
        active = torch.tensor([True, step % 3 != 1, True])  # slot 1 idles every third step
        if step == steps // 2:  # slot 2 restarts
            for cache in (mine, ref):
                cache.reset(torch.tensor([False, False, True]))
        ours, theirs = fused.step(x, mine, active), packed.step(x, ref, active)
        torch.testing.assert_close(ours[active], theirs[active], rtol=1e-4, atol=1e-5)
    ring = slice(0, TINY.context)  # the trash entry holds the idle slot's ignored rows
    torch.testing.assert_close(
        mine.keys[..., ring, :], ref.keys[..., ring, :], rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        mine.values[..., ring, :], ref.values[..., ring, :], rtol=1e-4, atol=1e-5
    )
    assert torch.equal(mine.positions, ref.positions)
    assert torch.equal(mine.key_positions, ref.key_positions)


def test_other_dtypes_take_the_module_path_and_unpacked_layers_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unpacked = tiny_encoder(seed=1).encoder_transformer.transformer
    with pytest.raises(ValueError, match="packed"):
        FusedMimiTransformer(unpacked)
    packed = pack_mimi(tiny_encoder(seed=1)).encoder_transformer.transformer
    fused = FusedMimiTransformer(packed)
    assert isinstance(fused, Transformer) and fused.layers[0] is packed.layers[0]
    calls = []
    compiled = mimi_step.mimi_layer_step
    monkeypatch.setattr(
        mimi_step, "mimi_layer_step", lambda *a, **k: (calls.append(1), compiled(*a, **k))[1]
    )
    one = torch.ones(1, dtype=torch.bool)
    x = torch.randn(1, 2, TINY.dimension)
    with pytest.raises(RuntimeError):  # float64: the module path, which meets float32 weights
        fused.step(x.double(), fused.allocate_cache(1, dtype=torch.float64), one)
    assert calls == []
    fused.step(x, fused.allocate_cache(1), one)
    assert len(calls) == len(fused.layers)  # float32: one fused call per layer
