"""Every per-slot buffer of the streaming engine, allocated once for ``batch_size`` slots.

Owns ``EngineState``: the Mimi encoder state, the LM's KV cache, and the two values that
implement the step alignment of spec §2.8 — the previous frame's codes and the previous text
token, which are the LM's inputs at the next step (and, for an engine that computes each
step's LM position ahead, that step's token and VAD). ``reset(mask)`` starts fresh streams in
the masked slots without touching the others, ``move(src, dst)`` carries a stream to another
slot.
No Python loops over slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..model.mimi import MimiState
from ..model.transformer import KVCache


@dataclass
class EngineState:
    mimi: MimiState
    lm: KVCache
    prev_codes: Tensor  # [B, K] long: codes of the previous frame (audio pad at step 0)
    prev_text: Tensor  # [B] long: the previous text token (text start at step 0)
    # the token [B] long and VAD [B, H] float32 of each slot's next step when the engine
    # computes it ahead (``Engine(lookahead=True)``); token -1: not computed yet
    next_token: Tensor
    next_vad: Tensor
    text_start_id: int
    audio_pad_id: int

    @classmethod
    def allocate(
        cls,
        mimi: torch.nn.Module,
        lm: torch.nn.Module,
        batch_size: int,
        device: torch.device,
        dtype: torch.dtype,
        cache_type: type[KVCache] = KVCache,
    ) -> EngineState:
        """``cache_type``: the LM's KV ring (``KVCache``, or e.g. ``cpu.kvcache.Int8KVCache``)."""
        cfg = lm.cfg
        state = cls(
            mimi=mimi.allocate_state(batch_size, device),
            lm=lm.allocate_state(batch_size, device, dtype, cache_type),
            prev_codes=torch.full(
                (batch_size, cfg.n_q), cfg.audio_pad_id, dtype=torch.long, device=device
            ),
            prev_text=torch.full((batch_size,), cfg.text_start_id, dtype=torch.long, device=device),
            next_token=torch.full((batch_size,), -1, dtype=torch.long, device=device),
            next_vad=torch.zeros(batch_size, lm.num_extra_heads, device=device),
            text_start_id=cfg.text_start_id,
            audio_pad_id=cfg.audio_pad_id,
        )
        return state

    @property
    def batch_size(self) -> int:
        return self.prev_text.shape[0]

    def prefix(self, n: int) -> EngineState:
        """The first ``n`` slots, as views sharing this state's memory: a step on it costs
        ``n`` slots and leaves the others untouched."""
        return EngineState(
            self.mimi.prefix(n),
            self.lm.prefix(n),
            self.prev_codes[:n],
            self.prev_text[:n],
            self.next_token[:n],
            self.next_vad[:n],
            self.text_start_id,
            self.audio_pad_id,
        )

    def reset(self, mask: Tensor) -> None:
        """Fresh streams in every slot where ``mask`` [B] is true."""
        self.mimi.reset(mask)
        self.lm.reset(mask)
        self.prev_codes.masked_fill_(mask[:, None], self.audio_pad_id)
        self.prev_text.masked_fill_(mask, self.text_start_id)
        self.next_token.masked_fill_(mask, -1)

    def move(self, src: int, dst: int) -> None:
        """Carry slot ``src``'s stream on in slot ``dst``: every per-slot buffer is copied
        (``src`` keeps a stale copy, for the scheduler to reset when it reuses the slot)."""
        self.mimi.move(src, dst)
        self.lm.move(src, dst)
        self.prev_codes[dst].copy_(self.prev_codes[src])
        self.prev_text[dst].copy_(self.prev_text[src])
        self.next_token[dst].copy_(self.next_token[src])
        self.next_vad[dst].copy_(self.next_vad[src])

    def kv_bytes_per_slot(self) -> int:
        return self.lm.nbytes_per_slot()
