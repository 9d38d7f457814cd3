"""Python signatures of the compiled CPU kernels (the ``.cpp`` sources here): what each takes and returns.

Owns the thin wrappers over the compiled module: ``int8_attention`` (attention of new queries
over an int8 KV ring, for ``kvcache.Int8KVCache``), ``amx_pack`` / ``amx_linear`` /
``vnni_linear`` (the int8 products of ``quantize.W8A8Linear`` on AMX tiles or AVX512-VNNI),
``lm_layer_step`` (a whole LM layer's decode step, for ``fused.FusedTransformer``) and
``vq_encode`` (Mimi's codebook search in one call, for ``codebook.CompiledResidualVQ``). Each
call builds the module on first use (``build.module``); none is called unless the installed
plan runs it. ``quantize_rows`` is the pure-PyTorch int8 row quantization the ring shares.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .build import module

# the compiled integer products, by their index in int8_product.cpp (``avx2_int4``: int4 weights)
PRODUCTS = ("vnni", "amx", "avx2", "avx2_int4")


def amx_problem() -> str | None:
    """None when ``amx_linear`` can run here (the kernels built now if need be), else why not."""
    return _problem("amx_problem")


def vnni_problem() -> str | None:
    """None when ``vnni_linear`` can run here (the kernels built now if need be), else why not."""
    return _problem("vnni_problem")


def avx2_problem() -> str | None:
    """None when ``avx2_linear`` can run here (the kernels built now if need be), else why not."""
    return _problem("avx2_problem")


def _problem(check: str) -> str | None:
    from .build import KernelUnavailable

    try:
        built = module()
    except KernelUnavailable as exc:
        return str(exc)
    return getattr(built, check)() or None


_PATHS = {"best": 0, "vnni": 1, "avx512": 2, "generic": 3, "avx2": 4}


def kernel_paths() -> list[str]:
    """The code paths of this machine's build, best first: ``vnni`` (integer dot products,
    AVX512-VNNI), ``avx512`` (int8 converted to float32 in registers), ``avx2`` (the same on
    8-float registers), ``generic`` (plain loops). The first is what ``int8_attention`` takes by default for head sizes 64, 128 and
    256; other head sizes take ``generic``."""
    return list(module().paths())


def int8_attention(
    q: Tensor,
    keys: Tensor,
    key_scales: Tensor,
    values: Tensor,
    value_scales: Tensor,
    mask: Tensor,
    path: str = "best",
) -> Tensor:
    """``softmax(q · k / sqrt(D) masked) · v`` with ``k = keys * key_scales`` (and ``v`` alike).

    ``q`` [B, H, T, D] float; ``keys``/``values`` int8 [B, H, S, D] (any strides with a
    contiguous last dim: views of a ring); scales float32 [B, H, S]; ``mask`` bool [B, T, S],
    true where a query may see an entry (each query must see at least one). Returns float32
    [B, H, T, D]. ``path`` forces one of ``kernel_paths()`` (tests compare them); the ``vnni``
    path rounds the query and the softmax weights to 16 bits on the way (relative error
    ~1e-5, against ~4e-3 for bf16)."""
    if path not in _PATHS:
        raise ValueError(f"unknown kernel path {path!r}: expected one of {sorted(_PATHS)}")
    scale = q.shape[-1] ** -0.5
    return module().attend(
        q.float().contiguous(), keys, key_scales, values, value_scales, mask, scale, _PATHS[path]
    )


def amx_pack(weight: Tensor) -> Tensor:
    """int8 weights [N, K] → the AMX tiles' layout [NB, KB, 1024], zero-padded to whole tiles
    (``NB`` blocks of 16 output columns, even; ``KB`` steps of 64 inputs): byte
    ``(k4, n, j)`` of tile ``(nb, kb)`` is ``weight[16 nb + n, 64 kb + 4 k4 + j]``."""
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(
            f"amx_pack takes int8 [N, K] weights, got {weight.dtype} {list(weight.shape)}"
        )
    N, K = weight.shape
    NB, KB = 2 * -(-N // 32), -(-K // 64)
    padded = weight.new_zeros(16 * NB, 64 * KB)
    padded[:N, :K] = weight
    tiles = padded.view(NB, 16, KB, 16, 4).permute(0, 2, 3, 1, 4)
    return tiles.contiguous().view(NB, KB, 1024)


def amx_linear(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    out_features: int,
    levels: int,
    column_sums: Tensor | None = None,
) -> Tensor:
    """``W8A8Linear``'s product on the AMX tiles: ``x`` [M, K] float, ``packed`` from
    ``amx_pack``, per-output ``scales`` float32 [N]; each row of ``x`` is quantized to
    ``round(x / max|x| * levels)``. Returns float32 [M, N]. With the weights' int32
    ``column_sums`` (see ``vnni_linear``) a single row takes the VNNI product, which streams
    the weights faster than the tiles (16 rows each, whatever the count): same results."""
    sums = torch.empty(0, dtype=torch.int32) if column_sums is None else column_sums
    return _int8_linear(x, packed, scales, out_features, levels, sums, "amx")


def vnni_linear(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    out_features: int,
    levels: int,
    column_sums: Tensor,
) -> Tensor:
    """``amx_linear``'s product on AVX512-VNNI (CPUs without AMX tiles): the same packed
    weights, plus their int32 ``column_sums`` [N] (``weight.sum(1)``: the activations enter
    ``vpdpbusd`` offset by 128 to be unsigned, and ``128 * column_sums`` is taken off the exact
    int32 sums). The same integer sums, so the same results as ``amx_linear``."""
    return _int8_linear(x, packed, scales, out_features, levels, column_sums, "vnni")


def avx2_linear(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    out_features: int,
    levels: int,
    column_sums: Tensor | None = None,
) -> Tensor:
    """``amx_linear``'s product on AVX2 (CPUs without AVX-512): the same packed weights and
    the same exact integer sums (``vpsignb`` / ``vpmaddubsw`` / ``vpmaddwd``, which never
    saturate with activations and weights within +-127), so the same results; the column sums
    are not needed (accepted and ignored, so every product takes the same arguments)."""
    del column_sums
    return _int8_linear(
        x, packed, scales, out_features, levels, torch.empty(0, dtype=torch.int32), "avx2"
    )


def int4_pack(weight: Tensor, group_scales: Tensor) -> tuple[Tensor, Tensor]:
    """int4 weights [N, K] (values in -7..7, one scale per output column and 64 inputs:
    ``group_scales`` float32 [N, ceil(K / 64)]) → the AVX2 int4 product's layout: nibbles
    [NB, KB, 512] (int8 storage) and scales [NB, KB, 16]. Byte ``i`` of k4-row ``k4`` of block
    ``(nb, kb)`` holds, plus 8, ``amx_pack``'s byte ``i`` (low nibble, columns 0-7) and byte
    ``i + 32`` (high nibble, columns 8-15) of that k4-row."""
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"int4_pack takes int8 [N, K] weights, got {weight.dtype}")
    if weight.numel() and int(weight.abs().max()) > 7:
        raise ValueError("int4 weights must lie in -7..7")
    tiles = amx_pack(weight).view(-1, 16, 64).to(torch.int16) + 8  # [NB * KB, k4, 64]
    nibbles = tiles[..., :32] | (tiles[..., 32:] << 4)
    NB, KB = 2 * -(-weight.shape[0] // 32), -(-weight.shape[1] // 64)
    packed = nibbles.to(torch.uint8).view(torch.int8).reshape(NB, KB, 512).contiguous()
    scales = group_scales.new_zeros(16 * NB, KB, dtype=torch.float32)
    scales[: weight.shape[0]] = group_scales.float()
    return packed, scales.view(NB, 16, KB).permute(0, 2, 1).contiguous()


def avx2_int4_linear(
    x: Tensor, packed: Tensor, scales: Tensor, out_features: int, levels: int
) -> Tensor:
    """y [M, N] ≈ x @ w.T with int4 weights in groups of 64 inputs (``int4_pack``) and each
    row of x on the 8-bit grid of ``levels`` (as ``avx2_linear``): per block the exact int32
    sums (the int8 product's instructions, on the unpacked nibbles), times its scales, added
    in float32."""
    return _int8_linear(
        x, packed, scales, out_features, levels, torch.empty(0, dtype=torch.int32), "avx2_int4"
    )


def _int8_linear(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    out_features: int,
    levels: int,
    column_sums: Tensor,
    product: str,
) -> Tensor:
    return module().int8_linear(
        x.float().contiguous(),
        packed,
        scales,
        out_features,
        float(levels),
        column_sums,
        PRODUCTS.index(product),
    )


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row of the last dim: ``x ≈ q * scale[..., None]`` with
    ``scale = max|x| / 127`` (float32)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp_min_(1e-30) / 127.0
    q = torch.round(xf / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def lm_layer_step(
    x: Tensor,
    norms: tuple[Tensor, Tensor],
    eps: float,
    projections: list[tuple[Tensor, Tensor, int, Tensor]],
    levels: int,
    cache_rings: tuple[Tensor, Tensor, Tensor, Tensor],
    layer: int,
    write_index: Tensor,
    rot: tuple[Tensor, Tensor],
    mask: Tensor,
    num_heads: int,
    product: str = "amx",
) -> Tensor:
    """One decode position of an LM layer (``LMLayer``) for every slot in one compiled call:
    norms, the four ``W8A8Linear`` products (``product``: one of ``PRODUCTS``), RoPE,
    the new key and value quantized into the int8 ring, the attention, the gated FFN and both
    residuals, with the roundings of the module path (to bfloat16 wherever the modules store
    bfloat16).

    ``x`` [B, D] float32 or bfloat16; ``norms`` the two RMSNorm weights; ``projections`` the
    (packed, scales, out_features, column_sums) of the fused QKV, attention output, FFN in and
    FFN out; ``cache_rings`` the int8 keys, their scales, the values and theirs
    ([L, B, H, C + 1, hd] and [L, B, H, C + 1]); ``write_index`` [B] the ring entry of each
    slot's new row; ``rot`` the RoPE cos / sin [B, hd / 2]; ``mask`` [B, S] the entries each
    slot attends.
    Returns the layer's output [B, D] in ``x``'s dtype."""
    if product not in PRODUCTS:
        raise ValueError(f"product must be one of {', '.join(PRODUCTS)}, got {product!r}")
    packed, scales, sizes, sums = zip(*projections, strict=True)
    return module().lm_layer_step(
        x,
        norms[0],
        norms[1],
        float(eps),
        list(packed),
        list(scales),
        list(sizes),
        float(levels),
        *cache_rings,
        layer,
        write_index,
        rot[0],
        rot[1],
        mask,
        num_heads,
        list(sums),
        PRODUCTS.index(product),
    )


def vq_encode(residual: Tensor, augmented: list[Tensor], books: list[Tensor]) -> Tensor:
    """Mimi's residual codebook search (``mimi.ResidualVQ.encode`` after its input
    projection) in one compiled call: the same PyTorch operations in the same order, so the
    same codes bit for bit, without returning to Python between the stages."""
    return module().vq_encode(residual, augmented, books)


def float_pack(weight: Tensor) -> Tensor:
    """float32 weights [N, K] → ``float_linear``'s layout [NB, K, 8]: blocks of 8 output
    columns side by side for each input (``NB`` a multiple of 4, the padding columns zero):
    element ``(nb, k, j)`` is ``weight[8 nb + j, k]``."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"float_pack takes float [N, K] weights, got {weight.dtype} {list(weight.shape)}"
        )
    N, K = weight.shape
    NB = 4 * -(-N // 32)
    padded = weight.new_zeros(8 * NB, K, dtype=torch.float32)
    padded[:N] = weight.detach().float()
    return padded.view(NB, 8, K).transpose(1, 2).contiguous()


def float_linear(
    x: Tensor, packed: Tensor, out_features: int, bias: Tensor | None = None
) -> Tensor:
    """``x @ w.T (+ bias)`` in float32 for ``x`` [M, K] and ``packed = float_pack(w)``: one
    sequential chain of fused multiply-adds per output (the same for a row whatever the other
    rows), streaming the weights once per call (AVX2). Returns float32 [M, N]."""
    b = torch.empty(0) if bias is None else bias.float().contiguous()
    return module().float_linear(x.float().contiguous(), packed, b, out_features)


def vq_search(residual: Tensor, books: list[Tensor], norms: list[Tensor]) -> Tensor:
    """Mimi's residual codebook search (``mimi.ResidualVQ.search``) with the distances
    computed in this package's AVX2 code: ``residual`` [B, dim] float32, per stage the
    codebook [bins, dim] and its squared norms [bins]. The same function as ``vq_encode``
    with the dot products summed in another order, so the same codes except where two
    distances lie within float32 rounding of each other. Returns the codes [B, stages]."""
    return module().vq_search(residual.float(), books, norms)


def mimi_layer_step(
    x: Tensor,
    norms: tuple[Tensor, Tensor, Tensor, Tensor],
    eps: float,
    projections: list[tuple[Tensor, int]],
    layer_scales: tuple[Tensor, Tensor],
    rings: tuple[Tensor, Tensor],
    layer: int,
    write_index: Tensor,
    rot: tuple[Tensor, Tensor],
    mask: Tensor,
    num_heads: int,
) -> Tensor:
    """T positions of a Mimi encoder-transformer layer (``MimiLayer``) for every slot in one
    compiled call (AVX2, float32): both LayerNorms, the four products (``float_pack``ed), RoPE,
    the new keys and values written to the float ring, the attention, GELU, the layer scales
    and both residuals.

    ``x`` [B, T, D] float32; ``norms`` the weights and biases of norm1 and norm2;
    ``projections`` the (packed, out_features) of the fused QKV, attention output, linear1 and
    linear2; ``rings`` the keys and values [L, B, H, C + 1, hd]; ``write_index`` [B, T] the ring
    entry of each new row; ``rot`` the RoPE cos / sin [B, T, hd / 2]; ``mask`` [B, T, S] the
    entries each query attends. Returns the layer's output [B, T, D]."""
    packed, sizes = zip(*projections, strict=True)
    return module().mimi_layer_step(
        x.float().contiguous(),
        list(norms),
        float(eps),
        list(packed),
        list(sizes),
        layer_scales[0],
        layer_scales[1],
        rings[0],
        rings[1],
        layer,
        write_index,
        rot[0],
        rot[1],
        mask,
        num_heads,
    )
