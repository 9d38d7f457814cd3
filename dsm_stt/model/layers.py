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


# Past this position a float32 angle ``position * freq`` (and its cos / sin) has lost more
# than 2^-8 rad: an LM hour-long session is at 45,000, Mimi's at 90,000.
_EXACT_POSITIONS = 2**16


def rope_rotation(positions: Tensor, head_dim: int, max_period: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the RoPE angles for ``positions`` [B, T], shape [B, 1, T, head_dim // 2].

    Frequencies are ``max_period ** (-2i / head_dim)``; float32, as the reference computes
    them, for positions below 2^16. A session's positions grow without bound, and a float32
    angle ``p * f`` is off by up to half its ulp (0.03 rad at hour 24 of an LM stream), so from
    2^16 on the angle is formed in float64 and reduced modulo 2π before its float32 cos / sin:
    as exact at hour 24 as at hour 0 (except on MPS, which has no float64). Computed once per
    step and shared by every layer (all layers of a stack have the same head_dim).
    """
    ds = torch.arange(head_dim // 2, device=positions.device, dtype=torch.float32)
    freqs = torch.exp(ds * (-math.log(max_period) * 2 / head_dim))
    angle = positions.float()[:, None, :, None] * freqs
    if positions.device.type != "mps":
        far = positions[:, None, :, None] >= _EXACT_POSITIONS
        reduced = (positions.double()[:, None, :, None] * freqs.double()).remainder_(2 * math.pi)
        angle = torch.where(far, reduced.float(), angle)
    return torch.cos(angle), torch.sin(angle)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of ``x`` [B, H, T, D] by the angles of ``cos``/``sin``.

    Computed in float32 and cast back, as the reference does.
    """
    xr, xi = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)
