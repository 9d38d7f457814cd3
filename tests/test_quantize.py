"""Tests of dsm_stt.cpu.quantize: int8 weight-only projections, exact per-row arithmetic,
int8-activation projections (accuracy within the bound their arithmetic sets, rows
independent of the batch, the grid each CPU computes exactly), closeness of the quantized LM
to the float one, and the engine / CLI option."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from engine_support import make_engine
from test_lm import TINY, make_lm, random_inputs, stream
from torch import Tensor

from dsm_stt.cli import main
from dsm_stt.config import EngineConfig
from dsm_stt.cpu.features import CpuFeatures
from dsm_stt.cpu.kernels.ops import avx2_problem
from dsm_stt.cpu.plan import choose
from dsm_stt.cpu.quantize import (
    Int8Linear,
    W4A8Linear,
    W8A8Linear,
    activation_bits,
    int8_supported,
    is_quantized,
    quantize_lm_int8,
    quantize_lm_w4a8,
    quantize_lm_w8a8,
    w8a8_available,
    w8a8_kernels,
)
from dsm_stt.model.lm import LMOutput
from dsm_stt.model.synthetic import random_model


def test_rows_are_quantized_symmetrically_within_half_a_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.linspace(0.01, 3.0, 48)[:, None]
    q = Int8Linear.from_float(w)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (48, 96)
    assert torch.equal(q.weight.abs().amax(dim=1), torch.full((48,), 127, dtype=torch.int8))
    err = (q.dequantized() - w).abs()
    assert bool((err <= q.scales[:, None] / 2 + 1e-7).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_the_product_with_the_dequantized_weight(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    w = torch.randn(40, 64)
    q = Int8Linear.from_float(w.to(dtype))
    x = torch.randn(2, 3, 64).to(dtype)
    y = q(x)
    assert y.shape == (2, 3, 40) and y.dtype == dtype
    ref = x.float() @ q.dequantized().T
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.float(), ref, atol=tol * ref.abs().max().item(), rtol=0)


def test_quantized_lm_stays_close_to_the_float_lm() -> None:
    lm = make_lm()
    text, audio = random_inputs(TINY, 3, 20, seed=4)
    ref = stream(lm, text, audio)
    quantize_lm_int8(lm)
    assert is_quantized(lm)
    names = set(lm.state_dict())
    assert not any(n.endswith("in_proj_weight") for n in names)
    assert any(n.endswith("in_proj.weight") for n in names)
    assert_close_to(ref, stream(lm, text, audio))


def assert_close_to(ref: LMOutput, out: LMOutput) -> None:
    """Quantized outputs: different from the float ones, but close (logits within a tenth of
    their spread, VAD within 0.05, the same argmax at 90% of the steps at least)."""
    spread = ref.logits.std().item()
    err = (out.logits - ref.logits).abs().max().item()
    assert 0 < err < 0.1 * spread
    assert (out.vad - ref.vad).abs().max().item() < 0.05
    agree = (out.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean().item()
    assert agree >= 0.9


def test_engine_runs_quantized_and_rejects_unknown_modes() -> None:
    model = random_model("tiny", seed=0)
    engine = make_engine(model, 2, quantize="int8")
    assert is_quantized(engine.lm)
    pcm = np.random.default_rng(0).standard_normal((2, 1920)).astype(np.float32) * 0.1
    out = engine.step(pcm, np.ones(2, bool), np.ones(2, bool))
    assert len(out.tokens) == 2 and all(isinstance(t, int) for t in out.tokens)
    with pytest.raises(ValueError, match="quantize"):
        make_engine(random_model("tiny", seed=0), 1, quantize="int4")
    with pytest.raises(ValueError, match="quantize"):
        EngineConfig(quantize="fp8")


def test_bench_reports_the_quantization(capsys: pytest.CaptureFixture[str]) -> None:
    args = "bench --random-weights --model tiny --device cpu --quantize int8 --steps 2"
    code = main([*args.split(), "--warmup", "1", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["quantize"] == "int8" and result["batch_size"] == 1
    assert result["step_ms"] > 0


needs_w8a8 = pytest.mark.skipif(not w8a8_available(), reason="no int8 CPU kernels")
each_kernel = pytest.mark.parametrize("kernel", w8a8_kernels())


def w8a8_error_bound(x: Tensor, w: Tensor, bits: int) -> Tensor:
    """The worst-case |y - x @ w.T| [M, N] of the w8a8 arithmetic, from its two roundings:
    each activation is off by at most half a grid step ``m / (2 L)`` (``m = max |x_row|``,
    ``L = 2^(bits-1) - 1``), each weight by half its row's step ``s / 2`` (``s = max |w_n|
    / 127``), so ``|err| <= sum_k |w_nk| m / 2L + sum_k |x_k| s_n / 2 + K (m / 2L)(s_n / 2)``;
    the integer sums are exact and the float epilogue adds a relative 1e-6 at most."""
    levels = 2 ** (bits - 1) - 1
    half_x = x.abs().amax(dim=1, keepdim=True) / (2 * levels)  # [M, 1]
    half_w = w.abs().amax(dim=1) / 127 / 2  # [N]
    K = x.shape[1]
    bound = half_x * w.abs().sum(1) + x.abs().sum(1, keepdim=True) * half_w + K * half_x * half_w
    return bound + 1e-6 * (x.abs() @ w.abs().T)


def needs_exact_grid(kernel: str, bits: int) -> None:
    """Skip, naming the feature, where ``kernel`` saturates on ``bits``-bit activations."""
    if activation_bits(kernel) < bits:
        pytest.skip(
            f"{bits}-bit activations on {kernel} need 32-bit integer dot products (AVX512-VNNI "
            "on x86-64; without them vpmaddubsw saturates its int16 pair sums)"
        )


@each_kernel
@pytest.mark.parametrize("bits", [8, 7])
def test_w8a8_product_is_within_its_rounding_bound(kernel: str, bits: int) -> None:
    needs_exact_grid(kernel, bits)
    torch.manual_seed(2)
    w = torch.randn(64, 96) * 0.1
    x = torch.randn(5, 96) * torch.logspace(-3, 3, 5)[:, None]  # rows of very different scale
    q = W8A8Linear(w, bits=bits, kernel=kernel)
    y = q(x)
    ref = x.double() @ w.double().T
    assert y.shape == (5, 64) and y.dtype == torch.float32
    err = (y.double() - ref).abs()
    assert bool((err <= w8a8_error_bound(x.double(), w.double(), bits)).all())
    # quantization is real: the result is not the float product
    rel = (y.double() - ref).norm(dim=1) / ref.norm(dim=1)
    assert float(rel.min()) > 1e-5


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "fma"}, {"fbgemm": 7, "onednn": 7, "amx": 8, "vnni": 8}),
        ({"avx2", "fma", "avx_vnni"}, {"fbgemm": 7, "onednn": 8, "amx": 8, "vnni": 8}),
        ({"avx512f", "avx512bw"}, {"fbgemm": 7, "onednn": 7, "amx": 8, "vnni": 8}),
        ({"avx512f", "avx512bw", "avx512_vnni"}, {"fbgemm": 8, "onednn": 8, "amx": 8, "vnni": 8}),
    ],
)
def test_activation_bits_follow_the_cpus_dot_products(flags: set, expected: dict) -> None:
    features = CpuFeatures("x86_64", frozenset(flags))
    assert {k: activation_bits(k, features) for k in expected} == expected


@each_kernel
def test_w8a8_rows_do_not_depend_on_the_rest_of_the_batch(kernel: str) -> None:
    torch.manual_seed(3)
    q = W8A8Linear(torch.randn(32, 48), kernel=kernel)
    x = torch.randn(40, 48)  # enough rows for the kernels' many-row (tile) paths
    loud = x.clone()
    loud[0] *= 1e4
    loud[2] = 0
    together = q(loud)
    # the other rows' values never change a row: same number of rows, same bits
    assert torch.equal(together[1], q(x)[1])
    assert torch.equal(together[2], torch.zeros(32))
    assert bool(torch.isfinite(together).all())
    alone = q(x[1:2])
    if kernel == "fbgemm":
        assert torch.equal(together[1:2], alone)
    else:  # oneDNN's blocking by row count may round the float epilogue differently
        torch.testing.assert_close(together[1:2], alone, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(len(w8a8_kernels()) < 2, reason="needs two int8 CPU kernels")
@pytest.mark.parametrize("bits", [8, 7])
def test_w8a8_kernels_share_weights_and_grid(bits: int) -> None:
    for kernel in w8a8_kernels():
        needs_exact_grid(kernel, bits)
    torch.manual_seed(6)
    w = torch.randn(40, 64) * 0.1
    x = torch.randn(9, 64)
    first, *others = [W8A8Linear(w, bits, kernel) for kernel in w8a8_kernels()]
    # the same int8 weights times the same grid: equal up to an activation rounded to the
    # neighbouring level where a value falls half-way (one level = 1 / (2^(bits-1) - 1))
    step = 1 / (2 ** (bits - 1) - 1)
    bound = step * x.abs().amax(dim=1, keepdim=True) * w.abs().amax()
    ref = x @ w.T
    for q in others:
        assert torch.equal(first.scales, q.scales)
        assert bool(((first(x) - q(x)).abs() <= bound + 1e-5).all()), q.kernel
    for q in (first, *others):
        assert bool(((q(x) - ref).abs() <= w8a8_error_bound(x, w, bits) + 1e-5).all())


@needs_w8a8
def test_w8a8_keeps_the_activation_dtype_and_shape() -> None:
    torch.manual_seed(4)
    w = torch.randn(24, 40)
    q = W8A8Linear(w.bfloat16(), kernel=w8a8_kernels(own=False)[0])
    x = torch.randn(2, 3, 40).bfloat16()
    y = q(x)
    assert y.shape == (2, 3, 24) and y.dtype == torch.bfloat16
    flat = x.float().reshape(6, 40)
    ref = flat @ w.bfloat16().float().T
    # the w8a8 bound, plus the result's rounding to bf16 (half an ulp: 2^-9 relative)
    bound = w8a8_error_bound(flat, w.bfloat16().float(), q.bits) + ref.abs() * 2**-8
    assert bool(((y.float().reshape(6, 24) - ref).abs() <= bound + 1e-6).all())
    with pytest.raises(ValueError, match="bits"):
        W8A8Linear(w, bits=4)
    with pytest.raises(ValueError, match="kernel must be one of fbgemm, onednn"):
        W8A8Linear(w, kernel="cublas")


@needs_w8a8
def test_w8a8_lm_stays_close_to_the_float_lm() -> None:
    lm = make_lm()
    text, audio = random_inputs(TINY, 3, 20, seed=5)
    ref = stream(lm, text, audio)
    quantize_lm_w8a8(lm)
    assert is_quantized(lm)
    assert sum(isinstance(m, W8A8Linear) for m in lm.modules()) == 4 * len(lm.transformer.layers)
    out = stream(lm, text, audio)
    assert_close_to(ref, out)
    assert quantize_lm_w8a8(lm) is lm  # already w8a8: unchanged
    assert torch.equal(stream(lm, text, audio).logits, out.logits)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_lm_int8(lm)
    other = make_lm()
    quantize_lm_int8(other)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_lm_w8a8(other)
    first = lm.transformer.layers[0].gating.linear_in
    kernel, bits = first.kernel, first.bits
    assert bits == activation_bits(kernel)
    assert quantize_lm_w8a8(lm, bits, kernel) is lm
    other_bits = 15 - bits  # 7 <-> 8
    with pytest.raises(ValueError, match=f"already quantized .w8a8, {bits}-bit activations"):
        quantize_lm_w8a8(lm, other_bits, kernel)
    with pytest.raises(ValueError, match=f"already quantized .w8a8, {bits}-bit activations"):
        quantize_lm_w8a8(lm, other_bits)
    with pytest.raises(ValueError, match="w8a8 kernel must be one of"):
        quantize_lm_w8a8(make_lm(), kernel="nope")


@needs_w8a8
def test_engine_runs_w8a8_and_bench_reports_it(capsys: pytest.CaptureFixture[str]) -> None:
    engine = make_engine(random_model("tiny", seed=0), 2, quantize="w8a8")
    assert any(isinstance(m, W8A8Linear) for m in engine.lm.modules())
    pcm = np.random.default_rng(1).standard_normal((2, 1920)).astype(np.float32) * 0.1
    out = engine.step(pcm, np.ones(2, bool), np.ones(2, bool))
    assert len(out.tokens) == 2 and all(isinstance(t, int) and t >= 0 for t in out.tokens)
    assert EngineConfig(quantize="w8a8").quantize == "w8a8"
    args = "bench --random-weights --model tiny --device cpu --quantize w8a8 --steps 2"
    assert main([*args.split(), "--warmup", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["quantize"] == "w8a8" and result["step_ms"] > 0
    picked = choose(EngineConfig(batch_size=1, device="cpu", quantize="w8a8")).w8a8_kernel
    assert result["w8a8_kernel"] == picked


@pytest.mark.skipif("onednn" not in w8a8_kernels(own=False), reason="no oneDNN int8 kernel")
def test_engine_quantizes_with_the_kernel_of_its_plan() -> None:
    from dsm_stt.cpu.plan import Plan
    from dsm_stt.loading import build_engine

    plan = Plan("cpu", torch.bfloat16, "w8a8", "float", "onednn", activation_bits("onednn"))
    model = random_model("tiny", seed=0)
    config = EngineConfig(batch_size=8, device="cpu")
    engine = build_engine(model, config, plan, announce=lambda line: None)
    kernels = {m.kernel for m in engine.lm.modules() if isinstance(m, W8A8Linear)}
    assert engine.w8a8_kernel == "onednn" and kernels == {"onednn"}
    pcm = np.random.default_rng(1).standard_normal((8, 1920)).astype(np.float32) * 0.1
    out = engine.step(pcm, np.ones(8, bool), np.ones(8, bool))
    assert all(isinstance(t, int) and t >= 0 for t in out.tokens)
    # a second engine on the same model converts it to bf16 again: the kernel's float32
    # scales stay float32 and the steps give the same tokens
    again = build_engine(model, config, plan, announce=lambda line: None)
    assert again.step(pcm, np.ones(8, bool), np.ones(8, bool)).tokens == out.tokens
    # another grid on the same model is refused: its float weights are gone
    with pytest.raises(ValueError, match=r"already quantized \(w8a8, .* onednn kernel"):
        quantize_lm_w8a8(engine.lm, 15 - plan.w8a8_bits, "onednn")


def test_int8_is_refused_where_the_build_has_no_kernel() -> None:
    assert int8_supported("cpu")
    assert not int8_supported("meta")
    with pytest.raises(ValueError, match="no int8 kernel for meta"):
        quantize_lm_int8(random_model("tiny", seed=0).lm.to("meta"))


def test_w8a8_refuses_weights_off_the_cpu() -> None:
    with pytest.raises(ValueError, match="CPU only"):
        W8A8Linear(torch.empty(4, 8, device="meta"))
    with pytest.raises(ValueError, match="CPU only"):
        quantize_lm_w8a8(random_model("tiny", seed=0).lm.to("meta"))


# --- w4a8: int4 weights in groups of 64, int8 activations (AVX2 kernel) -------------------------

needs_avx2_product = pytest.mark.skipif(
    avx2_problem() is not None, reason=f"no avx2 product: {avx2_problem()}"
)


def _w4a8_reference(x: Tensor, q: Tensor, group_scales: Tensor) -> Tensor:
    """The product W4A8Linear computes, in float64: x's rows on the 127-step grid, each group
    of 64 inputs summed exactly and scaled, the groups added, times max|x| / 127."""
    M, K = x.shape
    G = group_scales.shape[1]
    m = x.double().abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    xq = torch.zeros(M, 64 * G, dtype=torch.float64)
    xq[:, :K] = torch.round(x.double() / m * 127)
    qw = torch.zeros(q.shape[0], 64 * G, dtype=torch.float64)
    qw[:, :K] = q.double()
    sums = torch.einsum("mgk,ngk->mng", xq.view(M, G, 64), qw.view(-1, G, 64))
    return (sums * group_scales.double()[None]).sum(-1) * (m / 127)


@needs_avx2_product
@pytest.mark.parametrize(("n", "k"), [(32, 64), (37, 130), (200, 300)])
def test_w4a8_product_is_its_int4_arithmetic(n: int, k: int) -> None:
    """Sizes that pad both ways (columns to 32, inputs to 64): the kernel's result is the
    float64 value of its own quantized arithmetic, up to float32 rounding."""
    g = torch.Generator().manual_seed(n + k)
    weight = torch.randn(n, k, generator=g)
    layer = W4A8Linear(weight)
    q, scales = W4A8Linear.quantize(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 7 and int(q.abs().min()) == 0
    groups = -(-k // 64)
    assert scales.shape == (n, groups)
    # each group's largest weight lands on ±7
    padded = torch.zeros(n, 64 * groups)
    padded[:, :k] = weight
    torch.testing.assert_close(scales, padded.view(n, groups, 64).abs().amax(-1) / 7)
    for rows in (1, 2, 3, 4, 5, 9):
        x = torch.randn(rows, k, generator=g)
        y = layer(x)
        ref = _w4a8_reference(x, q, scales)
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
        # and close to the float product, within what 4-bit weights allow
        exact = x.double() @ weight.double().T
        assert (y.double() - exact).norm() <= 0.2 * exact.norm()


@needs_avx2_product
def test_w4a8_rows_do_not_depend_on_the_batch_and_keep_the_dtype() -> None:
    layer = W4A8Linear(torch.randn(48, 96, generator=torch.Generator().manual_seed(3)))
    x = torch.randn(6, 96, generator=torch.Generator().manual_seed(4))
    together = layer(x)
    for i in range(6):
        assert torch.equal(layer(x[i : i + 1]), together[i : i + 1])
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    assert layer(x.view(2, 3, 96)).shape == (2, 3, 48)


@needs_avx2_product
def test_quantize_lm_w4a8_swaps_each_projection_once() -> None:
    lm = make_lm()
    float_logits = stream(lm, *random_inputs(lm.cfg, 2, 6, seed=1)).logits
    assert quantize_lm_w4a8(lm) is lm and is_quantized(lm)
    layer = lm.transformer.layers[0]
    packed = layer.self_attn.in_proj.packed
    assert isinstance(layer.gating.linear_out, W4A8Linear)
    assert quantize_lm_w4a8(lm).transformer.layers[0].self_attn.in_proj.packed is packed
    logits = stream(lm, *random_inputs(lm.cfg, 2, 6, seed=1)).logits
    # near the float logits, as far as 4-bit weights allow (0.14 of their spread here; w8a8: 0.02)
    error = (logits - float_logits).abs().max() / float_logits.std()
    assert logits.shape == float_logits.shape and error < 0.5, float(error)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_lm_w8a8(lm)
    with pytest.raises(ValueError, match="already quantized \\(int8 or w8a8\\)"):
        quantize_lm_w4a8(quantize_lm_int8(make_lm()))


@needs_avx2_product
def test_bench_runs_w4a8_on_its_product(capsys: pytest.CaptureFixture[str]) -> None:
    args = "bench --random-weights --model tiny --device cpu --quantize w4a8 --steps 2"
    assert main([*args.split(), "--warmup", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["quantize"], result["w8a8_kernel"]) == ("w4a8", "avx2_int4")
    assert result["fused_layers"] and result["step_ms"] > 0
