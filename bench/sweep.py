"""Engine step time over batch sizes and precisions, one model build, one table.

Runs ``dsm_stt.benchmark.run_benchmark`` for every (precision, batch size) pair on one loaded
(or random-weight) model and prints a markdown table with real-time streams, step time and its
Mimi / LM split, KV memory per stream and peak memory. Each precision gets its own model build
(the engine converts and quantizes the weights in place); its batch sizes share it, except
where the engine picks another w8a8 kernel for a batch size (``engine.w8a8_kernel``).
``+int8``: int8 LM weights; ``+w8a8``: int8 LM weights and activations (CPU only).

    python bench/sweep.py --model kyutai/stt-1b-en_fr-candle --random-weights \\
        --batch-sizes 1,4,8,16,32 --precisions bfloat16,bfloat16+w8a8 --steps 8
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from dsm_stt.benchmark import run_benchmark
from dsm_stt.config import DTYPES, EngineConfig, resolve_device
from dsm_stt.loading import build_engine, plan_for
from dsm_stt.model.checkpoint import load_model
from dsm_stt.model.synthetic import random_model

ORDER = [
    "float32",
    "float32+int8",
    "float32+w8a8",
    "bfloat16",
    "bfloat16+int8",
    "bfloat16+w8a8",
]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="kyutai/stt-1b-en_fr-candle")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", default="1,4,8,16,32")
    parser.add_argument("--precisions", default="bfloat16,bfloat16+int8", help=", ".join(ORDER))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="replay captured steps (CUDA, see dsm-stt bench)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in ORDER]
    if unknown:
        parser.error(f"unknown precision {unknown[0]!r}: choose from {', '.join(ORDER)}")
    precisions.sort(key=ORDER.index)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    device = resolve_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        parser.error(f"--cuda-graphs needs a CUDA device, not {device.type}")

    def build(dtype: torch.dtype):
        if args.random_weights:
            return random_model(args.model, dtype=dtype, device=device)
        return load_model(args.model, dtype=dtype, device=device)

    hardware = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{cpu_name()}, {torch.get_num_threads()} threads"
    )
    rows = []
    for precision in precisions:
        dtype_name, _, quant = precision.partition("+")
        built: object = object()  # the w8a8 kernel of the model in hand (none yet)
        for batch in batch_sizes:
            config = EngineConfig(
                batch_size=batch,
                device=device.type,
                dtype=dtype_name,
                quantize=quant or "none",
                kv_cache="float",
                cuda_graphs=args.cuda_graphs,
            )
            plan = plan_for(config)
            if plan.w8a8_kernel != built:
                model = engine = None  # free the previous weights before the next build
                model, built = build(DTYPES[dtype_name]), plan.w8a8_kernel
            engine = build_engine(model, config, plan, announce=lambda line: None)
            result = run_benchmark(engine, args.steps, args.warmup)
            rows.append(
                {"precision": precision, "cuda_graphs": engine.graphs is not None}
                | result.as_dict()
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            del engine
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        print(json.dumps({"model": model.name, "hardware": hardware, "results": rows}))
        return 0
    print(f"{model.name} on {hardware}, torch {torch.__version__}")
    print("| precision | batch | step ms | Mimi ms | LM ms | real-time streams | KV MB/stream |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        kernel = f" ({r['w8a8_kernel']})" if r["w8a8_kernel"] else ""
        print(
            f"| {r['precision']}{kernel} | {r['batch_size']} | {r['step_ms']:.1f} "
            f"| {r['mimi_ms']:.1f} "
            f"| {r['lm_ms']:.1f} | {r['realtime_streams']:.2f} | {r['kv_mb_per_stream']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
