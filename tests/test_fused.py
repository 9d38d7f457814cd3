"""Tests of dsm_stt.cpu.fused: the one-call-per-layer decode step of an LM quantized w8a8 on
this package's AMX, VNNI or AVX2 kernel (or w4a8 on AVX2) with an int8 KV ring. It must give the module path's
logits, VAD and ring contents bit for bit (float32 and bfloat16, inactive slots, resets, a
wrapped ring, a prefix of the slots), be taken exactly where it applies, and refuse what it
cannot compute."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_lm import TINY, make_lm

from dsm_stt.cpu import fused as fused_module
from dsm_stt.cpu.fused import FusedTransformer
from dsm_stt.cpu.kernels.ops import amx_problem, avx2_problem, lm_layer_step, vnni_problem
from dsm_stt.cpu.kvcache import Int8KVCache
from dsm_stt.cpu.quantize import quantize_lm_w4a8, quantize_lm_w8a8, w8a8_kernels
from dsm_stt.model.lm import LM
from dsm_stt.model.transformer import Transformer

OWN_KERNELS = [
    pytest.param(
        kernel,
        marks=pytest.mark.skipif(problem is not None, reason=f"no {kernel} kernel: {problem}"),
    )
    for kernel, problem in (
        ("amx", amx_problem()),
        ("vnni", vnni_problem()),
        ("avx2", avx2_problem()),
        ("avx2_int4", avx2_problem()),  # w4a8: int4 weights on the AVX2 product
    )
]

# head size 64 takes the attention kernel's integer (VNNI) path, TINY's 16 the generic one;
# 80 (stt-2.6b's) mixes whole and partial vectors of RoPE pairs, and a width of 160 pads the
# products' inputs to whole tiles
WIDE = dataclasses.replace(TINY, dim=128, num_heads=2, hidden_dim=176, context=8)
ODD = dataclasses.replace(TINY, dim=160, num_heads=2, hidden_dim=240, context=8)


def quantized_lm(cfg, dtype: torch.dtype, seed: int = 0, kernel: str = "vnni") -> LM:
    """A w8a8 LM on ``kernel`` (``avx2_int4``: w4a8) with the fused transformer installed; its
    module-path twin is ``module_path(lm)`` (the same layers in a plain ``Transformer``)."""
    base = make_lm(cfg, seed).to(dtype)
    lm = quantize_lm_w4a8(base) if kernel == "avx2_int4" else quantize_lm_w8a8(base, 8, kernel)
    lm.transformer = FusedTransformer(lm.transformer)
    return lm


def module_path(fused: FusedTransformer) -> Transformer:
    return Transformer(
        list(fused.layers), fused.num_heads, fused.head_dim, fused.context, fused.max_period
    )


def run_steps(lm: LM, fused: bool, B: int, steps: int, seed: int, prefix: int | None = None):
    """Stream ``steps`` positions through ``lm`` on a fresh int8 ring, with the fused path on
    or off: a slot idles for a few steps, another restarts halfway. Returns the outputs and
    the cache."""
    saved = lm.transformer
    lm.transformer = saved if fused else module_path(saved)
    try:
        g = torch.Generator().manual_seed(seed)
        cache = lm.allocate_state(B, cache_type=Int8KVCache)
        view = cache if prefix is None else cache.prefix(prefix)
        n = B if prefix is None else prefix
        outs = []
        for t in range(steps):
            active = torch.ones(n, dtype=torch.bool)
            active[-1] = not (2 <= t < 5)
            reset = torch.zeros(n, dtype=torch.bool)
            reset[0] = t == steps // 2
            view.reset(reset)
            text = torch.randint(0, lm.cfg.text_card, (n,), generator=g)
            audio = torch.randint(0, lm.cfg.card, (n, lm.cfg.n_q), generator=g)
            out = lm.step(text, audio, view, active)
            outs.append((out.logits[active], out.vad[active]))
        return outs, cache
    finally:
        lm.transformer = saved


@pytest.mark.parametrize("kernel", OWN_KERNELS)
@pytest.mark.parametrize("cfg", [TINY, WIDE, ODD], ids=["head16", "head64", "head80"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_equals_the_module_step_bit_for_bit(
    cfg, dtype: torch.dtype, kernel: str
) -> None:
    lm = quantized_lm(cfg, dtype, kernel=kernel)
    assert isinstance(lm.transformer, FusedTransformer)
    steps = 3 * cfg.context  # the ring wraps around
    ours, cache = run_steps(lm, True, 3, steps, seed=1)
    ref, ref_cache = run_steps(lm, False, 3, steps, seed=1)
    for t, ((logits, vad), (ref_logits, ref_vad)) in enumerate(zip(ours, ref, strict=True)):
        assert torch.equal(logits, ref_logits), f"logits differ at step {t}"
        assert torch.equal(vad, ref_vad), f"VAD differs at step {t}"
    for name in ("keys", "values", "key_scales", "value_scales", "key_positions", "positions"):
        mine, theirs = getattr(cache, name), getattr(ref_cache, name)
        # the trash entry (last) holds the idle slot's ignored rows: compare the ring proper
        if name in ("keys", "values", "key_scales", "value_scales"):
            mine, theirs = mine[:, :, :, :-1], theirs[:, :, :, :-1]
        assert torch.equal(mine, theirs), name
    assert int(cache.keys.abs().amax()) == 127  # the ring was written


@pytest.mark.skipif(
    amx_problem() is not None or vnni_problem() is not None,
    reason="needs both the amx and the vnni kernels",
)
def test_amx_and_vnni_products_give_the_same_steps() -> None:
    """Both products compute the same integer sums with the same epilogue."""
    amx = quantized_lm(WIDE, torch.bfloat16, seed=5, kernel="amx")
    vnni = quantized_lm(WIDE, torch.bfloat16, seed=5, kernel="vnni")
    assert (amx.transformer.kernel, vnni.transformer.kernel) == ("amx", "vnni")
    ours, cache = run_steps(amx, True, 3, 10, seed=6)
    theirs, their_cache = run_steps(vnni, True, 3, 10, seed=6)
    for (logits, _), (their_logits, _) in zip(ours, theirs, strict=True):
        assert torch.equal(logits, their_logits)
    assert torch.equal(cache.keys, their_cache.keys)


@pytest.mark.parametrize("kernel", OWN_KERNELS)
def test_fused_step_on_a_prefix_of_the_slots(kernel: str) -> None:
    lm = quantized_lm(WIDE, torch.bfloat16, seed=2, kernel=kernel)
    ours, cache = run_steps(lm, True, 4, 12, seed=3, prefix=2)
    ref, ref_cache = run_steps(lm, False, 4, 12, seed=3, prefix=2)
    for (logits, _), (ref_logits, _) in zip(ours, ref, strict=True):
        assert torch.equal(logits, ref_logits)
    assert torch.equal(cache.keys, ref_cache.keys)
    assert not cache.keys[:, 2:].any()  # the slots past the prefix were never written


@pytest.mark.parametrize("kernel", OWN_KERNELS)
def test_fused_path_is_taken_exactly_where_it_applies(
    monkeypatch: pytest.MonkeyPatch, kernel: str
) -> None:
    lm = quantized_lm(TINY, torch.bfloat16, kernel=kernel)
    calls = []
    real = fused_module.lm_layer_step
    monkeypatch.setattr(
        fused_module, "lm_layer_step", lambda *a, **k: calls.append(a[6]) or real(*a, **k)
    )
    text = torch.zeros(2, dtype=torch.long)
    audio = torch.zeros(2, TINY.n_q, dtype=torch.long)
    active = torch.ones(2, dtype=torch.bool)
    lm.step(text, audio, lm.allocate_state(2, cache_type=Int8KVCache), active)
    assert calls == list(range(TINY.num_layers))  # one call per layer, in order
    calls.clear()
    lm.step(text, audio, lm.allocate_state(2), active)  # float ring: the module path
    assert calls == []
    if "fbgemm" in w8a8_kernels(own=False):  # other kernels have no fused step
        other = quantize_lm_w8a8(make_lm(), 7, "fbgemm")
        assert not FusedTransformer.supports(other.transformer.layers)


def test_fused_layers_refuse_layers_they_cannot_compute() -> None:
    with pytest.raises(ValueError, match="w8a8 on the amx, vnni or avx2 kernel, or w4a8"):
        FusedTransformer(make_lm().transformer)  # float projections
    assert not FusedTransformer.supports(torch.nn.ModuleList())


@pytest.mark.parametrize("kernel", OWN_KERNELS)
def test_layer_step_rejects_inputs_that_do_not_fit(kernel: str) -> None:
    lm = quantized_lm(TINY, torch.float32, kernel=kernel)
    fused = lm.transformer
    layer = fused.layers[0]
    cache = lm.allocate_state(2, cache_type=Int8KVCache)
    rings = (cache.keys, cache.key_scales, cache.values, cache.value_scales)
    half = TINY.dim // TINY.num_heads // 2
    good = dict(
        x=torch.randn(2, TINY.dim),
        norms=(layer.norm1.alpha, layer.norm2.alpha),
        eps=1e-8,
        projections=fused.projections[0],
        levels=127,
        cache_rings=rings,
        layer=0,
        write_index=torch.zeros(2, dtype=torch.long),
        rot=(torch.ones(2, half), torch.zeros(2, half)),
        mask=torch.ones(2, 3, dtype=torch.bool),
        num_heads=TINY.num_heads,
        product=fused.kernel,
    )
    assert lm_layer_step(**good).shape == (2, TINY.dim)
    bad = {
        "x must be float32 or bfloat16": dict(x=torch.randn(2, TINY.dim).half()),
        "projection sizes do not fit": dict(x=torch.randn(2, 2 * TINY.dim)),
        "layer out of range": dict(layer=TINY.num_layers),
        "write_index out of the ring": dict(write_index=torch.tensor([0, 10**6])),
        "mask must be bool": dict(mask=torch.ones(2, 3)),
        "within the ring": dict(mask=torch.ones(2, 10**4, dtype=torch.bool)),
        "cos must be": dict(rot=(torch.ones(2, half + 1), torch.zeros(2, half))),
    }
    for message, change in bad.items():
        with pytest.raises(RuntimeError, match=message):
            lm_layer_step(**{**good, **change})
    with pytest.raises(
        ValueError, match="product must be one of vnni, amx, avx2, avx2_int4, got 'tiles'"
    ):
        lm_layer_step(**{**good, "product": "tiles"})
