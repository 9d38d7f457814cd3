"""Tests for dsm_stt.cpu.float_linear and the AVX2 float kernels under it (``float_linear``,
``vq_search``): the products equal float64 ones within float32 rounding, a row's result does
not depend on the other rows, and a Mimi with the compiled pieces swapped in keeps its
checkpoint names and gives the float path's codes."""

from __future__ import annotations

import pytest
import torch
from test_mimi import TINY, make_audio, stream, tiny_encoder

from dsm_stt.cpu.codebook import KernelResidualVQ
from dsm_stt.cpu.float_linear import PackedLinear, PackedStridedConv, is_packed, pack_mimi
from dsm_stt.cpu.kernels import ops
from dsm_stt.cpu.kernels.build import problem as kernels_problem
from dsm_stt.cpu.mimi_step import FusedMimiTransformer
from dsm_stt.model.mimi import MimiEncoder


def _avx2_problem() -> str | None:
    return kernels_problem() or ops.avx2_problem()


pytestmark = pytest.mark.skipif(_avx2_problem() is not None, reason=f"{_avx2_problem()}")


def packed_encoder(seed: int) -> MimiEncoder:
    model = pack_mimi(tiny_encoder(seed))
    holder = model.encoder_transformer
    holder.transformer = FusedMimiTransformer(holder.transformer)
    for half in ("rvq_first", "rvq_rest"):
        setattr(model.quantizer, half, KernelResidualVQ(getattr(model.quantizer, half)))
    return model


@pytest.mark.parametrize(("M", "N", "K"), [(1, 40, 70), (2, 512, 2048), (5, 33, 128), (7, 96, 9)])
def test_float_linear_is_the_product_within_float32_rounding(M: int, N: int, K: int) -> None:
    g = torch.Generator().manual_seed(M + N + K)
    w, x, bias = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g), torch.randn(N)
    packed = ops.float_pack(w)
    assert packed.shape == (4 * -(-N // 32), K, 8)
    y = ops.float_linear(x, packed, N, bias)
    expected = x.double() @ w.double().T + bias.double()
    assert y.dtype == torch.float32 and y.shape == (M, N)
    # one chain of K fused multiply-adds per output: error within K roundings of the sum
    bound = K * 2**-24 * (x.double().abs() @ w.double().abs().T).max()
    assert (y.double() - expected).abs().max() <= bound
    for m in range(M):  # each row alone gives the same bits
        assert torch.equal(ops.float_linear(x[m : m + 1], packed, N, bias), y[m : m + 1])


def test_float_linear_without_bias_and_bad_inputs() -> None:
    w, x = torch.randn(20, 16), torch.randn(3, 16)
    packed = ops.float_pack(w)
    torch.testing.assert_close(ops.float_linear(x, packed, 20), x @ w.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="x has 15 inputs, the weights 16"):
        ops.float_linear(torch.randn(3, 15), packed, 20)
    with pytest.raises(RuntimeError, match="do not have 40 outputs"):
        ops.float_linear(x, packed, 40)
    with pytest.raises(RuntimeError, match="bias must be float32 \\[N\\]"):
        ops.float_linear(x, packed, 20, torch.ones(19))
    with pytest.raises(ValueError, match="float \\[N, K\\] weights"):
        ops.float_pack(torch.ones(3, 4, 5))


def test_packed_linear_keeps_the_replaced_modules_names_and_rows_their_results() -> None:
    linear = torch.nn.Linear(24, 40)
    packed = PackedLinear(linear.weight, linear.bias)
    assert set(packed.state_dict()) == {"weight", "bias"}
    assert set(PackedLinear(linear.weight, register=False).state_dict()) == set()
    many = torch.randn(100, 2, 24)
    for rows in (1, 3, 100):  # any number of rows: the same bits for each row
        torch.testing.assert_close(packed(many[:rows]), linear(many[:rows]), rtol=1e-5, atol=1e-5)
        assert torch.equal(packed(many[:rows]), packed(many)[:rows])


@pytest.mark.parametrize("batch", [1, 5, 33])
def test_kernel_codebook_search_gives_the_float_paths_codes(batch: int) -> None:
    quantizer = tiny_encoder(seed=4).quantizer
    g = torch.Generator().manual_seed(batch)
    latent = torch.randn(batch, TINY.dimension, 1, generator=g) * 3
    expected = quantizer.encode(latent)
    assert expected[:, 1:].unique().numel() > min(batch, 10)  # the search picks varied entries
    keys = set(quantizer.state_dict())
    for half in ("rvq_first", "rvq_rest"):
        setattr(quantizer, half, KernelResidualVQ(getattr(quantizer, half)))
    assert set(quantizer.state_dict()) == keys
    assert torch.equal(quantizer.encode(latent), expected)
    with torch.no_grad():  # a codebook changed in place: its norms are computed again
        quantizer.rvq_rest.vq.layers[0]._codebook.embedding.mul_(-1)
    assert not torch.equal(quantizer.encode(latent), expected)


def test_vq_search_refuses_a_width_it_cannot_vectorize() -> None:
    books = [torch.randn(16, 12)]
    with pytest.raises(RuntimeError, match="multiple of 8, got 12"):
        ops.vq_search(torch.randn(1, 12), books, [b.pow(2).sum(-1) for b in books])


def test_a_packed_mimi_keeps_its_names_and_gives_the_float_paths_codes() -> None:
    reference, packed = tiny_encoder(seed=3), packed_encoder(seed=3)
    assert set(packed.state_dict()) == set(reference.state_dict())
    assert is_packed(packed) and not is_packed(reference)
    assert any(isinstance(m, PackedStridedConv) for m in packed.encoder.model)
    assert isinstance(packed.downsample.conv, PackedStridedConv)
    layer = packed.encoder_transformer.transformer.layers[0]
    assert isinstance(layer.linear1, PackedLinear) and isinstance(
        layer.self_attn.in_proj, PackedLinear
    )
    pcm = make_audio(1.6, seed=5, batch=3)
    expected = stream(reference, pcm, [1])
    assert expected[:, 1:].unique().numel() > 10
    for chunks in ([1], [3, 1, 2]):
        assert torch.equal(stream(packed, pcm, chunks), expected), chunks
    assert pack_mimi(packed) is packed  # packing again changes nothing
    assert set(packed.state_dict()) == set(reference.state_dict())
