"""Mimi's encoder-transformer step as one compiled call per layer (AVX2, float32).

Owns ``FusedMimiTransformer``: Mimi's ``model.transformer.Transformer`` whose steps run each
layer as a single call of ``kernels.ops.mimi_layer_step``, for layers whose four projections are
``float_linear.PackedLinear``. At one slot the thirty-odd PyTorch operations of a layer (norms,
RoPE, the ring write, attention, GELU, layer scales) cost about three times its products; the
fused call computes the same function in float32 with other orders of summation, so Mimi's
latents move by float rounding and its codes agree with the float path's except at near-ties
(``tests/test_float_linear.py``, ``bench/agreement.py``). Other devices and dtypes take the
module path. ``install.install`` swaps it in for Mimi's transformer; the layers and their
weights are shared, not copied.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..model.transformer import KVCache, MimiLayer, Transformer
from .float_linear import PackedLinear
from .kernels.ops import mimi_layer_step


class FusedMimiTransformer(Transformer):
    """``transformer`` (Mimi's stack, packed by ``float_linear.pack_mimi``) with the fused
    step; ``supports`` says whether its layers qualify."""

    def __init__(self, transformer: Transformer) -> None:
        if not self.supports(transformer.layers):
            raise ValueError(
                "the fused Mimi step needs Mimi layers whose four projections are packed "
                "(float_linear.pack_mimi) and whose norms share one eps"
            )
        super().__init__(
            list(transformer.layers),
            transformer.num_heads,
            transformer.head_dim,
            transformer.context,
            transformer.max_period,
        )
        self.projections = [
            [(p.packed, p.out_features) for p in _projections(layer)] for layer in self.layers
        ]

    @staticmethod
    def supports(layers: nn.ModuleList) -> bool:
        return bool(layers) and all(
            isinstance(layer, MimiLayer)
            and all(isinstance(p, PackedLinear) for p in _projections(layer))
            and layer.norm1.eps == layer.norm2.eps
            and layer.norm1.weight is not None
            and layer.norm1.bias is not None
            for layer in layers
        )

    def layers_step(
        self,
        x: Tensor,
        cache: KVCache,
        write_at: tuple[Tensor, Tensor],
        rot: tuple[Tensor, Tensor],
        mask: Tensor,
    ) -> Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or cache.keys.dtype != x.dtype:
            return super().layers_step(x, cache, write_at, rot, mask)
        index = write_at[1].contiguous()
        cos, sin = rot[0][:, 0], rot[1][:, 0]  # [B, T, hd / 2]
        span = mask[:, 0]  # [B, T, S]
        for i, layer in enumerate(self.layers):
            x = mimi_layer_step(
                x,
                (layer.norm1.weight, layer.norm1.bias, layer.norm2.weight, layer.norm2.bias),
                layer.norm1.eps,
                self.projections[i],
                (layer.layer_scale_1.scale, layer.layer_scale_2.scale),
                (cache.keys, cache.values),
                i,
                index,
                (cos, sin),
                span,
                layer.self_attn.num_heads,
            )
        return x


def _projections(layer: MimiLayer) -> list[nn.Module]:
    attn = layer.self_attn
    return [attn.in_proj, attn.out_proj, layer.linear1, layer.linear2]
