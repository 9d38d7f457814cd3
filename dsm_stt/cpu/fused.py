"""The LM's decode step as one compiled call per layer, on CPUs with AMX, AVX512-VNNI or AVX2.

Owns ``FusedTransformer``: the LM's ``model.transformer.Transformer`` whose one-position steps
over an ``Int8KVCache`` run each layer as a single call of ``kernels.ops.lm_layer_step``, for
layers whose four projections are ``W8A8Linear`` on one of this package's kernels (or all
``W4A8Linear``, the int4 product on AVX2).
At one slot the sixty-odd PyTorch operations of a layer cost more than its attention (each a
few microseconds of dispatch and allocation); the fused call computes the same thing with the
same roundings, so its results equal the module path's bit for bit (``tests/test_fused.py``).
Everything else (several positions, float rings, other dtypes) takes the module path.
``install.install`` swaps it in for the LM's transformer; the layers and their weights are
shared, not copied.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..model.transformer import KVCache, LMLayer, Transformer
from .kernels.ops import lm_layer_step
from .kvcache import Int8KVCache
from .quantize import OWN_KERNELS, W4A8Linear, W8A8Linear

FUSED_KERNELS = (*OWN_KERNELS, W4A8Linear.kernel)  # the products the fused step calls


class FusedTransformer(Transformer):
    """``transformer`` (the LM's stack, quantized w8a8 on one of ``OWN_KERNELS``) with the
    fused decode step; ``supports`` says whether its layers qualify."""

    def __init__(self, transformer: Transformer) -> None:
        layers = transformer.layers
        if not self.supports(layers):
            raise ValueError(
                "fused layers need LM layers whose four projections are w8a8 on the amx, vnni or avx2 "
                "kernel, or w4a8 (one for all), with one activation grid and one norm eps per layer"
            )
        super().__init__(
            list(layers),
            transformer.num_heads,
            transformer.head_dim,
            transformer.context,
            transformer.max_period,
        )
        # the packed weights never change once quantized; the norms' weights are read at
        # each call (``.to(dtype)`` replaces them)
        self.projections = [
            [(p.packed, p.scales, p.out_features, p.column_sums) for p in _projections(layer)]
            for layer in self.layers
        ]
        self.levels = [_projections(layer)[0].levels for layer in self.layers]
        self.kernel = _projections(self.layers[0])[0].kernel

    @staticmethod
    def supports(layers: nn.ModuleList) -> bool:
        if not layers or not all(isinstance(layer, LMLayer) for layer in layers):
            return False
        projections = [p for layer in layers for p in _projections(layer)]
        return (
            all(isinstance(p, W8A8Linear | W4A8Linear) for p in projections)
            and len({p.kernel for p in projections}) == 1
            and projections[0].kernel in FUSED_KERNELS
            and all(
                layer.norm1.eps == layer.norm2.eps
                and len({p.levels for p in _projections(layer)}) == 1
                for layer in layers
            )
        )

    @staticmethod
    def runs_on(cache: KVCache, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether one-position steps of activations of ``dtype`` on ``device`` over ``cache``
        take the fused path: an int8 ring, CPU, float32 or bfloat16."""
        return (
            isinstance(cache, Int8KVCache)
            and device.type == "cpu"
            and dtype in (torch.float32, torch.bfloat16)
        )

    def layers_step(
        self,
        x: Tensor,
        cache: KVCache,
        write_at: tuple[Tensor, Tensor],
        rot: tuple[Tensor, Tensor],
        mask: Tensor,
    ) -> Tensor:
        if x.shape[1] != 1 or not self.runs_on(cache, x.dtype, x.device):
            return super().layers_step(x, cache, write_at, rot, mask)
        rings = (cache.keys, cache.key_scales, cache.values, cache.value_scales)
        index = write_at[1][:, 0].contiguous()
        cos, sin = rot[0][:, 0, 0], rot[1][:, 0, 0]
        span = mask[:, 0, 0]
        h = x[:, 0]
        for i, layer in enumerate(self.layers):
            h = lm_layer_step(
                h,
                (layer.norm1.alpha, layer.norm2.alpha),
                layer.norm1.eps,
                self.projections[i],
                self.levels[i],
                rings,
                i,
                index,
                (cos, sin),
                span,
                layer.self_attn.num_heads,
                self.kernel,
            )
        return h[:, None]


def _projections(layer: LMLayer) -> list[nn.Module]:
    attn, ffn = layer.self_attn, layer.gating
    return [attn.in_proj, attn.out_proj, ffn.linear_in, ffn.linear_out]
