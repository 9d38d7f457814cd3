"""The LM's KV ring stored as int8 rows, one float32 scale per row: a cache type of its own.

Owns ``Int8KVCache``, a ``model.transformer.KVCache`` whose ``write`` quantizes each new key and
value row symmetrically to int8 (``row ≈ q * scale``, ``scale = max|row| / 127``) and whose
``attend`` runs the compiled attention (``kernels.ops.int8_attention``), which converts the
int8 entries a cache line at a time and never materializes float keys. Reading the ring is what
a CPU step at many slots spends most of its time on once sessions are past their first minute
(the keys and values of 750 positions, 16 layers, per slot and step): int8 halves those bytes
at bf16. ``Engine`` allocates it when the plan says ``kv_cache = int8``; the model only sees a
``KVCache``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..model.transformer import KVCache
from .kernels.ops import int8_attention, quantize_rows


@dataclass
class Int8KVCache(KVCache):
    """int8 keys and values [L, B, H, C + 1, hd] with float32 scales [L, B, H, C + 1]
    (``key ≈ keys * key_scales[..., None]``); CPU only."""

    key_scales: Tensor | None = None
    value_scales: Tensor | None = None

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        context: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Int8KVCache:
        """``dtype`` is the model's (the ring itself is int8 whatever it is)."""
        if torch.device(device or "cpu").type != "cpu":
            raise ValueError(f"an int8 KV cache runs on CPU only, not {device}")
        shape = (num_layers, batch_size, num_heads, context + 1, head_dim)
        return cls(
            keys=torch.zeros(shape, dtype=torch.int8),
            values=torch.zeros(shape, dtype=torch.int8),
            key_positions=torch.full((batch_size, context + 1), -1, dtype=torch.long),
            positions=torch.zeros(batch_size, dtype=torch.long),
            key_scales=torch.ones(shape[:-1]),
            value_scales=torch.ones(shape[:-1]),
        )

    def problem(self, dtype: torch.dtype) -> str | None:
        if self.keys.device.type != "cpu":
            return "an int8 KV cache runs on CPU only"
        return None

    def write(self, layer: int, write_at: tuple[Tensor, Tensor], k: Tensor, v: Tensor) -> None:
        (k8, ks), (v8, vs) = quantize_rows(k), quantize_rows(v)
        rings = (self.keys, self.values, self.key_scales, self.value_scales)
        for ring, rows in zip(rings, (k8, v8, ks, vs), strict=True):
            ring[layer][write_at[0], :, write_at[1]] = rows

    def attend(self, layer: int, q: Tensor, mask: Tensor) -> Tensor:
        span = mask.shape[-1]
        y = int8_attention(
            q,
            self.keys[layer, :, :, :span],
            self.key_scales[layer, :, :, :span],
            self.values[layer, :, :, :span],
            self.value_scales[layer, :, :, :span],
            mask[:, 0],
        )
        return y.to(q.dtype)
