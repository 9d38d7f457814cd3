"""The ``dsm-stt`` command: thin functions over the library, one per sub-command.

Owns argument parsing, turning flags into the library's frozen configs once, progress bars and
exit codes. No model, engine or protocol logic lives here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .model.config import DEFAULT_MODEL


def _add_engine_flags(p: argparse.ArgumentParser, batch_default: int) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub repo id or local checkpoint directory (default {DEFAULT_MODEL}); "
        "with --random-weights, a known repo id or 'tiny'",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="build the architecture with random weights (no download): for "
        "benchmarks and smoke tests, the transcripts are meaningless",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument(
        "--batch-size",
        type=int,
        default=batch_default,
        help=f"number of slots (default {batch_default})",
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples"
    )


def _engine(args: argparse.Namespace):
    from .config import EngineConfig
    from .engine.engine import Engine

    config = EngineConfig(
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        temperature=args.temperature,
    )
    return Engine.from_config(args.model, config, random_weights=args.random_weights)


def _fail(message: str) -> int:
    print(f"dsm-stt: error: {message}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------ transcribe


def cmd_transcribe(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .engine.scheduler import Scheduler
    from .model.checkpoint import CheckpointError
    from .transcriber import transcribe_files
    from .writers import EXTENSIONS, render

    if args.batch_size < 1:
        return _fail("--batch-size must be >= 1")
    try:
        engine = _engine(args)
    except (CheckpointError, ValueError) as exc:
        return _fail(str(exc))
    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    cfg = engine.model.config
    scheduler = Scheduler(
        engine, cfg.stt.asr_delay_in_tokens, engine.decode, frame_rate=cfg.mimi.frame_rate
    )
    results = {}
    failed = 0
    bar = tqdm(
        desc="transcribing",
        unit="s audio",
        file=sys.stderr,
        disable=args.quiet,
        bar_format="{desc}: {n:.1f}{unit} [{elapsed}, {rate_fmt}]{postfix}",
    )
    done = 0
    for result in transcribe_files(
        scheduler, args.audio, engine.name, cfg.stt.audio_silence_prefix_seconds, bar.update
    ):
        done += 1
        bar.set_postfix_str(f"{done}/{len(args.audio)} files")
        if result.error is not None:
            failed += 1
            bar.write(f"dsm-stt: error: {result.error}", file=sys.stderr)
            continue
        text = render(result.transcript, args.format)
        if out_dir is not None:
            path = out_dir / f"{Path(result.source).stem}.{EXTENSIONS[args.format]}"
            path.write_text(text, encoding="utf-8")
        results[result.index] = text
    bar.close()
    if out_dir is None:
        for index in sorted(results):
            text = results[index]
            if args.format == "json":
                text = json.dumps(json.loads(text), ensure_ascii=False)
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> int:
    from .benchmark import run_benchmark
    from .model.checkpoint import CheckpointError

    if args.batch_size < 1:
        return _fail("--batch-size must be >= 1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        engine = _engine(args)
        result = run_benchmark(engine, args.steps, args.warmup)
    except (CheckpointError, ValueError) as exc:
        return _fail(str(exc))
    print(json.dumps(result.as_dict()) if args.json else result.summary())
    return 0


# ---------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsm-stt",
        description="Real-time speech-to-text with Kyutai's Delayed Streams Modeling models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "transcribe", help="transcribe audio/video files (word timestamps, text/json/srt/vtt)"
    )
    _add_engine_flags(p, batch_default=8)
    p.add_argument("--format", default="text", choices=["text", "json", "srt", "vtt"])
    p.add_argument(
        "--output-dir", help="write one <name>.<ext> per input here (default: print to stdout)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("audio", nargs="+", help="audio or video files FFmpeg can read")
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("bench", help="time the batched engine step (Mimi + LM + host)")
    _add_engine_flags(p, batch_default=1)
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
