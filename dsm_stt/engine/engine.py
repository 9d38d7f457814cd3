"""The batched streaming step: B fixed slots, one Mimi frame and one LM position per call.

Owns ``Engine``: the loaded model placed on a device, the preallocated ``EngineState``, and
``step(pcm[B, 1920], active[B], reset[B])`` which

1. resets the slots that start a new stream (``reset`` mask),
2. runs one LM position on the *previous* frame's codes and the previous text token (the
   training / moshi-server alignment of spec §2.8; step 0 feeds the start tokens),
3. picks the next text token (greedy, or Gumbel-max sampling at ``temperature``) and the VAD
   probabilities, and stores the token for the next step,
4. encodes each slot's frame with Mimi (frame t → codes c_t) and stores c_t for the next step
   — in active slots only.

The step's output does not depend on this frame's codes, so ``begin_step`` (1-3) returns it
and keeps the Mimi half (4) for ``end_step``: a server sends its messages in between, so they
leave one Mimi encode earlier. ``step`` is both. With ``lookahead`` (a server's engine) the
second half also runs each active slot's next LM position, so the first half of the next step
only hands out ready tokens. Inactive slots are computed but their state never changes. The
engine returns plain Python values at its boundary (``StepOutput``); the scheduler decides
what each slot does.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..allocator import reuse_freed_memory
from ..config import EngineConfig
from ..cpu.plan import Plan, exact_plan
from ..model.checkpoint import SttModel
from ..model.transformer import KVCache
from .events import StepOutput
from .graphs import Capture, StepGraphs, cuda_capture
from .state import EngineState


class Engine:
    """``model`` run as ``config`` says, with ``plan`` already installed into it
    (``loading.build_engine`` resolves ``auto``, places the model, installs the plan and
    passes its KV ``cache_type``). Without a plan the model runs as it is, on the float path
    in ``config``'s dtype: explicit quantization or an int8 KV cache need a plan."""

    def __init__(
        self,
        model: SttModel,
        config: EngineConfig,
        plan: Plan | None = None,
        cache_type: type[KVCache] = KVCache,
    ) -> None:
        if plan is None:
            if config.quantize not in ("auto", "none") or config.kv_cache not in ("auto", "float"):
                raise ValueError(
                    f"quantize {config.quantize} / kv cache {config.kv_cache}: build the engine "
                    "with dsm_stt.loading.build_engine, which installs them"
                )
            plan = exact_plan(config)
        if (cache_type is not KVCache) != (plan.kv_cache == "int8"):
            raise ValueError(
                f"the plan's {plan.kv_cache} KV cache needs the cache type its install returned, "
                f"not {cache_type.__name__}"
            )
        self.config = config
        self.plan = plan
        self.device = torch.device(plan.device)
        # compute each slot's next LM position right after its frame's Mimi encode (see
        # begin_step); eager steps only (captured CUDA graphs keep the plain order)
        self.lookahead = config.lookahead
        if self.device.type == "cpu":
            reuse_freed_memory()
        self.dtype = plan.dtype
        self.model = model
        self.lm = model.lm.to(device=self.device, dtype=self.dtype).eval()
        self.mimi = model.mimi.to(device=self.device, dtype=torch.float32).eval()
        self.batch_size = config.batch_size
        self.frame_size = model.config.mimi.frame_size
        self.has_vad = model.config.lm.extra_heads_num_heads > 0
        self.delay_tokens = model.config.stt.asr_delay_in_tokens
        self.temperature = float(config.temperature)
        # sampling only (temperature > 0); greedy engines need none
        self.generator = (
            torch.Generator(self.device).manual_seed(config.seed) if self.temperature > 0 else None
        )
        self.state = EngineState.allocate(
            self.mimi, self.lm, self.batch_size, self.device, self.dtype, cache_type
        )
        self.graphs: StepGraphs | None = None  # see capture_steps
        self._pending: _MimiHalf | None = None  # what begin_step left for end_step
        if config.cuda_graphs:
            self.capture_steps()

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def kv_cache(self) -> str:
        return self.plan.kv_cache

    @property
    def quantize(self) -> str:
        return self.plan.quantize

    @property
    def w8a8_kernel(self) -> str | None:
        return self.plan.w8a8_kernel

    @property
    def fused_layers(self) -> bool:
        """Whether the LM's steps run one compiled call per layer (``cpu.fused``)."""
        return self.plan.fused_layers

    def decode(self, ids: list[int]) -> str:
        return self.model.tokenizer.decode(ids)

    @torch.no_grad()
    def advance(self, active: Tensor, reset: Tensor, state: EngineState) -> tuple[Tensor, Tensor]:
        """First half of the device-side step, masks [B] bool → tokens [B] long, VAD [B, H]
        float32: reset the ``reset`` slots, one LM position on the previous codes and token,
        the next token (stored for the next step in active slots). ``state`` is the engine's
        whole state or ``self.state.prefix(n)`` (the first ``n`` slots only)."""
        state.reset(reset)
        return self._position(active, state)

    def _position(self, active: Tensor, state: EngineState) -> tuple[Tensor, Tensor]:
        # one LM position and its token (stored as the next input of the active slots)
        out = self.lm.step(state.prev_text, state.prev_codes, state.lm, active, check_ids=False)
        tokens = self._sample(out.logits)
        state.prev_text.copy_(torch.where(active, tokens, state.prev_text))
        return tokens, out.vad

    @torch.no_grad()
    def encode(self, pcm: Tensor, active: Tensor, state: EngineState) -> Tensor:
        """Second half: encode the frame ``pcm`` [B, 1, F] float32 → codes [B, K], stored for
        the next step (active slots only)."""
        codes = self.mimi.step(pcm, state.mimi, active)
        state.prev_codes.copy_(torch.where(active[:, None], codes, state.prev_codes))
        return codes

    @torch.no_grad()
    def ahead(self, active: Tensor, reset: Tensor, state: EngineState) -> tuple[Tensor, Tensor]:
        """The lookahead engine's first half: the tokens and VAD of this step, which the end of
        each slot's previous step computed; slots starting a stream (``reset``, or never
        stepped) get their step-0 LM position now."""
        if bool(reset.any()):
            state.reset(reset)
        fresh = active & (state.next_token < 0)
        if bool(fresh.any()):
            self._advance_ahead(fresh, state)
        return state.next_token.clone(), state.next_vad.clone()

    @torch.no_grad()
    def encode_ahead(self, pcm: Tensor, active: Tensor, state: EngineState) -> None:
        """The lookahead engine's second half: encode the frame, then the next LM position of
        the active slots, whose token and VAD wait in ``state`` for the next step."""
        self.encode(pcm, active, state)
        self._advance_ahead(active, state)

    def _advance_ahead(self, mask: Tensor, state: EngineState) -> None:
        tokens, vad = self._position(mask, state)
        state.next_token.copy_(torch.where(mask, tokens, state.next_token))
        state.next_vad.copy_(torch.where(mask[:, None], vad, state.next_vad))

    def capture_steps(self, capture: Capture | None = None) -> bool:
        """Replay captured steps from now on (``graphs.StepGraphs``): CUDA graphs by default.
        On CUDA, a capture that fails leaves the engine eager with a warning (False)."""
        self.end_step()  # a pending Mimi half runs eagerly, before the captures take over
        if capture is not None:
            self.graphs = StepGraphs(self, capture)
            return True
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {self.device.type}")
        try:
            self.graphs = StepGraphs(self, cuda_capture())
        except Exception as exc:  # an op that cannot be captured: stay eager
            warnings.warn(f"CUDA graph capture failed, steps stay eager: {exc}", stacklevel=2)
            torch.cuda.synchronize(self.device)
            return False
        return True

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _sample(self, logits: Tensor) -> Tensor:
        return sample_tokens(logits, self.temperature, self.generator)

    def step(
        self,
        pcm: np.ndarray,
        active: np.ndarray,
        reset: np.ndarray,
        marks: list[float] | None = None,
    ) -> StepOutput:
        """Host-side step: numpy in, plain Python out; ``begin_step`` then ``end_step``. With
        ``marks``, the (device-synchronised) times after the LM, before Mimi and after Mimi are
        appended: the benchmark's breakdown."""
        output = self.begin_step(pcm, active, reset, marks)
        self.end_step(marks)
        return output

    def end_step(self, marks: list[float] | None = None) -> None:
        """Run the Mimi half that ``begin_step`` left (nothing if none is left)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if marks is not None:
            marks.append(self._clock())
        if self.graphs is not None:
            self.graphs.encode()
        elif self.lookahead:
            self.encode_ahead(pending.pcm, pending.active, pending.state)
        else:
            self.encode(pending.pcm, pending.active, pending.state)
        if marks is not None:
            marks.append(self._clock())

    def move_slot(self, src: int, dst: int) -> None:
        """Carry the stream in slot ``src`` on in slot ``dst`` (after finishing a pending
        step): the scheduler keeps the used slots packed, as a step computes the slots up to
        the last active one."""
        for slot in (src, dst):
            if not 0 <= slot < self.batch_size:
                raise ValueError(f"slot {slot} out of range for {self.batch_size} slots")
        self.end_step()
        self.state.move(src, dst)

    def begin_step(
        self,
        pcm: np.ndarray,
        active: np.ndarray,
        reset: np.ndarray,
        marks: list[float] | None = None,
    ) -> StepOutput:
        """The LM half of a step, for the scheduler: the tokens and VAD of this step, with the
        Mimi half of ``pcm`` left for ``end_step`` (run first here if the caller did not).
        ``pcm`` is copied: the caller may reuse it.

        Only the slots up to the last one that is active or reset are computed (the scheduler
        fills the lowest free slot first), so a lightly loaded engine pays for the slots in use,
        not for all ``batch_size``. The slots past them get token -1 and zero VAD.

        With ``lookahead`` the step's LM position was computed at the end of the slot's
        previous step: the token of step t depends on the frames before t only (spec §2.8), so
        ``end_step`` encodes frame t and then runs position t + 1 at once, and this call only
        hands out what is ready (a stream's first step computes its position 0 here). Same
        tokens, same work per frame (one extra position when a stream ends), and a server's
        messages for a frame leave as soon as the frame is in, not one LM position later.
        """
        self.end_step()
        B, F = self.batch_size, self.frame_size
        if pcm.shape != (B, F):
            raise ValueError(f"engine step takes pcm of shape [{B}, {F}], got {list(pcm.shape)}")
        active = np.asarray(active, dtype=bool)
        reset = np.asarray(reset, dtype=bool)
        used = np.flatnonzero(active | reset)
        n = int(used[-1]) + 1 if used.size else 1
        # copies: the Mimi half runs after this call returns
        pcm_t = torch.tensor(pcm[:n, None, :], dtype=torch.float32, device=self.device)
        active_t = torch.tensor(active[:n], device=self.device)
        reset_t = torch.tensor(reset[:n], device=self.device)
        state = self.state if n == B else self.state.prefix(n)
        if self.graphs is not None:
            tokens, vad = self.graphs.advance(pcm_t, active_t, reset_t)
        elif self.lookahead:
            tokens, vad = self.ahead(active_t, reset_t, state)
        else:
            tokens, vad = self.advance(active_t, reset_t, state)
        self._pending = _MimiHalf(pcm_t, active_t, state)
        if marks is not None:
            marks.append(self._clock())
        prs = [tuple(map(float, r)) for r in vad.float().cpu().numpy()]
        idle = B - n
        return StepOutput(
            tokens=tokens.cpu().tolist() + [-1] * idle,
            prs=prs + [(0.0,) * vad.shape[1]] * idle,
        )


@dataclass(frozen=True)
class _MimiHalf:
    """The inputs of the Mimi half of a step, which ``end_step`` runs."""

    pcm: Tensor  # [n, 1, F]
    active: Tensor  # [n]
    state: EngineState  # the engine's state or its first n slots


def sample_tokens(
    logits: Tensor, temperature: float, generator: torch.Generator | None = None
) -> Tensor:
    """One token per row of ``logits`` [B, V]: the argmax at temperature 0, else a draw from
    ``softmax(logits / temperature)`` by the Gumbel-max trick, ``argmax(logits / T + G)`` with
    ``G = -log(-log U)``, ``U`` uniform from ``generator`` (so a seeded generator gives the same
    tokens again). One uniform per logit and an argmax: no cumulative sums, the same work for
    every row, and nothing that waits on the host."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    u = torch.rand(logits.shape, generator=generator, device=logits.device)
    # torch.rand is in [0, 1): u = 0 is clamped (so the first log is finite) and -log u > 0 is
    # clamped too (so the second one is, should a backend round it to 0)
    gumbel = -torch.log(torch.log(u.clamp_min(1e-30)).neg().clamp_min(1e-30))
    # the division in float32: bf16 logits would round logits / T to 3 significant digits
    return (logits.float() / temperature + gumbel).argmax(dim=-1)
