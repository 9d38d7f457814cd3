"""Small building blocks shared by Mimi and the LM: RMSNorm, LayerScale, gated FFN, RoPE.

Parameter names mirror the official checkpoint key names (``alpha``, ``linear_in`` …) so that
loading is a plain ``load_state_dict`` after one rename table. Streaming state is never stored
here: every block is a pure function of its inputs and weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (``rms_norm_f32``), eps 1e-8 for the DSM LM."""

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        self.alpha = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        var = xf.pow(2).mean(dim=-1, keepdim=True) + self.eps
        return (xf * (self.alpha.float() * torch.rsqrt(var))).to(x.dtype)


class LayerScale(nn.Module):
    """Channel-wise multiplication by a learnt vector (Mimi's encoder transformer)."""

    def __init__(self, dim: int, init: float = 0.01) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class GatedFFN(nn.Module):
    """SiLU-gated feed-forward: ``linear_out(silu(a) * b)`` with ``[a; b] = linear_in(x)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.linear_in(x).split(self.hidden, dim=-1)
        return self.linear_out(F.silu(a) * b)


def rope_rotation(positions: Tensor, head_dim: int, max_period: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the RoPE angles for ``positions`` [B, T], shape [B, 1, T, head_dim // 2].

    Frequencies are ``max_period ** (-2i / head_dim)``; everything in float32. Computed once per
    step and shared by every layer (all layers of a stack have the same head_dim).
    """
    ds = torch.arange(head_dim // 2, device=positions.device, dtype=torch.float32)
    freqs = torch.exp(ds * (-math.log(max_period) * 2 / head_dim))
    angle = positions.float()[:, None, :, None] * freqs
    return torch.cos(angle), torch.sin(angle)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of ``x`` [B, H, T, D] by the angles of ``cos``/``sin``.

    Computed in float32 and cast back, as the reference does.
    """
    xr, xi = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)
