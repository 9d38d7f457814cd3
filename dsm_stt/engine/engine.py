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

import functools
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..allocator import reuse_freed_memory
from ..config import KV_CACHES, QUANTIZE, EngineConfig, cpu_has_amx_int8, cpu_has_vnni
from ..model.checkpoint import SttModel, load_model
from ..model.kernels import int8_kv_problem
from ..model.quantize import OWN_KERNELS, quantize_lm_int8, quantize_lm_w8a8, w8a8_kernels
from .graphs import Capture, StepGraphs, cuda_capture
from .scheduler import StepOutput
from .state import EngineState


class Engine:
    def __init__(
        self,
        model: SttModel,
        batch_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        temperature: float = 0.0,
        seed: int = 0,
        quantize: str = "none",
        kv_cache: str = "float",
        lookahead: bool = False,
    ) -> None:
        self.device = torch.device(device)
        # compute each slot's next LM position right after its frame's Mimi encode (see
        # begin_step); eager steps only (captured CUDA graphs keep the plain order)
        self.lookahead = bool(lookahead)
        if kv_cache not in KV_CACHES:
            raise ValueError(f"kv cache must be one of {', '.join(KV_CACHES)}, got {kv_cache!r}")
        if kv_cache == "int8":
            if self.device.type != "cpu":
                raise ValueError(f"kv cache int8 runs on CPU only, not {self.device.type}")
            problem = int8_kv_problem()  # builds the kernel on first use (seconds)
            if problem is not None:
                raise ValueError(f"kv cache int8: {problem}")
        self.kv_cache = kv_cache
        if self.device.type == "cpu":
            reuse_freed_memory()
        self.dtype = dtype
        self.model = model
        self.lm = model.lm.to(device=self.device, dtype=dtype).eval()
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
        if quantize == "int8":
            quantize_lm_int8(self.lm)
        self.w8a8_kernel = w8a8_kernel(batch_size) if quantize == "w8a8" else None
        if self.w8a8_kernel is not None:
            quantize_lm_w8a8(self.lm, 8 if cpu_has_vnni() else 7, self.w8a8_kernel)
        self.quantize = quantize
        self.mimi = model.mimi.to(device=self.device, dtype=torch.float32).eval()
        self.batch_size = batch_size
        self.frame_size = model.config.mimi.frame_size
        self.has_vad = model.config.lm.extra_heads_num_heads > 0
        self.delay_tokens = model.config.stt.asr_delay_in_tokens
        self.temperature = float(temperature)
        # sampling only (temperature > 0); greedy engines need none
        self.generator = torch.Generator(self.device).manual_seed(seed) if temperature > 0 else None
        kv_dtype = torch.int8 if kv_cache == "int8" else dtype
        self.state = EngineState.allocate(
            self.mimi, self.lm, batch_size, self.device, dtype, kv_dtype
        )
        self.graphs: StepGraphs | None = None  # see capture_steps
        self._pending: Callable[[], None] | None = None  # the Mimi half begin_step left

    @classmethod
    def from_config(cls, model: str, config: EngineConfig, random_weights: bool = False) -> Engine:
        """Load ``model`` (repo id or directory; with ``random_weights`` any known
        architecture name) and place it as ``config`` says."""
        device, dtype = _placement(config)  # refuses what cannot run before a long load
        if random_weights:
            from ..model.synthetic import random_model

            stt = random_model(model, dtype=dtype, device=device, seed=config.seed)
        else:
            stt = load_model(model, dtype=dtype, device=device)
        return cls.configured(stt, config)

    @classmethod
    def configured(cls, model: SttModel, config: EngineConfig) -> Engine:
        """An engine for an already loaded ``model``, placed and set up as ``config`` says
        (CUDA graphs captured when asked for)."""
        device, dtype = _placement(config)
        engine = cls(
            model,
            config.batch_size,
            device,
            dtype,
            config.temperature,
            config.seed,
            config.quantize,
            config.kv_cache,
            config.lookahead,
        )
        if config.cuda_graphs:
            engine.capture_steps()
        return engine

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def fused_layers(self) -> bool:
        """Whether the LM's steps run one compiled call per layer (``model.fused``)."""
        fused = self.lm.transformer.fused
        return fused is not None and fused.runs_on(self.state.lm, self.dtype, self.device)

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
        if self.temperature <= 0:
            return logits.argmax(dim=-1)
        u = torch.rand(logits.shape, generator=self.generator, device=logits.device)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)).clamp_min(1e-20))
        return (logits / self.temperature + gumbel).argmax(dim=-1)

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
        pending()
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
        if self.graphs is not None:
            tokens, vad, self._pending = self.graphs.advance(pcm_t, active_t, reset_t)
        elif self.lookahead:
            state = self.state if n == B else self.state.prefix(n)
            tokens, vad = self.ahead(active_t, reset_t, state)
            self._pending = functools.partial(self.encode_ahead, pcm_t, active_t, state)
        else:
            state = self.state if n == B else self.state.prefix(n)
            tokens, vad = self.advance(active_t, reset_t, state)
            self._pending = functools.partial(self.encode, pcm_t, active_t, state)
        if marks is not None:
            marks.append(self._clock())
        prs = [tuple(map(float, r)) for r in vad.float().cpu().numpy()]
        idle = B - n
        return StepOutput(
            tokens=tokens.cpu().tolist() + [-1] * idle,
            prs=prs + [(0.0,) * vad.shape[1]] * idle,
        )


def w8a8_kernel(batch_size: int) -> str:
    """The ``W8A8Linear`` kernel for an engine of ``batch_size`` slots: this package's AMX
    kernel where it runs (CPUs with AMX-INT8 and a C++ compiler), else its AVX512-VNNI kernel
    (CPUs with AVX512-VNNI and a C++ compiler), else oneDNN's on CPUs with AMX-INT8 from 8 slots
    on, else fbgemm's. Measured on a 2-core Xeon with AMX, the stt-1b projections of one layer
    (all four, int8 weights streamed from memory), amx against oneDNN: 1 row 1.81 / 2.59 ms, 32
    rows 2.35 / 3.94, 64 rows 3.32 / 5.02; 16 layers, vnni against fbgemm and oneDNN kept to
    AVX512-VNNI (``ONEDNN_MAX_CPU_ISA``): 1 row 26.5 / 38.9 / 39.6 ms, 8 rows 37.6 / 58.1 /
    47.2, 32 rows 68.8 / 89.9 / 75.6, 64 rows 108.9 / 133.7 / 108.9. Without this package's
    kernels: oneDNN against fbgemm, full LM step, 8 slots 115 -> 107 ms, 16: 170 -> 149, 32:
    296 -> 265; fbgemm's matrix-vector path is faster for one slot (55 against 58 ms)."""
    available = w8a8_kernels()
    for own in OWN_KERNELS:
        if own in available:
            return own
    if "onednn" in available and batch_size >= 8 and cpu_has_amx_int8():
        return "onednn"
    return available[0] if available else "fbgemm"


def _placement(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    device, dtype = config.torch_device(), config.torch_dtype()
    if config.cuda_graphs and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device; this one runs on {device.type}")
    return device, dtype
