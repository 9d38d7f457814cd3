"""The LM's decode step as one compiled call per layer, on CPUs with AMX or AVX512-VNNI.

Owns ``FusedLayers``: for an LM whose projections are ``W8A8Linear`` on this package's ``amx``
or ``vnni`` kernel and whose KV ring is int8, a streaming step of one position runs each layer
as a single call of ``kernels.lm_layer_step`` instead of some sixty PyTorch operations. At
one slot those operations cost more than the attention itself (each a few microseconds of
dispatch and allocation); the fused call computes the same thing with the same roundings.
``quantize_lm_w8a8`` attaches one to the LM's transformer; ``Transformer.step`` takes it
where it applies and the module path everywhere else (float rings, several positions,
float16, other devices).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .kernels import lm_layer_step
from .transformer import KVCache, LMLayer


class FusedLayers:
    """The fused decode step of ``layers`` (``LMLayer`` whose four projections are
    ``W8A8Linear`` modules, all on the ``amx`` or all on the ``vnni`` kernel; ``supports`` says
    whether they are)."""

    def __init__(self, layers: nn.ModuleList) -> None:
        if not self.supports(layers):
            raise ValueError(
                "fused layers need LM layers whose four projections are w8a8 on the amx or vnni "
                "kernel (one for all), with one activation grid and one norm eps per layer"
            )
        self.layers = list(layers)
        # the packed weights never change once quantized; the norms' weights are read at
        # each call (``.to(dtype)`` replaces them)
        self.projections = [
            [(p.packed, p.scales, p.out_features, p.column_sums) for p in self._projections(layer)]
            for layer in self.layers
        ]
        self.levels = [self._projections(layer)[0].levels for layer in self.layers]
        self.amx = self._projections(self.layers[0])[0].kernel == "amx"

    @staticmethod
    def _projections(layer: LMLayer) -> list[nn.Module]:
        attn, ffn = layer.self_attn, layer.gating
        return [attn.in_proj, attn.out_proj, ffn.linear_in, ffn.linear_out]

    @classmethod
    def supports(cls, layers: nn.ModuleList) -> bool:
        from .quantize import OWN_KERNELS, W8A8Linear  # quantize imports this module

        if not layers or not all(isinstance(layer, LMLayer) for layer in layers):
            return False
        projections = [p for layer in layers for p in cls._projections(layer)]
        return (
            all(isinstance(p, W8A8Linear) for p in projections)
            and len({p.kernel for p in projections}) == 1
            and projections[0].kernel in OWN_KERNELS
            and all(
                layer.norm1.eps == layer.norm2.eps
                and len({p.levels for p in cls._projections(layer)}) == 1
                for layer in layers
            )
        )

    def applies(self, x: Tensor, cache: KVCache) -> bool:
        """Whether ``__call__`` computes this step: one position, and ``runs_on``."""
        return x.shape[1] == 1 and self.runs_on(cache, x.dtype, x.device)

    @staticmethod
    def runs_on(cache: KVCache, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether one-position steps of activations of ``dtype`` on ``device`` over ``cache``
        take the fused path: an int8 ring, CPU, float32 or bfloat16."""
        return cache.quantized and device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)

    def __call__(
        self,
        x: Tensor,
        cache: KVCache,
        write_index: Tensor,
        rot: tuple[Tensor, Tensor],
        mask: Tensor,
    ) -> Tensor:
        """``x`` [B, 1, D] → [B, 1, D] through every layer; ``write_index`` [B, 1], ``rot``
        [B, 1, 1, hd / 2] each and ``mask`` [B, 1, 1, S] as ``Transformer.step`` builds them."""
        rings = (cache.keys, cache.key_scales, cache.values, cache.value_scales)
        index = write_index[:, 0].contiguous()
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
                self.amx,
            )
        return h[:, None]
