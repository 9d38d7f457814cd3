"""Helpers for the turn tests: a tiny checkpoint whose VAD heads hear silence, and test signals
made of speech and silences.

``write_talkative_checkpoint`` gives words that follow the audio, but its VAD heads are random:
their pause probabilities mean nothing. ``write_turn_checkpoint`` starts from it and gives the
code that Mimi's first codebook uses for digital silence a direction of its own in the LM's
input embedding; every VAD head reads that direction, so ``prs`` is high (about 0.9) on the
frames of a silence and low (about 0.17) on speech. Turns then end where the test's silences
begin. ``turn_signal`` makes speech loud and noisy enough that Mimi never gives it the silence
code (quiet speech would).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from server_support import FRAME, SAMPLE_RATE, silence, speechlike, write_talkative_checkpoint

from dsm_stt.model.checkpoint import load_model
from dsm_stt.model.synthetic import official_lm_tensors

PAUSE_PROBABILITY = 0.9  # about what every head says on silence
SPEECH_PROBABILITY = 1 / 6  # and on speech (the class-0 logit is 0 there)


def loud_speech(seconds: float, seed: int) -> np.ndarray:
    """``speechlike`` louder, with half-level pauses and strong noise (16-bit exact)."""
    return speechlike(seconds, seed, floor=0.5, depth=0.5, noise=0.5, gain=0.9)


def turn_signal(parts: list[tuple[str, float]], seed: int = 0) -> np.ndarray:
    """``[("silence", 1.04), ("speech", 3.0), …]`` as one signal; lengths rounded to frames."""
    out = []
    for i, (kind, seconds) in enumerate(parts):
        frames = round(seconds * SAMPLE_RATE / FRAME)
        seconds = frames * FRAME / SAMPLE_RATE
        out.append(silence(seconds) if kind == "silence" else loud_speech(seconds, seed + i))
    return np.concatenate(out)


def silence_code(mimi: torch.nn.Module) -> int:
    """The code of Mimi's first codebook for steady digital silence."""
    state = mimi.allocate_state(1, torch.device("cpu"))
    active = torch.ones(1, dtype=torch.bool)
    codes = []
    with torch.no_grad():
        for _ in range(12):
            frame = torch.zeros(1, 1, FRAME)
            codes.append(int(mimi.step(frame, state, active)[0, 0]))
    assert len(set(codes[4:])) == 1, codes  # steady after Mimi's first frames
    return codes[-1]


def write_turn_checkpoint(directory: Path) -> Path:
    """The talkative checkpoint, with VAD heads whose pause probability follows silence."""
    from safetensors.torch import save_file

    write_talkative_checkpoint(directory)
    model = load_model(directory)
    lm, mimi = model.lm, model.mimi
    code = silence_code(mimi)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        W = lm.text_linear.weight  # [text_card, dim]
        emb = lm.emb[0].weight  # [card + 1, dim]
        # A direction of its own for the silence code, orthogonal to the PAD direction (its
        # embedding: silence stays PAD) and to the WORD one; bf16 as the file will hold it.
        u = torch.randn(emb.shape[1], generator=g)
        for row in (W[3], W[0]):
            r = row / row.norm()
            u -= (u @ r) * r
        u /= u.norm()
        emb[code] = (emb[code] + 2.0 * emb[code].norm() * u).bfloat16().float()
        # The heads read it off the final hidden state: the linear discriminant of silence
        # frames against speech frames over calibration signals of other seeds than the tests'.
        parts = [("silence", 1.04)] + [("speech", 2.0), ("silence", 1.5)] * 6
        runs = [_hidden_states(lm, mimi, turn_signal(parts, seed)) for seed in (1000, 2000)]
        hidden = torch.cat([h for h, _ in runs])
        silent = torch.cat([c for _, c in runs]) == code
        speech, quiet = hidden[~silent], hidden[silent]
        cov = torch.cov(speech.T)
        cov += 0.1 * cov.diagonal().mean() * torch.eye(cov.shape[0])
        w = torch.linalg.solve(cov, quiet.mean(0) - speech.mean(0))
        w *= 4.0 / (quiet @ w).mean()  # class-0 logit about 4 on silence: p ~ 0.92
        for head in lm.extra_heads:
            head.weight.zero_()
            head.weight[0] = w
    save_file(official_lm_tensors(lm), str(directory / model.config.moshi_name))
    return directory


def _hidden_states(
    lm: torch.nn.Module, mimi: torch.nn.Module, pcm: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM's final hidden states [T, D] over ``pcm`` (text inputs all PAD) and the first
    codebook's codes [T]."""
    state = mimi.allocate_state(1, torch.device("cpu"))
    active = torch.ones(1, dtype=torch.bool)
    frames = [
        mimi.step(torch.from_numpy(pcm[i : i + FRAME])[None, None], state, active)[0]
        for i in range(0, pcm.size - FRAME + 1, FRAME)
    ]
    codes = torch.stack(frames, dim=-1)[None]  # [1, K, T]
    text = torch.full(codes.shape[::2], lm.cfg.text_padding_id, dtype=torch.long)
    hidden: list[torch.Tensor] = []
    hook = lm.out_norm.register_forward_hook(lambda m, i, o: hidden.append(o.detach()))
    try:
        lm.forward_sequence(text, codes)
    finally:
        hook.remove()
    return hidden[0][0].float(), codes[0, 0]
