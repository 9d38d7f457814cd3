"""What one ``Audio`` frame costs the server's event loop to decode, by path.

Packs 80 ms frames (1920 float32 samples) as Kyutai's clients do and times, in one process,
``protocol.decode_client_message`` (which reads that layout straight into numpy) against the
general MessagePack decoder it falls back to for any other layout. Also times decoding a frame
whose samples were packed as float64 (general path only) and checks both paths give the same
samples. Prints microseconds per frame (median of ``--rounds``) and the ratio.

    python bench/protocol_decode.py --frames 2000 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import msgpack
import numpy as np

from dsm_stt.server import protocol
from dsm_stt.server.protocol import Audio, decode_client_message, encode_client_message


def _general(data: bytes) -> object:
    return protocol._decode_general(data, protocol.MAX_MESSAGE_BYTES, protocol.MAX_PCM_SAMPLES)


def per_frame_us(decode, frames: list[bytes], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for data in frames:
            decode(data)
        times.append((time.perf_counter() - start) / len(frames) * 1e6)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000, help="frames per round (2000)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    pcm = [(0.1 * rng.standard_normal(1920)).astype(np.float32) for _ in range(16)]
    kyutai = [encode_client_message(Audio(p)) for p in pcm]
    doubles = [msgpack.packb({"type": "Audio", "pcm": p.tolist()}) for p in pcm]
    for a, b in zip(kyutai, pcm, strict=True):
        fast, general = decode_client_message(a), _general(a)
        assert np.array_equal(fast.pcm, b) and np.array_equal(general.pcm, b)
    frames = [kyutai[i % 16] for i in range(args.frames)]
    wide = [doubles[i % 16] for i in range(args.frames)]
    report = {
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "float32_frame_us": per_frame_us(decode_client_message, frames, args.rounds),
        "float32_frame_general_us": per_frame_us(_general, frames, args.rounds),
        "float64_frame_us": per_frame_us(decode_client_message, wide, args.rounds),
    }
    report["speedup"] = report["float32_frame_general_us"] / report["float32_frame_us"]
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"one 1920-sample Audio frame, median of {args.rounds} rounds of {args.frames}:")
    print(f"  Kyutai's layout (float32), direct:       {report['float32_frame_us']:8.1f} µs")
    print(
        f"  Kyutai's layout, general decoder:        {report['float32_frame_general_us']:8.1f} µs"
    )
    print(f"  float64 samples (general decoder only):  {report['float64_frame_us']:8.1f} µs")
    print(f"  direct against general: {report['speedup']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
