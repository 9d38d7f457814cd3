"""Tests of dsm_stt.cpu.kernels (build and ops): the int8 KV attention kernel (each code path this machine's
build has) against PyTorch's attention over the dequantized entries, the row quantization, and
the error a machine that cannot build the kernel gets."""

from __future__ import annotations

import pytest
import torch
from engine_support import needs_kernels
from torch.nn import functional as F

from dsm_stt.cpu.kernels import build
from dsm_stt.cpu.kernels import ops as kernels
from dsm_stt.cpu.kernels.ops import int8_attention, kernel_paths, quantize_rows

pytestmark = needs_kernels

PATHS = kernel_paths() if build.problem() is None else []
# the vnni path rounds the query and the softmax weights to 16 bits: outputs within ~1e-4 of
# their scale (bf16 rounding alone is 4e-3); the float paths are exact up to summation order
TOLERANCE = {"vnni": 2e-4, "avx512": 1e-5, "avx2": 1e-5, "generic": 1e-5}


def _close(out: torch.Tensor, expected: torch.Tensor, path: str) -> None:
    err = (out.double() - expected.double()).abs().max().item()
    assert err <= TOLERANCE[path] * expected.abs().max().item(), (path, err)


def _ring(B: int, H: int, C: int, D: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    k8, ks = quantize_rows(torch.randn(B, H, C + 1, D, generator=g) * 3)
    v8, vs = quantize_rows(torch.randn(B, H, C + 1, D, generator=g))
    return k8, ks, v8, vs


def test_the_build_has_the_generic_path_and_names_the_default_first() -> None:
    assert PATHS[-1] == "generic" and set(PATHS) <= set(TOLERANCE)
    with pytest.raises(ValueError, match="unknown kernel path 'fast'"):
        k8, ks, v8, vs = _ring(1, 1, 2, 64, seed=0)
        int8_attention(
            torch.randn(1, 1, 1, 64), k8, ks, v8, vs, torch.ones(1, 1, 3, dtype=bool), path="fast"
        )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("T", "D"), [(1, 128), (2, 128), (1, 64), (2, 24), (1, 256)])
def test_int8_attention_equals_attention_over_the_dequantized_ring(
    T: int, D: int, path: str
) -> None:
    B, H, C, S = 3, 4, 40, 37  # the first S entries of a ring of C + 1: strided views
    k8, ks, v8, vs = _ring(B, H, C, D, seed=T * D)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, T, D, generator=g)
    mask = torch.rand(B, T, S, generator=g) > 0.4
    mask[:, :, 5] = True  # every query sees at least one entry
    keys = (k8.float() * ks[..., None])[:, :, :S]
    values = (v8.float() * vs[..., None])[:, :, :S]
    expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])
    out = int8_attention(q, k8[:, :, :S], ks[:, :, :S], v8[:, :, :S], vs[:, :, :S], mask, path=path)
    assert out.dtype == torch.float32 and out.shape == (B, H, T, D)
    _close(out, expected, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("S", "q_scale", "shape"),
    [(751, 1.0, "ring"), (751, 12.0, "peaked"), (3000, 1.0, "long"), (6, 0.0, "zero query")],
)
def test_int8_attention_over_long_peaked_and_flat_rows(
    S: int, q_scale: float, shape: str, path: str
) -> None:
    """A full stt-1b ring, a query whose softmax puts nearly all weight on a few entries, a
    long ring (integer sums far from overflowing), and an all-zero query (uniform weights)."""
    B, H, D = 2, 2, 128
    k8, ks, v8, vs = _ring(B, H, S - 1, D, seed=S)
    q = torch.randn(B, H, 1, D, generator=torch.Generator().manual_seed(2)) * q_scale
    mask = torch.ones(B, 1, S, dtype=torch.bool)
    mask[0, 0, : S // 3] = False
    keys, values = k8.double() * ks[..., None], v8.double() * vs[..., None]
    expected = F.scaled_dot_product_attention(q.double(), keys, values, attn_mask=mask[:, None])
    out = int8_attention(q, k8, ks, v8, vs, mask, path=path)
    _close(out, expected, path)


def test_int8_attention_takes_bf16_queries_and_a_single_visible_entry() -> None:
    B, H, C, D = 2, 2, 9, 128
    k8, ks, v8, vs = _ring(B, H, C, D, seed=3)
    q = torch.randn(B, H, 1, D).bfloat16()
    mask = torch.zeros(B, 1, C, dtype=torch.bool)
    mask[0, 0, 4] = mask[1, 0, 0] = True  # softmax over one entry: that entry's value
    out = int8_attention(q, k8[:, :, :C], ks[:, :, :C], v8[:, :, :C], vs[:, :, :C], mask)
    values = v8.float() * vs[..., None]
    torch.testing.assert_close(out[0, :, 0], values[0, :, 4], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[1, :, 0], values[1, :, 0], atol=1e-6, rtol=1e-6)


def test_int8_attention_rejects_mismatched_inputs() -> None:
    k8, ks, v8, vs = _ring(1, 2, 5, 64, seed=0)
    q = torch.randn(1, 2, 1, 64)
    mask = torch.ones(1, 1, 6, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="keys and values must be int8"):
        int8_attention(q, k8.float(), ks, v8, vs, mask)
    with pytest.raises(RuntimeError, match="mask must be"):
        int8_attention(q, k8, ks, v8, vs, mask[:, :, :5])


def test_quantize_rows_rounds_each_row_to_its_own_scale() -> None:
    x = torch.randn(5, 7, 32) * torch.logspace(-3, 2, 7)[None, :, None]
    x[0, 0] = 0.0
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (5, 7)
    assert (q[1:].abs().amax(-1) == 127).all()  # every nonzero row uses the whole grid
    assert (q[0, 0] == 0).all()
    err = (q.float() * scale[..., None] - x).abs()
    assert (err <= scale[..., None] / 2 + 1e-6 * x.abs()).all()


def test_a_machine_that_cannot_build_the_kernels_gets_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dsm_stt.config import EngineConfig
    from dsm_stt.cpu.plan import choose

    monkeypatch.setattr(build, "missing_tools", lambda: "no C++ compiler (c++) on the PATH")
    monkeypatch.setattr(build, "_built", [])
    assert build.problem() == "no C++ compiler (c++) on the PATH"
    assert not build.loaded()
    assert build.status() == "unavailable: no C++ compiler (c++) on the PATH"
    config = EngineConfig(batch_size=1, device="cpu", kv_cache="int8")
    with pytest.raises(ValueError, match="kv cache int8: no C\\+\\+ compiler"):
        choose(config)
    monkeypatch.undo()
    assert build.problem() is None and build.loaded()


def test_an_unwritable_build_folder_is_a_reason_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """A cache folder that cannot be created (here: below a plain file; in a container, a
    volume the user cannot write) makes the kernels unavailable with the reason, and ``auto``
    plans without them instead of failing."""
    from dsm_stt.config import EngineConfig
    from dsm_stt.cpu.plan import choose

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(blocker / "extensions"))
    monkeypatch.setattr(build, "_built", [])
    assert not build.cached()
    problem = build.problem()
    assert problem is not None and "build folder cannot be created" in problem
    assert "TORCH_EXTENSIONS_DIR" in problem
    plan = choose(EngineConfig(batch_size=1, device="cpu"))
    assert plan.kv_cache == "float" and not plan.fused_layers


def test_kernels_off_is_honoured_without_building(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSM_STT_KERNELS", "off")
    monkeypatch.setattr(build, "_built", [])
    assert build.missing_tools() == "the compiled CPU kernels are off (DSM_STT_KERNELS=off)"
    with pytest.raises(build.KernelUnavailable, match="DSM_STT_KERNELS=off"):
        build.module()


def test_a_restricted_family_compiles_for_that_family_only() -> None:
    from dsm_stt.cpu.features import CpuFeatures

    full = CpuFeatures(
        "x86_64",
        frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "amx_int8", "amx_tile"}),
    )
    avx2 = full.restricted_to("avx2")
    assert full.family.name == "amx" and avx2.family.name == "avx2"
    flags = build.compiler_flags(avx2)
    assert {"-mno-avx512f", "-mno-avx512vnni", "-mno-amx-int8"} <= set(flags)
    assert build.compiler_flags(full) == ["-O3", "-march=native", "-fopenmp"]
    assert build.build_name(avx2) != build.build_name(full)


needs_amx = pytest.mark.skipif(kernels.amx_problem() is not None, reason=f"{kernels.amx_problem()}")


def test_amx_pack_puts_each_weight_where_the_tiles_read_it() -> None:
    w = torch.randint(-127, 128, (40, 70), dtype=torch.int8)
    packed = kernels.amx_pack(w)
    assert packed.shape == (4, 2, 1024)  # 40 columns -> two pairs of 16; 70 inputs -> 2 x 64
    for n, k in [(0, 0), (17, 5), (39, 69), (33, 64), (5, 63)]:
        nb, kb, k4, j = n // 16, k // 64, (k % 64) // 4, k % 4
        assert packed[nb, kb, 64 * k4 + 4 * (n % 16) + j] == w[n, k]
    assert int(packed.abs().sum()) == int(w.abs().sum())  # the rest is zero padding
    with pytest.raises(ValueError, match="int8 \\[N, K\\]"):
        kernels.amx_pack(w.float())


@needs_amx
@pytest.mark.parametrize("M", [1, 5, 16, 17, 33, 70])
@pytest.mark.parametrize(("N", "K"), [(70, 130), (64, 2048), (32, 64)])
@pytest.mark.parametrize("levels", [127, 63])
def test_amx_linear_is_the_exact_integer_product(M: int, N: int, K: int, levels: int) -> None:
    """Integer sums are exact, so the result is the float64 product of the same integers, up
    to the float32 epilogue (two products)."""
    g = torch.Generator().manual_seed(M * N + K)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    scales = torch.rand(N, generator=g) * 0.01
    x = torch.randn(M, K, generator=g) * torch.logspace(-2, 2, M)[:, None]
    x[0, 0] = 0.0
    m = x.abs().amax(1, keepdim=True)
    q = torch.round(x / m * levels)  # the grid, float ops in the same order as the kernel
    expected = (q.double() @ w.double().T) * (m.double() / levels) * scales.double()
    y = kernels.amx_linear(x, kernels.amx_pack(w), scales, N, levels)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    torch.testing.assert_close(y.double(), expected, rtol=3e-7, atol=0)


needs_vnni = pytest.mark.skipif(
    kernels.vnni_problem() is not None, reason=f"{kernels.vnni_problem()}"
)


@needs_vnni
@pytest.mark.parametrize(("M", "N", "K"), [(1, 32, 64), (3, 45, 70), (8, 64, 128), (19, 96, 200)])
@pytest.mark.parametrize("levels", [127, 63])
def test_vnni_linear_is_the_exact_integer_product(M: int, N: int, K: int, levels: int) -> None:
    """The activations enter offset by 128 and the offset's share is taken off the int32
    sums: still the exact integer product (row groups of 8 and a ragged last one, padded K)."""
    g = torch.Generator().manual_seed(M * N + K + levels)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    scales = torch.rand(N, generator=g) * 0.01
    x = torch.randn(M, K, generator=g) * torch.logspace(-2, 2, M)[:, None]
    m = x.abs().amax(1, keepdim=True)
    q = torch.round(x / m * levels)
    expected = (q.double() @ w.double().T) * (m.double() / levels) * scales.double()
    sums = w.sum(1, dtype=torch.int32)
    y = kernels.vnni_linear(x, kernels.amx_pack(w), scales, N, levels, sums)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    torch.testing.assert_close(y.double(), expected, rtol=3e-7, atol=0)
    if kernels.amx_problem() is None:  # the same integer sums, the same epilogue
        assert torch.equal(y, kernels.amx_linear(x, kernels.amx_pack(w), scales, N, levels))
        single = kernels.amx_linear(x[:1], kernels.amx_pack(w), scales, N, levels, sums)
        assert torch.equal(single, y[:1])  # one row with the sums: the VNNI product


needs_avx2 = pytest.mark.skipif(
    kernels.avx2_problem() is not None, reason=f"{kernels.avx2_problem()}"
)


@needs_avx2
@pytest.mark.parametrize(
    ("M", "N", "K"), [(1, 32, 64), (1, 40, 70), (3, 45, 70), (4, 64, 128), (9, 96, 200)]
)
@pytest.mark.parametrize("levels", [127, 63])
def test_avx2_linear_is_the_exact_integer_product(M: int, N: int, K: int, levels: int) -> None:
    """Sign-adjusted pairs of 8-bit activations and weights (|a|, |w| <= 127) never saturate
    vpmaddubsw's int16 sums: the exact integer product, with rows in groups of 4 and a ragged
    last one, a ragged last block of columns and padded inputs; the same results as the VNNI
    and AMX products where this CPU has them."""
    g = torch.Generator().manual_seed(M * N + K + levels)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    w[0, :] = 127  # the largest pair sums: 2 x 127 x 127 against a row of +-127
    w[1, :] = -127
    scales = torch.rand(N, generator=g) * 0.01
    x = torch.randn(M, K, generator=g) * torch.logspace(-2, 2, M)[:, None]
    x[0, : K // 2] = x[0].abs().amax()  # many activations on the grid's ends
    x[0, K // 2 :] = -x[0].abs().amax()
    m = x.abs().amax(1, keepdim=True)
    q = torch.round(x / m * levels)
    expected = (q.double() @ w.double().T) * (m.double() / levels) * scales.double()
    y = kernels.avx2_linear(x, kernels.amx_pack(w), scales, N, levels)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    torch.testing.assert_close(y.double(), expected, rtol=3e-7, atol=0)
    sums = w.sum(1, dtype=torch.int32)
    if kernels.vnni_problem() is None:
        assert torch.equal(y, kernels.vnni_linear(x, kernels.amx_pack(w), scales, N, levels, sums))
    if kernels.amx_problem() is None:
        assert torch.equal(y, kernels.amx_linear(x, kernels.amx_pack(w), scales, N, levels))


@needs_avx2
def test_avx2_linear_rejects_mismatched_inputs() -> None:
    w = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    packed, scales = kernels.amx_pack(w), torch.ones(32)
    with pytest.raises(RuntimeError, match="disagree on the sizes"):
        kernels.avx2_linear(torch.randn(2, 200), packed, scales, 32, 127)
    with pytest.raises(RuntimeError, match="scales must be float32 \\[N\\]"):
        kernels.avx2_linear(torch.randn(2, 64), packed, torch.ones(31), 32, 127)


@needs_vnni
def test_vnni_linear_needs_the_column_sums() -> None:
    w = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    packed, scales = kernels.amx_pack(w), torch.ones(32)
    with pytest.raises(RuntimeError, match="needs the weights' column sums"):
        kernels.vnni_linear(
            torch.randn(2, 64), packed, scales, 32, 127, torch.empty(0, dtype=torch.int32)
        )
    with pytest.raises(RuntimeError, match="column sums must be int32 \\[N\\]"):
        kernels.vnni_linear(
            torch.randn(2, 64), packed, scales, 32, 127, torch.zeros(31, dtype=torch.int32)
        )
    with pytest.raises(RuntimeError, match="disagree on the sizes"):
        kernels.vnni_linear(
            torch.randn(2, 200), packed, scales, 32, 127, w.sum(1, dtype=torch.int32)
        )


@needs_amx
def test_amx_linear_rejects_mismatched_inputs() -> None:
    w = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    packed, scales = kernels.amx_pack(w), torch.ones(32)
    with pytest.raises(RuntimeError, match="disagree on the sizes"):
        kernels.amx_linear(torch.randn(2, 200), packed, scales, 32, 127)
    with pytest.raises(RuntimeError, match="scales must be float32 \\[N\\]"):
        kernels.amx_linear(torch.randn(2, 64), packed, torch.ones(31), 32, 127)
    assert kernels.amx_linear(torch.randn(0, 64), packed, scales, 32, 127).shape == (0, 32)


def test_python_threads_run_while_a_kernel_computes() -> None:
    """The kernels release the GIL: the server's event loop must not stall for a whole model
    step. While another thread runs attention calls (on one OpenMP thread, leaving a core to
    this one), this thread keeps running: had a call held the GIL, this thread's longest pause
    would be about a whole call (measured so: 0.8-1.2 x the median call under load, against
    0.3 x with the GIL released)."""
    import statistics
    import threading
    import time

    B, H, C, D, T = 4, 8, 4000, 128, 4
    k8, ks, v8, vs = _ring(B, H, C - 1, D, seed=3)
    q = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(B, T, C, dtype=torch.bool)
    calls: list[float] = []

    def work() -> None:
        for _ in range(6):
            start = time.perf_counter()
            int8_attention(q, k8, ks, v8, vs, mask, path="generic")
            calls.append(time.perf_counter() - start)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        worker = threading.Thread(target=work)
        worker.start()
        last = time.perf_counter()
        longest_pause = 0.0
        while worker.is_alive():
            now = time.perf_counter()
            longest_pause = max(longest_pause, now - last)
            last = now
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 6
    assert longest_pause < 0.5 * statistics.median(calls), (longest_pause, calls)
