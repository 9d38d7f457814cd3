"""How far the fast variants move the results: bf16, int8, w8a8, int8 KV against float32 for
the LM; the compiled Mimi's codes; the words of the whole ``auto`` pipeline against the exact one.

Builds one architecture with random weights (or loads a checkpoint), encodes an audio signal
with Mimi once, then streams the same inputs through the LM in float32 and in each variant:
every variant is fed the float32 run's greedy text tokens and the same codes (teacher forcing),
so the comparison is per step on identical inputs. Prints, per variant, the largest and mean
absolute logit difference (also relative to the float32 logits' spread), the share of steps
whose argmax token is the same, the share where float32's token is in the variant's top 5, and
the largest VAD difference.

Then, for every Mimi variant a plan can pick (``Plan.float_kernels``: the compiled float32
products, layer step and codebook search), the share of code positions equal to the float
path's on the same audio, overall and for the first (semantic) codebook. Then the words: the
whole exact pipeline (float32 Mimi and LM) and the whole ``auto`` one, each free-running (its
own codes, its own greedy tokens) over the audio, compared step by step and as the sequence of
words (the text tokens that are not padding), with the word error rate of ``auto`` against
exact.

Random weights give flat logit distributions (close runners-up), so the argmax agreement
printed for them is a lower bound of what trained, peaked distributions give; a token that
differs once changes every later input of a free-running run, so the word figures are a lower
bound too.

    python bench/agreement.py --model kyutai/stt-1b-en_fr-candle --random-weights --steps 60 \
        --audio ../shared/audio/bria.mp3
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
from dsm_stt.cpu.install import install, install_mimi
from dsm_stt.cpu.kernels.build import problem as kernels_problem
from dsm_stt.cpu.plan import Plan, choose
from dsm_stt.cpu.quantize import activation_bits, w8a8_kernels
from dsm_stt.model.checkpoint import load_model
from dsm_stt.model.lm import LM
from dsm_stt.model.synthetic import random_model
from dsm_stt.model.transformer import KVCache


def variants(device: str = "cpu") -> dict[str, Plan]:
    """Every precision this machine runs, as the plans the engine would install: bf16, weight
    int8, w8a8 on each kernel this CPU has, each with the float and the int8 KV ring (where
    the kernels build), and what ``auto`` picks at one slot. On CUDA: float32 and bf16 (what
    ``auto`` picks there), on the GPU."""
    if device == "cuda":
        return {
            "cuda float32": Plan("cuda", torch.float32, "none", "float"),
            "cuda bfloat16 (auto)": choose(EngineConfig(batch_size=1, device="cuda")),
        }
    kv_rings = ["float"] + (["int8"] if kernels_problem() is None else [])
    out = {
        "bfloat16": Plan("cpu", torch.bfloat16, "none", "float"),
        "bfloat16+int8": Plan("cpu", torch.bfloat16, "int8", "float"),
        "float32+int8": Plan("cpu", torch.float32, "int8", "float"),
    }
    if "int8" in kv_rings:
        out["bfloat16, int8 KV"] = Plan("cpu", torch.bfloat16, "none", "int8")
    if "avx2" in w8a8_kernels() and "int8" in kv_rings:  # opt-in: never what auto picks
        out["bfloat16+w4a8 (avx2), int8 KV"] = Plan(
            "cpu", torch.bfloat16, "w4a8", "int8", "avx2_int4", 8, fused_layers=True
        )
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
    codes = codes.to(lm.device)
    text = None if text is None else text.to(lm.device)
    cache = lm.allocate_state(1, cache_type=cache_type)
    active = torch.ones(1, dtype=torch.bool, device=lm.device)
    prev_text, prev_audio = lm.initial_tokens(1)
    logits, vads, tokens = [], [], []
    for t in range(T):
        out = lm.step(prev_text, prev_audio, cache, active)
        token = out.logits.argmax(-1) if text is None else text[t : t + 1]
        logits.append(out.logits[0])
        vads.append(out.vad[0])
        tokens.append(token[0])
        prev_text, prev_audio = token, codes[:, t][None]
    return tuple(torch.stack(x).cpu() for x in (logits, vads, tokens))


def mimi_agreement(mimi, pcm: torch.Tensor, device: str = "cpu") -> dict | None:
    """Codes of the compiled Mimi (what ``auto`` installs where ``float_kernels``), or of Mimi
    on the GPU (``device`` cuda), against the CPU float path's, streamed over ``pcm`` [N];
    None where no plan here has another Mimi."""
    auto = choose(EngineConfig(batch_size=1, device=device))
    if device == "cpu" and not auto.float_kernels:
        return None
    fast = copy.deepcopy(mimi).to(device)
    install_mimi(fast, auto)
    frames = pcm.shape[-1] // mimi.frame_size
    x = pcm[: frames * mimi.frame_size].reshape(1, 1, -1)
    ref = mimi.encode_chunk(x, mimi.allocate_state(1))[0]  # [K, T]
    got = fast.encode_chunk(x.to(device), fast.allocate_state(1))[0].cpu()
    return {
        "frames": frames,
        "code_agreement": round((ref == got).float().mean().item(), 6),
        "semantic_agreement": round((ref[0] == got[0]).float().mean().item(), 6),
    }


def free_running(model, plan: Plan | None, pcm: torch.Tensor) -> list[int]:
    """The greedy text tokens of the whole pipeline (Mimi, then the LM on its codes) under
    ``plan`` (None: the exact float path), with the §2.8 alignment."""
    lm, mimi = copy.deepcopy(model.lm), copy.deepcopy(model.mimi)
    cache_type = KVCache
    if plan is not None:
        lm, mimi = lm.to(plan.device, plan.dtype), mimi.to(plan.device)
        cache_type = install(lm, mimi, plan)
    frames = pcm.shape[-1] // mimi.frame_size
    x = pcm[: frames * mimi.frame_size].reshape(1, 1, -1)
    codes = mimi.encode_chunk(x.to(lm.device), mimi.allocate_state(1))[0]
    _, _, tokens = run_lm(lm, codes, None, cache_type)
    return [int(x) for x in tokens]


def word_agreement(exact: list[int], auto: list[int], padding: set[int]) -> dict:
    words = [[x for x in seq if x not in padding] for seq in (exact, auto)]
    return {
        "steps": len(exact),
        "step_agreement": round(
            sum(a == b for a, b in zip(exact, auto, strict=True)) / len(exact), 4
        ),
        "words_exact": len(words[0]),
        "words_auto": len(words[1]),
        "same_words": words[0] == words[1],
        "wer_auto_vs_exact": round(_edits(words[0], words[1]) / max(len(words[0]), 1), 4),
    }


def _edits(a: list[int], b: list[int]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


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
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where the variants run; the float32 baseline stays on the CPU (default cpu)",
    )
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
    for name, plan in variants(args.device).items():
        lm = copy.deepcopy(lm32).to(plan.device, plan.dtype)
        # Mimi only runs once above: the variants differ in the LM
        cache_type = install(lm, copy.deepcopy(model.mimi), plan)
        out, vad, _ = run_lm(lm, codes, tokens, cache_type)
        results[name] = compare(ref, ref_vad, out.float(), vad.float())
        del lm
    mimi_codes = mimi_agreement(
        model.mimi, torch.from_numpy(np.ascontiguousarray(pcm)), args.device
    )
    auto = choose(EngineConfig(batch_size=1, device=args.device))
    cfg = model.lm.cfg
    padding = {cfg.text_padding_id, cfg.end_of_padding_id}
    pcm_t = torch.from_numpy(np.ascontiguousarray(pcm))
    words = word_agreement(
        free_running(model, None, pcm_t), free_running(model, auto, pcm_t), padding
    )
    report = {
        "model": model.name,
        "steps": codes.shape[1],
        "variants": results,
        "mimi": mimi_codes,
        "words": words,
        "auto": auto.describe(reason=False),
    }
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
    if mimi_codes is not None:
        print(
            f"\n{'CUDA' if args.device == 'cuda' else 'compiled'} Mimi against the CPU float "
            f"path, {mimi_codes['frames']} frames: "
            f"{mimi_codes['code_agreement']:.4%} of code positions equal "
            f"(semantic codebook {mimi_codes['semantic_agreement']:.4%})"
        )
    else:
        print("\nno plan here compiles Mimi: its codes are the float path's")
    print(
        f"\nwhole pipeline, free-running, auto ({report['auto']}) against exact, "
        f"{words['steps']} steps: {words['step_agreement']:.1%} of steps give the same token; "
        f"{words['words_exact']} words exact, {words['words_auto']} auto, "
        f"{'the same words' if words['same_words'] else 'different words'}, "
        f"WER of auto against exact {words['wer_auto_vs_exact']:.1%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
