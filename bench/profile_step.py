"""Where the milliseconds of one engine step go, each piece against its floor.

Builds one architecture with random weights and the engine ``auto`` (or the given flags)
would run, then times, at each batch size, the pieces of a step in isolation (the median of
``--repeats`` calls, caches full as in a session past its first minute): Mimi's SEANet, its
transformer, its downsampling and codebook search; the LM's four projections over all layers
(one row per slot), its attention over full rings, its output heads; and the whole LM and
Mimi steps, whose remainder over the pieces is the host work (norms, RoPE, embeddings,
Python). Each piece gets its floor: the bytes it must read at the measured memory bandwidth,
or its multiply-adds at the measured float32 peak of ``torch.mm`` (the int8 products: at the
rate of the plan's own int8 product on weights that stay in cache), whichever is larger.
Prints a Markdown table per batch size.

    python bench/profile_step.py --model kyutai/stt-1b-en_fr-candle --batch-sizes 1 8 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from dsm_stt.benchmark import assume_history
from dsm_stt.config import DTYPE_CHOICES, KV_CACHES, QUANTIZE, EngineConfig
from dsm_stt.cpu.kernels.ops import int8_attention
from dsm_stt.loading import build_engine, plan_for
from dsm_stt.model.synthetic import random_model


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bandwidth_gbs() -> float:
    """Read bandwidth: the float32 sum of 512 MB (larger than any cache)."""
    big = torch.ones(128 * 1024 * 1024)
    ms = median_ms(lambda: big.sum(), 5)
    return big.nbytes / ms / 1e6


def peak_gflops() -> float:
    """float32 multiply-add rate of ``torch.mm`` on 1024 x 1024 matrices (2 flops each)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    ms = median_ms(lambda: a @ b, 10)
    return 2 * 1024**3 / ms / 1e6


def int8_gmacs() -> float:
    """The int8 product's multiply-add rate where memory does not bind: the ``W8A8Linear``
    ``auto`` picks, 32 rows against a 1024 x 1024 weight that stays in the caches."""
    from dsm_stt.cpu.plan import choose
    from dsm_stt.cpu.quantize import W8A8Linear

    plan = choose(EngineConfig(batch_size=32, device="cpu"))
    if plan.quantize != "w8a8":
        return 0.0
    linear = W8A8Linear(torch.randn(1024, 1024), plan.w8a8_bits, plan.w8a8_kernel)
    x = torch.randn(32, 1024)
    ms = median_ms(lambda: linear(x), 20)
    return 32 * 1024 * 1024 / ms / 1e6


def mimi_macs(mimi, B: int) -> dict[str, float]:
    """Multiply-adds of one Mimi step per piece (SEANet convolutions, transformer)."""
    frame = mimi.frame_size
    seanet, length = 0.0, frame
    for conv in mimi.encoder.convs():
        c = conv.conv.conv
        length = length // conv.stride
        seanet += length * c.out_channels * c.in_channels * c.kernel_size[0]
    cfg = mimi.cfg
    positions = 2  # 25 Hz positions per 80 ms frame
    layer = 4 * cfg.dimension**2 + 2 * cfg.dimension * cfg.dim_feedforward
    transformer = positions * cfg.num_layers * layer
    return {"seanet": B * seanet, "transformer": B * transformer}


def row(name: str, ms: float, floor_ms: float | None, what: str) -> str:
    floor = f"{floor_ms:.2f}" if floor_ms is not None else "—"
    ratio = f"{ms / floor_ms:.1f}x" if floor_ms else "—"
    return f"| {name} | {ms:.2f} | {floor} | {ratio} | {what} |"


def profile(engine, B: int, repeats: int, gbs: float, gflops: float, int8_rate: float) -> list[str]:
    lm, mimi, state = engine.lm, engine.mimi, engine.state
    assume_history(state, 1.0)
    active = torch.ones(B, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    pcm = torch.randn(B, 1, mimi.frame_size, generator=g) * 0.1

    def floor(nbytes: float = 0.0, macs: float = 0.0, int8: bool = False) -> float:
        compute = macs / int8_rate / 1e6 if int8 and int8_rate else 2 * macs / gflops / 1e6
        return max(nbytes / gbs / 1e6, compute)

    lines = []
    # Mimi: the whole step, then its pieces on the same state
    mimi_ms = median_ms(lambda: mimi.step(pcm, state.mimi, active), repeats)
    st = state.mimi
    latent = mimi.encoder.step(pcm, st.conv_buffers, active)
    tr = mimi.encoder_transformer.transformer
    seanet_ms = median_ms(lambda: mimi.encoder.step(pcm, st.conv_buffers, active), repeats)
    y = tr.step(latent.transpose(1, 2), st.kv, active).transpose(1, 2)
    tr_ms = median_ms(lambda: tr.step(latent.transpose(1, 2), st.kv, active), repeats)
    z = mimi.downsample.step(y, st.downsample_buffer, st.first, active)
    vq_ms = median_ms(lambda: mimi.quantizer.encode(z), repeats)
    macs = mimi_macs(mimi, B)
    conv_bytes = sum(c.conv.conv.weight.nbytes for c in mimi.encoder.convs())
    tr_bytes = sum(p.nbytes for n, p in tr.named_parameters() if "weight" in n)
    books = [
        layer._codebook.embedding
        for half in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest)
        for layer in half.vq.layers
    ]
    vq_bytes = sum(b.nbytes for b in books)
    vq_macs = B * sum(b.numel() for b in books)
    lines.append(row("Mimi SEANet", seanet_ms, floor(conv_bytes, macs["seanet"]), "convolutions"))
    lines.append(
        row("Mimi transformer", tr_ms, floor(tr_bytes, macs["transformer"]), "8 layers, 2 rows")
    )
    lines.append(row("Mimi codebook search", vq_ms, floor(vq_bytes, vq_macs), "32 stages"))
    rest = mimi_ms - seanet_ms - tr_ms - vq_ms
    lines.append(row("Mimi rest (downsampling, host)", rest, None, ""))
    lines.append(row("**Mimi step**", mimi_ms, None, ""))

    # LM: the whole step, then its pieces
    def lm_step():
        return lm.step(state.prev_text, state.prev_codes, state.lm, active, check_ids=False)

    lm_ms = median_ms(lm_step, repeats)
    layers = lm.transformer.layers
    D = lm.cfg.dim
    pieces = 0.0
    for label, get in (
        ("QKV", lambda layer: layer.self_attn.in_proj),
        ("attention output", lambda layer: layer.self_attn.out_proj),
        ("FFN in", lambda layer: layer.gating.linear_in),
        ("FFN out", lambda layer: layer.gating.linear_out),
    ):
        mods = [get(layer) for layer in layers]
        xs = torch.randn(B, 1, mods[0].in_features).to(lm.dtype)
        ms = median_ms(lambda mods=mods, xs=xs: [m(xs) for m in mods], repeats)
        nbytes = sum(_weight_bytes(m) for m in mods)
        n_macs = B * sum(m.in_features * m.out_features for m in mods)
        pieces += ms
        int8 = getattr(mods[0], "kernel", None) is not None
        lines.append(
            row(f"LM {label} (x{len(mods)})", ms, floor(nbytes, n_macs, int8), _kind(mods[0]))
        )
    cache = state.lm
    H = lm.cfg.num_heads
    S = cache.context
    q = torch.randn(B, H, 1, D // H)
    mask = torch.ones(B, 1, S, dtype=torch.bool)
    if hasattr(cache, "key_scales"):
        att = [
            lambda i=i: int8_attention(
                q,
                cache.keys[i, :, :, :S],
                cache.key_scales[i, :, :, :S],
                cache.values[i, :, :, :S],
                cache.value_scales[i, :, :, :S],
                mask,
            )
            for i in range(len(layers))
        ]
        att_ms = median_ms(lambda: [f() for f in att], repeats)
        ring = cache.keys[:, :, :, :S].nbytes + cache.values[:, :, :, :S].nbytes
        lines.append(
            row(f"LM attention (x{len(layers)})", att_ms, floor(ring), f"int8 ring, {S} entries")
        )
        pieces += att_ms
    h = torch.randn(B, D).to(lm.dtype)
    heads_ms = median_ms(lambda: lm._heads(h), repeats)
    heads = [lm.text_linear, *lm.extra_heads]
    head_bytes = sum(x.weight.nbytes for x in heads)
    head_macs = B * sum(x.weight.numel() for x in heads)
    lines.append(row("LM heads", heads_ms, floor(head_bytes, head_macs), "text + VAD"))
    pieces += heads_ms
    lines.append(row("LM rest (norms, RoPE, embeddings, host)", lm_ms - pieces, None, ""))
    lines.append(row("**LM step**", lm_ms, None, ""))
    return lines


def _weight_bytes(module) -> int:
    packed = getattr(module, "packed", None)
    if isinstance(packed, torch.Tensor):
        return module.out_features * module.in_features  # int8
    weight = getattr(module, "weight", None)
    return weight.nbytes if isinstance(weight, torch.Tensor) else 0


def _kind(module) -> str:
    kernel = getattr(module, "kernel", None)
    return f"w8a8 on {kernel}" if kernel else type(module).__name__


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="kyutai/stt-1b-en_fr-candle")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    parser.add_argument("--quantize", default="auto", choices=QUANTIZE)
    parser.add_argument("--kv-cache", default="auto", choices=KV_CACHES)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    gbs, gflops, int8_rate = bandwidth_gbs(), peak_gflops(), int8_gmacs()
    print(
        f"{torch.get_num_threads()} threads; read bandwidth {gbs:.1f} GB/s, "
        f"float32 torch.mm {gflops:.0f} GFLOP/s, the int8 product in cache "
        f"{int8_rate:.0f} G multiply-adds/s (the floors: bytes at the bandwidth, or "
        "multiply-adds at these rates)"
    )
    model = None
    for B in args.batch_sizes:
        config = EngineConfig(
            batch_size=B,
            device="cpu",
            dtype=args.dtype,
            quantize=args.quantize,
            kv_cache=args.kv_cache,
        )
        plan = plan_for(config)
        if model is None:
            model = random_model(args.model, plan.dtype)
        engine = build_engine(model, config, plan, announce=lambda _line: None)
        print(f"\n{args.model}, batch {B}: {plan.describe(reason=False)}\n")
        print("| piece | ms | floor ms | over floor | what |")
        print("|---|---|---|---|---|")
        for line in profile(engine, B, args.repeats, gbs, gflops, int8_rate):
            print(line)
        del engine
    return 0


if __name__ == "__main__":
    sys.exit(main())
