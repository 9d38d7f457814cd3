"""The DSM language model: one text stream and ``n_q`` audio streams in, text logits out.

Owns the ``LM`` module (spec §2): the sum of ``1 + n_q`` input embeddings, the windowed causal
transformer of ``transformer.py``, the final RMSNorm, the text head and the optional extra heads
(semantic VAD, spec §2.6). Parameter names are the official checkpoint key names (spec §1.5,
with RMSNorm ``alpha`` stored as ``[D]``), so loading is a plain ``load_state_dict``.

Two entry points compute the same function:
- ``step``: one streaming position per slot over an explicit ``KVCache`` owned by the caller,
  with an ``active`` mask so idle slots do not advance;
- ``forward_sequence``: a whole sequence at once (teacher forcing), for tests and offline use.

Step alignment (spec §2.8, the detail that matters most): the output at step ``t`` predicts the
text token of frame ``t``, from the *previous* text token and the *previous* audio frame. So step
``t`` must be fed ``(text predicted at t-1, audio frame t-1)`` and step 0 the start ids
(``initial_tokens``). ``shift_inputs`` builds that input sequence for ``forward_sequence``.

Not here: sampling (the engine takes the argmax), the Mimi codec, checkpoint files, and the
decision of which slots run or reset (the engine's ``active`` and ``KVCache.reset`` masks).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import LMConfig
from .layers import RMSNorm
from .transformer import KVCache, LMLayer, Transformer


class LMInputError(ValueError):
    """Tokens or state handed to the LM have the wrong shape, dtype or id range."""


@dataclass(frozen=True)
class LMOutput:
    """What one step (``[B, …]``) or a sequence (``[B, T, …]``) produces."""

    logits: Tensor  # [B, text_card] (or [B, T, text_card]), float32
    vad: Tensor  # [B, num_extra_heads] (or [B, T, num_extra_heads]) float32, class-0 prob


class LM(nn.Module):
    """DSM STT language model built from an ``LMConfig`` (random init until loaded)."""

    def __init__(
        self,
        cfg: LMConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.text_emb = nn.Embedding(cfg.text_card + 1, cfg.dim)
            self.emb = nn.ModuleList(nn.Embedding(cfg.card + 1, cfg.dim) for _ in range(cfg.n_q))
            self.transformer = Transformer(
                [
                    LMLayer(
                        cfg.dim,
                        cfg.num_heads,
                        cfg.hidden_dim,
                        cfg.context,
                        cfg.max_period,
                        cfg.norm_eps,
                    )
                    for _ in range(cfg.num_layers)
                ],
                num_heads=cfg.num_heads,
                head_dim=cfg.head_dim,
                context=cfg.context,
                max_period=cfg.max_period,
            )
            self.out_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.text_linear = nn.Linear(cfg.dim, cfg.text_card, bias=False)
            self.extra_heads = nn.ModuleList(
                nn.Linear(cfg.dim, cfg.extra_heads_dim, bias=False)
                for _ in range(cfg.extra_heads_num_heads)
            )
        self.reset_parameters()
        if dtype is not None:
            self.to(dtype=dtype)

    # ------------------------------------------------------------------------------------
    # construction

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init giving non-degenerate outputs (GPT-2 style; real use loads weights).

        Embeddings and input projections ~ N(0, 0.02²); residual output projections are
        scaled down by sqrt(2·num_layers) so the residual stream stays O(1) with depth; the
        heads read a unit-RMS hidden state, so N(0, 1/dim) gives logits of unit spread.
        """
        cfg = self.cfg
        std, head_std = 0.02, cfg.dim**-0.5
        out_std = std / math.sqrt(2 * cfg.num_layers)
        for emb in (self.text_emb, *self.emb):
            nn.init.normal_(emb.weight, std=std)
        for layer in self.transformer.layers:
            nn.init.normal_(layer.self_attn.in_proj_weight, std=std)
            nn.init.normal_(layer.self_attn.out_proj.weight, std=out_std)
            nn.init.normal_(layer.gating.linear_in.weight, std=std)
            nn.init.normal_(layer.gating.linear_out.weight, std=out_std)
            nn.init.ones_(layer.norm1.alpha)
            nn.init.ones_(layer.norm2.alpha)
        nn.init.ones_(self.out_norm.alpha)
        nn.init.normal_(self.text_linear.weight, std=head_std)
        for head in self.extra_heads:
            nn.init.normal_(head.weight, std=head_std)

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype (that of the weights)."""
        return self.text_emb.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_emb.weight.device

    @property
    def num_extra_heads(self) -> int:
        return len(self.extra_heads)

    def allocate_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        cache_type: type[KVCache] = KVCache,
    ) -> KVCache:
        """A fresh KV cache of ``cache_type`` for ``batch_size`` slots, by default on the
        weights' device and in their dtype (``step`` refuses a cache whose ``problem`` with
        the weights' dtype is not None)."""
        if batch_size <= 0:
            raise LMInputError(f"batch_size must be positive, got {batch_size}")
        return self.transformer.allocate_cache(
            batch_size, device or self.device, dtype or self.dtype, cache_type
        )

    def initial_tokens(
        self, batch_size: int, device: torch.device | str | None = None
    ) -> tuple[Tensor, Tensor]:
        """Inputs of step 0 (spec §2.8): text start id ``[B]`` and audio pad ids ``[B, K]``."""
        device = self.device if device is None else device
        text = torch.full((batch_size,), self.cfg.text_start_id, dtype=torch.long, device=device)
        audio = torch.full(
            (batch_size, self.cfg.n_q), self.cfg.audio_pad_id, dtype=torch.long, device=device
        )
        return text, audio

    def shift_inputs(self, text: Tensor, audio: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher-forcing inputs from per-frame tokens (the training convention, §2.8).

        ``text`` [B, T] holds the text token of each frame (e.g. the tokens a streaming run
        predicted) and ``audio`` [B, K, T] each frame's codes. Returns the start ids followed
        by everything but the last frame, so position ``t`` sees frame ``t-1``.
        """
        self._check_shapes(text, audio, sequence=True)
        text0, audio0 = self.initial_tokens(text.shape[0], text.device)
        return (
            torch.cat([text0[:, None], text[:, :-1]], dim=1),
            torch.cat([audio0[:, :, None], audio[:, :, :-1]], dim=2),
        )

    # ------------------------------------------------------------------------------------
    # forward

    @torch.no_grad()
    def step(
        self, text: Tensor, audio: Tensor, cache: KVCache, active: Tensor, *, check_ids: bool = True
    ) -> LMOutput:
        """One streaming position for every slot.

        ``text`` [B] long: the previous text token (``text_start_id`` at a stream's step 0);
        ``audio`` [B, K] long: the previous frame's codes (``audio_pad_id`` at step 0);
        ``active`` [B] bool: slots whose state advances (the others compute ignored values).
        ``check_ids`` validates id ranges, which costs a device sync: a compiled or
        graph-captured hot path whose ids come from the codec and the argmax passes False.
        Runs without autograd: the cache is updated in place.
        """
        self._check_shapes(text, audio, sequence=False)
        B = text.shape[0]
        if active.shape != (B,) or active.dtype != torch.bool:
            raise LMInputError(
                f"active: expected bool [{B}], got {active.dtype} {list(active.shape)}"
            )
        if cache.keys.shape[1] != B:
            raise LMInputError(f"cache holds {cache.keys.shape[1]} slots, inputs have {B}")
        problem = cache.problem(self.dtype)
        if problem is not None:
            raise LMInputError(problem)
        if check_ids:
            self._check_ids(text, audio)
        x = self._embed(text[:, None], audio[:, :, None])  # [B, 1, D]
        h = self.out_norm(self.transformer.step(x, cache, active))[:, 0]  # [B, D]
        return self._heads(h)

    def forward_sequence(self, text: Tensor, audio: Tensor) -> LMOutput:
        """Teacher-forced outputs ``[B, T, …]`` of whole sequences starting at position 0.

        ``text`` [B, T] and ``audio`` [B, K, T] are the already aligned *inputs* (see
        ``shift_inputs``): position ``t`` gets what a streaming ``step`` ``t`` would get.
        """
        self._check_shapes(text, audio, sequence=True)
        self._check_ids(text, audio)
        x = self._embed(text, audio)  # [B, T, D]
        return self._heads(self.out_norm(self.transformer.forward_sequence(x)))

    def _embed(self, text: Tensor, audio: Tensor) -> Tensor:
        # text [B, T], audio [B, K, T] -> [B, T, D]: plain sum of 1 + K lookups (spec §2.2)
        x = self.text_emb(text)
        for k, emb in enumerate(self.emb):
            x = x + emb(audio[:, k])
        return x

    def _heads(self, h: Tensor) -> LMOutput:
        # h: [..., D], already out_norm'ed; both heads read the same hidden state (spec §2.6)
        logits = self.text_linear(h).float()
        if self.extra_heads:
            extra = torch.stack([head(h) for head in self.extra_heads], dim=-2)  # [..., H, C]
            vad = extra.float().softmax(dim=-1)[..., 0]
        else:
            vad = logits.new_zeros((*h.shape[:-1], 0))
        return LMOutput(logits=logits, vad=vad)

    # ------------------------------------------------------------------------------------
    # input checks

    def _check_shapes(self, text: Tensor, audio: Tensor, sequence: bool) -> None:
        K = self.cfg.n_q
        t_dims, a_dims = ("[B, T]", "[B, K, T]") if sequence else ("[B]", "[B, K]")
        if text.dtype != torch.long or text.dim() != (2 if sequence else 1):
            raise LMInputError(
                f"text: expected int64 {t_dims}, got {text.dtype} {list(text.shape)}"
            )
        if audio.dtype != torch.long or audio.dim() != text.dim() + 1:
            raise LMInputError(
                f"audio: expected int64 {a_dims}, got {audio.dtype} {list(audio.shape)}"
            )
        expected = (text.shape[0], K, *text.shape[1:])
        if audio.shape != expected:
            raise LMInputError(
                f"audio: expected shape {list(expected)} ({a_dims} with K = "
                f"n_q = {K}), got {list(audio.shape)}"
            )
        if text.device != self.device or audio.device != self.device:
            raise LMInputError(f"tokens on {text.device}/{audio.device}, model on {self.device}")

    def _check_ids(self, text: Tensor, audio: Tensor) -> None:
        cfg = self.cfg
        if text.numel() and not bool(((text >= 0) & (text <= cfg.text_start_id)).all()):
            raise LMInputError(
                f"text ids must be in 0..{cfg.text_start_id} (text_card "
                f"{cfg.text_card} + start id), got min {int(text.min())} "
                f"max {int(text.max())}"
            )
        if audio.numel() and not bool(((audio >= 0) & (audio <= cfg.audio_pad_id)).all()):
            raise LMInputError(
                f"audio ids must be in 0..{cfg.audio_pad_id} (card {cfg.card} "
                f"+ pad id), got min {int(audio.min())} max {int(audio.max())}"
            )
