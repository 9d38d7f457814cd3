"""Full-size parity with Kyutai's reference package on a published architecture.

Builds the reference Mimi and LM (``moshi==0.2.13``, install with ``pip install --no-deps
moshi==0.2.13 einops``) at full size with random weights, hands their tensors, under the
published names (LM in bf16 as in the real files), to dsm-stt's loaders, and compares:
Mimi codes over a few seconds of audio streamed frame by frame, then LM text logits and VAD
probabilities over streaming steps with the §2.8 alignment (both models in float32).

    python bench/parity_full.py --model kyutai/stt-1b-en_fr-candle --frames 40 --steps 24
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from reference import (
    official_tensors,
    randomize_reference_mimi,
    reference_lm,
    reference_mimi,
)

from dsm_stt.model.checkpoint import load_lm, load_mimi
from dsm_stt.model.config import preset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="kyutai/stt-1b-en_fr-candle")
    parser.add_argument("--frames", type=int, default=40, help="Mimi frames (80 ms each)")
    parser.add_argument("--steps", type=int, default=24, help="LM streaming steps")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset(args.model)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    ref_mimi = reference_mimi(cfg.mimi)
    randomize_reference_mimi(ref_mimi)
    ours_mimi = load_mimi(official_tensors(ref_mimi), cfg.mimi)
    rng = np.random.default_rng(0)
    t = np.arange(args.frames * 1920) / 24000
    pcm = 0.3 * np.sin(2 * np.pi * 220 * t * (1 + t)) + 0.05 * rng.standard_normal(t.size)
    pcm = torch.from_numpy(pcm.astype(np.float32))[None, None]
    with torch.no_grad(), ref_mimi.streaming(1):
        ref_codes = torch.cat([ref_mimi.encode(f) for f in pcm.split(1920, dim=-1)], dim=-1)
    our_codes = ours_mimi.encode(pcm)
    mimi_equal = torch.equal(ref_codes, our_codes)
    print(
        f"mimi: {args.frames} frames x {cfg.mimi.num_codebooks} codebooks, codes equal: "
        f"{mimi_equal} ({(ref_codes != our_codes).sum().item()} differ), "
        f"{time.perf_counter() - t0:.0f} s"
    )
    del ref_mimi, ours_mimi

    t0 = time.perf_counter()
    ref = reference_lm(cfg.lm)
    tensors = official_tensors(ref, torch.bfloat16)
    ref.load_state_dict({k: v.float() for k, v in tensors.items()})
    ours = load_lm(tensors, cfg.lm, dtype=torch.float32)
    del tensors
    print(f"lm: built and loaded in {time.perf_counter() - t0:.0f} s")
    codes = (
        ref_codes
        if ref_codes.shape[-1] >= args.steps
        else torch.randint(0, cfg.lm.card, (1, cfg.lm.n_q, args.steps))
    )
    text_prev, audio_prev = ours.initial_tokens(1)
    cache = ours.allocate_state(1)
    active = torch.ones(1, dtype=torch.bool)
    max_logit, max_vad, same_argmax = 0.0, 0.0, 0
    with torch.no_grad(), ref.streaming(1):
        for step in range(args.steps):
            seq = torch.cat([text_prev[:, None], audio_prev], dim=1)[:, :, None]
            hidden, logits = ref.forward_text(seq)
            ref_logits = logits[:, 0, 0].float()
            out = ours.step(text_prev, audio_prev, cache, active)
            max_logit = max(max_logit, (out.logits - ref_logits).abs().max().item())
            if ref.extra_heads:
                ref_vad = torch.stack(
                    [h(hidden[:, 0]).softmax(-1)[:, 0] for h in ref.extra_heads], dim=1
                )
                max_vad = max(max_vad, (out.vad - ref_vad).abs().max().item())
            token = ref_logits.argmax(-1)
            same_argmax += int(torch.equal(out.logits.argmax(-1), token))
            text_prev, audio_prev = token, codes[:, :, step]
    print(
        f"lm: {args.steps} steps, max |dlogit| {max_logit:.2e}, max |dvad| {max_vad:.2e}, "
        f"argmax equal {same_argmax}/{args.steps}, {time.perf_counter() - t0:.0f} s"
    )
    ok = mimi_equal and max_logit < 1e-3 and same_argmax == args.steps
    print("PARITY OK" if ok else "PARITY FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
