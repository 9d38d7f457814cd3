"""Causal windowed self-attention over a ring KV cache, and the transformer stacks built on it.

Owns:
- ``KVCache``: explicit, preallocated per-slot streaming state (keys, values, the absolute
  position of every ring entry, the next position of every slot) with ``reset(mask)``.
- ``Attention``: fused QKV projection (``in_proj_weight``, official layout), interleaved RoPE,
  a ring write that skips inactive slots, and attention restricted to ``0 <= p - q < context``.
- ``Transformer``: a stack of pre-norm layers, either the DSM LM flavour (RMSNorm + SiLU-gated
  FFN) or the Mimi flavour (LayerNorm + GELU MLP + LayerScale).

The ring has one extra "trash" entry (index ``context``) whose position is always -1: slots that
are inactive this step write there, so a masked step is a fixed-shape computation with no
Python branch and no effect on the slot's state.

The cache owns how a key is stored and attended (``write`` / ``attend``): another storage
(e.g. ``cpu.kvcache.Int8KVCache``) is a subclass handed to ``LM.allocate_state``; the model
never needs to know which one it runs on.

It also offers ``forward_sequence``: a whole-sequence forward with the same window mask, used to
check that streaming equals teacher forcing.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .layers import GatedFFN, LayerScale, RMSNorm, apply_rope, rope_rotation


@dataclass
class KVCache:
    """Streaming attention state for ``num_layers`` layers and ``B`` slots."""

    keys: Tensor  # [L, B, H, C + 1, hd]
    values: Tensor  # [L, B, H, C + 1, hd]
    key_positions: Tensor  # [B, C + 1] absolute position of each entry, -1 = empty
    positions: Tensor  # [B] next position of each slot

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
    ) -> KVCache:
        """Keys and values stored as they are, in ``dtype`` (the model's)."""
        if not dtype.is_floating_point:
            raise ValueError(f"a KV cache holds float entries, not {dtype}")
        shape = (num_layers, batch_size, num_heads, context + 1, head_dim)
        return cls(
            keys=torch.zeros(shape, device=device, dtype=dtype),
            values=torch.zeros(shape, device=device, dtype=dtype),
            key_positions=torch.full(
                (batch_size, context + 1), -1, device=device, dtype=torch.long
            ),
            positions=torch.zeros(batch_size, device=device, dtype=torch.long),
        )

    def problem(self, dtype: torch.dtype) -> str | None:
        """Why this cache cannot serve a model computing in ``dtype``, or None."""
        if self.keys.dtype != dtype:
            return f"cache dtype {self.keys.dtype} differs from the weights' {dtype}"
        return None

    def write(self, layer: int, write_at: tuple[Tensor, Tensor], k: Tensor, v: Tensor) -> None:
        """Store the new keys and values ``k``, ``v`` [B, T, H, hd] of ``layer`` at the
        [B, T] (slot, ring entry) pairs ``write_at``."""
        # Advanced indexing writes B*T rows in place ([B, T] index pairs select [B, T, H, hd]);
        # ``scatter_`` would be equivalent but copies the whole cache on CPU.
        self.keys[layer][write_at[0], :, write_at[1]] = k
        self.values[layer][write_at[0], :, write_at[1]] = v

    def attend(self, layer: int, q: Tensor, mask: Tensor) -> Tensor:
        """``q`` [B, H, T, hd] attends over the first ``S`` ring entries of ``layer`` where
        ``mask`` [B, 1, T, S] allows; returns [B, H, T, hd] in ``q``'s dtype."""
        span = mask.shape[-1]
        keys, values = self.keys[layer, :, :, :span], self.values[layer, :, :, :span]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    @property
    def context(self) -> int:
        return self.key_positions.shape[1] - 1

    def prefix(self, n: int) -> KVCache:
        """The first ``n`` slots, as views sharing this cache's memory."""
        return type(self)(
            **{
                f.name: getattr(self, f.name)[self._slot_index(f.name, slice(None, n))]
                for f in fields(self)
            }
        )

    @staticmethod
    def _slot_index(name: str, n: int | slice) -> tuple:
        # per-layer buffers are [L, B, ...], the others [B, ...]
        return (slice(None), n) if name not in ("key_positions", "positions") else (n,)

    def reset(self, mask: Tensor) -> None:
        """Start a fresh stream in every slot where ``mask`` [B] is true."""
        self.positions.masked_fill_(mask, 0)
        self.key_positions.masked_fill_(mask[:, None], -1)

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src``'s stream into slot ``dst`` (``src`` keeps a copy)."""
        for f in fields(self):
            buffer = getattr(self, f.name)
            buffer[self._slot_index(f.name, dst)].copy_(buffer[self._slot_index(f.name, src)])

    def assume_history(self, n: int) -> None:
        """Let every slot be ``n`` positions into its stream (``0 <= n <= C``): the first ``n``
        ring entries count as holding positions ``0 .. n-1`` (their keys are whatever the
        ring holds). For timing a step as in a session that far in."""
        if not 0 <= n <= self.context:
            raise ValueError(f"history must be within 0..{self.context} positions, got {n}")
        self.key_positions.fill_(-1)
        self.key_positions[:, :n] = torch.arange(n, device=self.key_positions.device)
        self.positions.fill_(n)

    def nbytes_per_slot(self) -> int:
        B = self.positions.shape[0]
        return sum(getattr(self, f.name).nbytes for f in fields(self)) // max(B, 1)


class Attention(nn.Module):
    """Multi-head self-attention with fused QKV weights stored as ``in_proj_weight``."""

    def __init__(self, dim: int, num_heads: int, context: int, max_period: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.context = context
        self.max_period = max_period
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj: nn.Module | None = None
        self.out_proj = nn.Linear(dim, dim, bias=False)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def set_in_proj(self, module: nn.Module) -> None:
        """Compute the fused QKV projection with ``module`` (e.g. a quantized linear) instead
        of ``in_proj_weight``, which is dropped."""
        self.in_proj = module
        del self.in_proj_weight
        self.register_parameter("in_proj_weight", None)

    def _qkv(self, x: Tensor, rot: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        # x: [B, T, D] -> q, k, v: [B, H, T, hd]
        qkv = F.linear(x, self.in_proj_weight) if self.in_proj is None else self.in_proj(x)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        return apply_rope(q, *rot), apply_rope(k, *rot), v

    def _out(self, y: Tensor) -> Tensor:
        return self.out_proj(y.transpose(1, 2).flatten(2))

    def step(
        self,
        x: Tensor,
        layer: int,
        cache: KVCache,
        write_at: tuple[Tensor, Tensor],
        rot: tuple[Tensor, Tensor],
        mask: Tensor,
    ) -> Tensor:
        """One streaming call on T new positions. ``write_at`` holds two [B, T] index tensors,
        the slot and the ring entry each new key goes to (the trash entry for inactive slots);
        ``rot`` the RoPE cos/sin and ``mask`` [B, 1, T, S] the attention mask over the first
        ``S`` ring entries, all computed once for all layers."""
        q, k, v = self._qkv(x, rot)
        cache.write(layer, write_at, k.transpose(1, 2), v.transpose(1, 2))
        return self._out(cache.attend(layer, q, mask))

    def forward_sequence(self, x: Tensor) -> Tensor:
        """Whole-sequence forward with the causal window mask (teacher forcing)."""
        B, T, _ = x.shape
        pos = torch.arange(T, device=x.device)
        q, k, v = self._qkv(x, rope_rotation(pos.expand(B, T), self.head_dim, self.max_period))
        delta = pos[:, None] - pos[None, :]
        mask = (delta >= 0) & (delta < self.context)
        return self._out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


class LMLayer(nn.Module):
    """DSM LM layer: ``h = x + attn(norm1(x)); y = h + gating(norm2(h))``."""

    def __init__(
        self, dim: int, num_heads: int, hidden: int, context: int, max_period: float, eps: float
    ) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim, eps)
        self.self_attn = Attention(dim, num_heads, context, max_period)
        self.norm2 = RMSNorm(dim, eps)
        self.gating = GatedFFN(dim, hidden)

    def attn_input(self, x: Tensor) -> Tensor:
        return self.norm1(x)

    def finish(self, h: Tensor) -> Tensor:
        return h + self.gating(self.norm2(h))

    def scale_attn(self, y: Tensor) -> Tensor:
        return y


class MimiLayer(nn.Module):
    """Mimi encoder-transformer layer: LayerNorm, GELU MLP, LayerScale on both branches."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        hidden: int,
        context: int,
        max_period: float,
        layer_scale: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.self_attn = Attention(dim, num_heads, context, max_period)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.linear1 = nn.Linear(dim, hidden, bias=False)
        self.linear2 = nn.Linear(hidden, dim, bias=False)
        self.layer_scale_1 = LayerScale(dim, layer_scale)
        self.layer_scale_2 = LayerScale(dim, layer_scale)

    def attn_input(self, x: Tensor) -> Tensor:
        return self.norm1(x)

    def finish(self, h: Tensor) -> Tensor:
        return h + self.layer_scale_2(self.linear2(F.gelu(self.linear1(self.norm2(h)))))

    def scale_attn(self, y: Tensor) -> Tensor:
        return self.layer_scale_1(y)


class Transformer(nn.Module):
    """A stack of pre-norm layers sharing one ``KVCache``."""

    def __init__(
        self,
        layers: list[nn.Module],
        num_heads: int,
        head_dim: int,
        context: int,
        max_period: float,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.context = context
        self.max_period = max_period

    def allocate_cache(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        cache_type: type[KVCache] = KVCache,
    ) -> KVCache:
        return cache_type.allocate(
            len(self.layers), batch_size, self.num_heads, self.head_dim, self.context, device, dtype
        )

    def step(self, x: Tensor, cache: KVCache, active: Tensor) -> Tensor:
        """Advance every active slot by the T positions in ``x`` [B, T, D].

        Inactive slots (``active`` [B] false) compute garbage that is never stored: their
        keys go to the trash entry and their position does not move.
        """
        T = x.shape[1]
        C = cache.context
        offsets = torch.arange(T, device=x.device)
        query_positions = cache.positions[:, None] + offsets  # [B, T]
        write_index = torch.where(
            active[:, None], query_positions % C, torch.full_like(query_positions, C)
        )
        new_positions = torch.where(
            active[:, None], query_positions, torch.full_like(query_positions, -1)
        )
        slots = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(write_index)
        cache.key_positions[slots, write_index] = new_positions
        span = self._span(cache, T, active)
        kp = cache.key_positions[:, None, :span]  # [B, 1, S]
        delta = query_positions[:, :, None] - kp  # [B, T, S]
        mask = ((kp >= 0) & (delta >= 0) & (delta < C))[:, None]  # [B, 1, T, S]
        # A slot with no valid key at all (inactive, fresh) would give NaN in SDPA: let it
        # see ring entry 0 instead (finite: zeros or an old key); its output is ignored.
        mask[:, :, :, 0] |= ~active[:, None, None]
        rot = rope_rotation(query_positions, self.head_dim, self.max_period)
        x = self.layers_step(x, cache, (slots, write_index), rot, mask)
        cache.positions.add_(active.long() * T)
        return x

    def layers_step(
        self,
        x: Tensor,
        cache: KVCache,
        write_at: tuple[Tensor, Tensor],
        rot: tuple[Tensor, Tensor],
        mask: Tensor,
    ) -> Tensor:
        """Every layer on ``x`` [B, T, D], with the ring indices, RoPE and mask ``step``
        computed once for all layers (a subclass may run the stack some other way)."""
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn.step(layer.attn_input(x), i, cache, write_at, rot, mask)
            x = layer.finish(x + layer.scale_attn(attn))
        return x

    @staticmethod
    def _span(cache: KVCache, T: int, active: Tensor) -> int:
        """How many ring entries this step attends over. The ring fills from entry 0, so until
        a slot has seen ``C`` positions only the entries below its position can hold a key:
        where the positions are host memory (CPU) the step reads the first ``T`` + the largest
        position of an active slot entries (an inactive slot's output is ignored), which makes
        a session's first ring's worth of steps cheaper. Elsewhere the step keeps a fixed
        shape (what CUDA graphs capture) and reads the whole ring."""
        C = cache.context
        if cache.positions.device.type != "cpu" or cache.positions.numel() == 0:
            return C
        return min(C, int(torch.where(active, cache.positions, 0).max()) + T)

    def forward_sequence(self, x: Tensor) -> Tensor:
        """Teacher-forced forward of a whole sequence [B, T, D] from position 0."""
        for layer in self.layers:
            x = layer.finish(
                x + layer.scale_attn(layer.self_attn.forward_sequence(layer.attn_input(x)))
            )
        return x
