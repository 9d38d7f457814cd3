"""Weight-only int8 quantization of the LM's transformer projections.

Owns ``Int8Linear`` (int8 weights with one scale per output channel, activations kept in the
model's dtype) and ``quantize_lm_int8``, which swaps every projection of every LM layer
(fused QKV, attention output, gated FFN in and out) for its int8 form, in place. The
embeddings, norms and output heads stay in the model's dtype: they are a small share of the
bytes read per step and the heads decide the tokens.

Why: one LM step at small batch reads every weight once, so it is bound by memory bandwidth;
int8 halves the bytes of bf16. At large batch the step becomes compute-bound and bf16 matrix
units win, so this is an option, not a default. Quantization is symmetric per output row:
``w ≈ scale[n] * q[n, k]`` with ``scale = max|w[n]| / 127``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .lm import LM


class Int8Linear(nn.Module):
    """``y = x @ (scales[:, None] * weight).T`` with ``weight`` int8 [N, K]."""

    def __init__(self, weight: Tensor, scales: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    @classmethod
    def from_float(cls, weight: Tensor) -> Int8Linear:
        """Quantize a float weight [N, K]; the scales take the weight's dtype."""
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q, scales.to(weight.dtype))

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def dequantized(self) -> Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        scales = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, scales)
        return y.view(*x.shape[:-1], self.out_features)


def quantize_lm_int8(lm: LM) -> LM:
    """Replace the LM layers' projections by ``Int8Linear`` (in place; returns ``lm``).
    An LM that is already quantized is returned as it is."""
    if is_quantized(lm):
        return lm
    for layer in lm.transformer.layers:
        attn = layer.self_attn
        attn.set_in_proj(Int8Linear.from_float(attn.in_proj_weight))
        attn.out_proj = Int8Linear.from_float(attn.out_proj.weight)
        ffn = layer.gating
        ffn.linear_in = Int8Linear.from_float(ffn.linear_in.weight)
        ffn.linear_out = Int8Linear.from_float(ffn.linear_out.weight)
    return lm


def is_quantized(lm: LM) -> bool:
    return any(isinstance(m, Int8Linear) for m in lm.modules())
