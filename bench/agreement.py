"""How far the fast LM variants move the logits: bf16, int8, w8a8, int8 KV against float32.

Builds one architecture with random weights (or loads a checkpoint), encodes an audio signal
with Mimi once, then streams the same inputs through the LM in float32 and in each variant:
every variant is fed the float32 run's greedy text tokens and the same codes (teacher forcing),
so the comparison is per step on identical inputs. Prints, per variant, the largest and mean
absolute logit difference (also relative to the float32 logits' spread), the share of steps
whose argmax token is the same, the share where float32's token is in the variant's top 5, and
the largest VAD difference.

Random weights give flat logit distributions (close runners-up), so the argmax agreement
printed for them is a lower bound of what trained, peaked distributions give.

    python bench/agreement.py --model kyutai/stt-1b-en_fr-candle --random-weights --steps 60
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import numpy as np
import torch

from dsm_stt.audio import load_audio
from dsm_stt.config import EngineConfig
from dsm_stt.cpu.install import install
from dsm_stt.cpu.kernels.build import problem as kernels_problem
from dsm_stt.cpu.plan import Plan, choose
from dsm_stt.cpu.quantize import activation_bits, w8a8_kernels
from dsm_stt.model.checkpoint import load_model
from dsm_stt.model.lm import LM
from dsm_stt.model.synthetic import random_model
from dsm_stt.model.transformer import KVCache


def variants() -> dict[str, Plan]:
    """Every precision this machine runs, as the plans the engine would install: bf16, weight
    int8, w8a8 on each kernel this CPU has, each with the float and the int8 KV ring (where
    the kernels build), and what ``auto`` picks at one slot."""
    kv_rings = ["float"] + (["int8"] if kernels_problem() is None else [])
    out = {
        "bfloat16": Plan("cpu", torch.bfloat16, "none", "float"),
        "bfloat16+int8": Plan("cpu", torch.bfloat16, "int8", "float"),
        "float32+int8": Plan("cpu", torch.float32, "int8", "float"),
    }
    if "int8" in kv_rings:
        out["bfloat16, int8 KV"] = Plan("cpu", torch.bfloat16, "none", "int8")
    for kernel in w8a8_kernels():
        for kv in kv_rings:
            name = f"bfloat16+w8a8 ({kernel})" + (", int8 KV" if kv == "int8" else "")
            bits = activation_bits(kernel)
            out[name] = Plan("cpu", torch.bfloat16, "w8a8", kv, kernel, bits)
    auto = choose(EngineConfig(batch_size=1, device="cpu"))
    out[f"auto ({auto.describe().split(';')[0]})"] = auto
    return out


def test_signal(seconds: float, sample_rate: int = 24000) -> np.ndarray:
    """Speech-like stand-in: harmonics with a moving pitch, bursts and pauses, a little noise."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    pitch = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = (np.sin(2 * np.pi * 1.3 * t) > -0.2).astype(np.float64)
    noise = np.random.default_rng(0).standard_normal(t.shape)
    return (0.2 * voice * envelope + 0.01 * noise).astype(np.float32)


def run_lm(
    lm: LM, codes: torch.Tensor, text: torch.Tensor | None, cache_type: type[KVCache] = KVCache
) -> tuple[torch.Tensor, ...]:
    """Stream codes [K, T] through ``lm`` with the §2.8 alignment. With ``text`` [T] the inputs
    are those tokens (teacher forcing); without, the greedy tokens. Returns logits [T, V] and
    VAD [T, H] in float32 and the tokens [T]."""
    _K, T = codes.shape
    cache = lm.allocate_state(1, cache_type=cache_type)
    active = torch.ones(1, dtype=torch.bool)
    prev_text, prev_audio = lm.initial_tokens(1)
    logits, vads, tokens = [], [], []
    for t in range(T):
        out = lm.step(prev_text, prev_audio, cache, active)
        token = out.logits.argmax(-1) if text is None else text[t : t + 1]
        logits.append(out.logits[0])
        vads.append(out.vad[0])
        tokens.append(token[0])
        prev_text, prev_audio = token, codes[:, t][None]
    return torch.stack(logits), torch.stack(vads), torch.stack(tokens)


def compare(ref: torch.Tensor, ref_vad: torch.Tensor, out: torch.Tensor, vad: torch.Tensor) -> dict:
    diff = (out - ref).abs()
    spread = ref.std().item()
    top5 = out.topk(5, dim=-1).indices
    ref_top = ref.argmax(-1)
    return {
        "max_abs_dlogit": round(diff.max().item(), 5),
        "mean_abs_dlogit": round(diff.mean().item(), 5),
        "max_dlogit_over_spread": round(diff.max().item() / spread, 5),
        "argmax_agreement": round((out.argmax(-1) == ref_top).float().mean().item(), 4),
        "top5_agreement": round((top5 == ref_top[:, None]).any(-1).float().mean().item(), 4),
        "max_dvad": round((vad - ref_vad).abs().max().item(), 5) if vad.numel() else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="kyutai/stt-1b-en_fr-candle")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--audio", help="audio file (default: a generated speech-like signal)")
    parser.add_argument("--steps", type=int, default=60, help="LM steps (80 ms frames)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if args.random_weights:
        model = random_model(args.model, dtype=torch.float32)
    else:
        model = load_model(args.model, dtype=torch.float32)
    seconds = args.steps * 0.08
    pcm = load_audio(args.audio)[: int(seconds * 24000)] if args.audio else test_signal(seconds)
    codes = model.mimi.encode(torch.from_numpy(np.ascontiguousarray(pcm)))[0]  # [K, T]
    lm32 = model.lm.eval()
    ref, ref_vad, tokens = run_lm(lm32, codes, None)
    results = {}
    for name, plan in variants().items():
        lm = copy.deepcopy(lm32).to(plan.dtype)
        # Mimi only runs once above: the variants differ in the LM
        cache_type = install(lm, copy.deepcopy(model.mimi), plan)
        out, vad, _ = run_lm(lm, codes, tokens, cache_type)
        results[name] = compare(ref, ref_vad, out.float(), vad.float())
        del lm
    report = {"model": model.name, "steps": codes.shape[1], "variants": results}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{model.name}: {codes.shape[1]} steps, each variant against float32 on the same inputs")
    head = (
        "| variant | max abs dlogit | mean abs dlogit | max / spread | argmax | top-5 | max dVAD |"
    )
    print(head)
    print("|" + "---|" * 7)
    for name, r in results.items():
        print(
            f"| {name} | {r['max_abs_dlogit']} | {r['mean_abs_dlogit']} | "
            f"{r['max_dlogit_over_spread']} | {r['argmax_agreement']:.1%} | "
            f"{r['top5_agreement']:.1%} | {r['max_dvad']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
