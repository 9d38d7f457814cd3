"""float32 projections on this package's compiled AVX2 product (``kernels.float_linear``).

Owns ``PackedLinear`` (a bias-free or biased linear whose weights are packed once for the
compiled product), ``PackedStridedConv`` (a ``model.mimi.CausalConv1d`` whose few-output strided
steps take that product) and ``pack_mimi``, which swaps them into a Mimi encoder in place.

Why: a Mimi step multiplies two rows (two 25 Hz positions) per slot by 100 MB of float32
transformer weights and 40 MB of strided convolution weights: bound by memory bandwidth, where
PyTorch's GEMM reaches about a third of it at these shapes (2-core AMD EPYC, AVX2: the eight
layers' projections 11.5 ms against 2.9 ms). The product is float32 like the module's; only its
order of summation differs (one chain of fused multiply-adds per output), so Mimi's latents move
by float rounding and its codes agree with the float path's except at near-ties
(``bench/agreement.py`` publishes how often). A row's result never depends on the other rows.
``install.install`` also gives a float32 LM's text head (2048 x 8000, 65 MB) a ``PackedLinear``:
at one or two slots PyTorch reads it at a third of the bandwidth too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..model.mimi import CausalConv1d, MimiEncoder, SEANetEncoder
from ..model.transformer import MimiLayer
from .kernels.ops import float_linear, float_pack

FEW_OUTPUTS = 4  # a conv step with at most this many output positions (per slot) is a product


class PackedLinear(nn.Module):
    """``y = x @ weight.T (+ bias)`` on the compiled product (CPU; other devices PyTorch's),
    whatever the number of rows, so that a row's result never depends on how many slots run
    beside it (PyTorch's GEMM picks its blocking by the row count). Keeps ``weight`` (and
    ``bias``) under their names, so the state dict's keys stay the checkpoint's; the packed
    copy is made once, here: weights are loaded before a plan is installed, never after."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, register: bool = True) -> None:
        super().__init__()
        weight = weight.detach().float()
        bias = None if bias is None else bias.detach().float()
        if register:  # ``weight`` / ``bias``, the names of the module it replaces
            self.weight = nn.Parameter(weight, requires_grad=False)
            self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        else:  # the owner keeps the parameter under its own name (``in_proj_weight``)
            self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape
        self.packed = float_pack(weight)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.device.type != "cpu":
            y = torch.nn.functional.linear(flat, self.weight, self.bias)
        else:
            y = float_linear(flat, self.packed, self.out_features, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


class PackedStridedConv(CausalConv1d):
    """``conv`` (a ``CausalConv1d``) whose steps with few outputs (the strided convolutions
    near the latent, the downsampling and the last one) take its windows times
    ``PackedLinear``; the conv module, its buffers' layout and its parameter names are
    ``conv``'s own."""

    def __init__(self, conv: CausalConv1d) -> None:
        nn.Module.__init__(self)
        self.conv = conv.conv
        self.in_channels = conv.in_channels
        self.stride = conv.stride
        self.context = conv.context
        weight = self.conv.conv.weight
        # the conv keeps its parameters: the product holds views of them and adds no keys
        self.product = PackedLinear(
            weight.reshape(weight.shape[0], -1), self.conv.conv.bias, register=False
        )

    def _as_product(self, outputs: int) -> bool:
        # stride 1 too: PyTorch's convolution takes 1.2 ms for the last one (1024 -> 512,
        # kernel 3, two outputs) where the product streams its 6 MB in a quarter of that
        few = outputs <= FEW_OUTPUTS or super()._as_product(outputs)
        return few and self.conv.conv.dilation == (1,)

    def _strided(self, x: Tensor) -> Tensor:
        out_channels, _, kernel = self.conv.conv.weight.shape
        windows = x.unfold(-1, kernel, self.stride).transpose(1, 2)  # [B, T, C_in, k]
        B, T = windows.shape[:2]
        y = self.product(windows.reshape(B * T, -1))
        return y.view(B, T, out_channels).transpose(1, 2)


def pack_mimi(mimi: MimiEncoder) -> MimiEncoder:
    """Swap ``PackedLinear`` into every projection of Mimi's transformer and
    ``PackedStridedConv`` into SEANet's strided convolutions and the downsampling one, in
    place (returns ``mimi``);
    a Mimi packed already is returned as it is."""
    for layer in mimi.encoder_transformer.transformer.layers:
        if not isinstance(layer, MimiLayer) or isinstance(layer.linear1, PackedLinear):
            continue
        attn = layer.self_attn
        # ``in_proj_weight`` stays the attention's parameter (the checkpoint's name)
        attn.in_proj = PackedLinear(attn.in_proj_weight, register=False)
        attn.out_proj = PackedLinear(attn.out_proj.weight)
        layer.linear1 = PackedLinear(layer.linear1.weight)
        layer.linear2 = PackedLinear(layer.linear2.weight)
    _pack_strided(mimi.encoder)
    if not isinstance(mimi.downsample.conv, PackedStridedConv):
        mimi.downsample.conv = PackedStridedConv(mimi.downsample.conv)
    return mimi


def _pack_strided(encoder: SEANetEncoder) -> None:
    # the convolutions of the last two strides, whose steps have 16 and 2 outputs per slot
    tail = [m for m in encoder.model if isinstance(m, CausalConv1d)][-2:]
    for i, layer in enumerate(encoder.model):
        fresh = isinstance(layer, CausalConv1d) and not isinstance(layer, PackedStridedConv)
        if fresh and (layer.stride > 1 or any(layer is t for t in tail)):
            encoder.model[i] = PackedStridedConv(layer)


def is_packed(mimi: MimiEncoder) -> bool:
    return any(isinstance(m, (PackedLinear, PackedStridedConv)) for m in mimi.modules())
