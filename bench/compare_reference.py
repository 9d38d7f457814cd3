"""Engine step time: dsm-stt against Kyutai's reference package, same weights, one process.

For a published architecture with random weights, builds the reference Mimi + ``LMGen``
(``moshi==0.2.13``, installed with ``pip install --no-deps moshi==0.2.13 einops``) and a
dsm-stt ``Engine`` loaded from the same tensors, then times one full step per 80 ms frame for
the whole batch (Mimi encode + LM step + greedy token) in interleaved rounds, so both see the
same machine state (the C-heap setting dsm-stt's CPU engine applies is process-wide, so the
reference profits from it too). dsm-stt's caches start full (``--context-fill``, default 1: a
session past its first minute), as a step of the reference reads its whole ring at any fill.
Prints medians and the ratios.

dsm-stt runs what ``dsm-stt bench`` would with the same flags (``auto`` by default: the
plan ``dsm-stt doctor`` names); the reference runs in ``--reference-dtype`` (float32 by
default, its CPU path). ``--device cuda`` runs both on the GPU: the reference then replays
its own CUDA graphs, and ``--cuda-graphs`` lets dsm-stt replay its captured steps too.

    python bench/compare_reference.py --model kyutai/stt-1b-en_fr-candle --batch-size 1 \
        --steps 10 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from reference import official_tensors, reference_lm, reference_mimi

from dsm_stt.benchmark import assume_history
from dsm_stt.config import DTYPE_CHOICES, DTYPES, KV_CACHES, QUANTIZE, EngineConfig
from dsm_stt.loading import build_engine, plan_for
from dsm_stt.model.checkpoint import SttModel, load_lm, load_mimi
from dsm_stt.model.config import preset
from dsm_stt.model.tokenizer import PlaceholderTokenizer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="kyutai/stt-1b-en_fr-candle")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="where both run (default cpu)"
    )
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="dsm-stt's dtype")
    parser.add_argument(
        "--reference-dtype", default="float32", choices=sorted(DTYPES), help="the reference's"
    )
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="dsm-stt replays captured CUDA graphs (the reference graphs its steps on CUDA itself)",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--quantize",
        default="auto",
        choices=QUANTIZE,
        help="dsm-stt's LM projections",
    )
    parser.add_argument(
        "--kv-cache",
        default="auto",
        choices=KV_CACHES,
        help="dsm-stt's LM attention cache (int8: CPU, builds a small C++ kernel)",
    )
    parser.add_argument(
        "--context-fill",
        type=float,
        default=1.0,
        help="how full dsm-stt's attention caches are, 0..1 (default 1: the steady state)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset(args.model)
    B = args.batch_size
    config = EngineConfig(
        batch_size=B,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        kv_cache=args.kv_cache,
        cuda_graphs=args.cuda_graphs,
    )
    plan = plan_for(config)
    torch.manual_seed(0)

    from moshi.models.lm import LMGen

    ref_mimi = reference_mimi(cfg.mimi)
    ref_lm = reference_lm(cfg.lm)
    lm_tensors = official_tensors(ref_lm, torch.bfloat16)
    ref_lm.load_state_dict({k: v.float() for k, v in lm_tensors.items()})
    ref_lm = ref_lm.to(device=args.device, dtype=DTYPES[args.reference_dtype])
    ref_mimi = ref_mimi.to(args.device)
    gen = LMGen(ref_lm, use_sampling=False, temp=0.0, temp_text=0.0)
    model = SttModel(
        args.model,
        cfg,
        load_lm(lm_tensors, cfg.lm, plan.dtype),
        load_mimi(official_tensors(ref_mimi), cfg.mimi),
        PlaceholderTokenizer(cfg.lm.text_card),
    )
    del lm_tensors
    engine = build_engine(model, config, plan, announce=lambda line: None)

    rng = np.random.default_rng(0)
    pcm = (0.1 * rng.standard_normal((B, cfg.mimi.frame_size))).astype(np.float32)
    pcm_t = torch.from_numpy(pcm)[:, None].to(args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    active, no_reset = np.ones(B, bool), np.zeros(B, bool)

    def ours() -> None:
        engine.step(pcm, active, no_reset)

    def reference() -> None:
        with torch.no_grad():
            codes = ref_mimi.encode(pcm_t)
            gen.step(codes)
        sync()

    ours_ms, ref_ms = [], []
    engine.step(pcm, active, np.ones(B, bool))
    assume_history(engine.state, args.context_fill)
    with ref_mimi.streaming(B), gen.streaming(B):
        for _ in range(2):  # warm-up
            ours()
            reference()
        for r in range(args.rounds):
            for fn, out in (
                ((ours, ours_ms), (reference, ref_ms))
                if r % 2 == 0
                else ((reference, ref_ms), (ours, ours_ms))
            ):
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    fn()
                    out.append((time.perf_counter() - t0) * 1e3)
    o, ref = statistics.median(ours_ms), statistics.median(ref_ms)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"{args.model}, batch {B}, {where}, {torch.get_num_threads()} threads, context fill "
        f"{args.context_fill}, {args.rounds}x{args.steps} interleaved steps each"
    )
    print(f"reference: {args.reference_dtype}; dsm-stt: {plan.describe()}")
    print(f"reference (moshi 0.2.13): {ref:8.1f} ms/step -> {B * 80 / ref:6.2f} real-time streams")
    print(f"dsm-stt:                  {o:8.1f} ms/step -> {B * 80 / o:6.2f} real-time streams")
    print(f"speed-up: {ref / o:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
