"""Tests for dsm_stt.model.mimi: parity with the reference codec, streaming == offline, slot
independence under masks and resets, input validation."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import pytest
import torch
from reference import official_tensors, randomize_reference_mimi, reference_mimi
from torch import Tensor

from dsm_stt.cpu import codebook
from dsm_stt.cpu.kernels.build import problem as kernels_problem
from dsm_stt.model.checkpoint import load_mimi
from dsm_stt.model.config import MimiConfig
from dsm_stt.model.mimi import MimiEncoder, MimiInputError, MimiState

FRAME = 1920

TINY = MimiConfig(
    n_filters=4,
    dimension=32,
    num_heads=2,
    num_layers=2,
    dim_feedforward=64,
    layer_scale=1.0,  # the published 0.01 would hide the transformer from the codes
    context=10,  # 10 positions at 25 Hz = 5 frames: the tests run well past the window
    quantizer_dim=16,
    quantizer_bins=64,
    quantizer_n_q=8,
    num_codebooks=8,
)


def make_audio(seconds: float, seed: int, batch: int = 1) -> Tensor:
    """Sum of a few sines with random frequencies plus noise, amplitude ~0.3; [batch, 1, N]."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * 24000)
    t = torch.arange(n, dtype=torch.float64) / 24000
    out = []
    for _ in range(batch):
        freqs = 80 + 2000 * torch.rand(4, generator=g, dtype=torch.float64)
        phases = 2 * math.pi * torch.rand(4, 1, generator=g, dtype=torch.float64)
        wave = torch.sin(2 * math.pi * freqs[:, None] * t + phases).sum(0) / 4
        envelope = 0.5 + 0.5 * torch.sin(2 * math.pi * 1.3 * t)
        noise = 0.05 * torch.randn(n, generator=g, dtype=torch.float64)
        out.append((0.3 * wave * envelope + noise).float())
    return torch.stack(out)[:, None]


@torch.no_grad()
def spread_seanet(seanet: torch.nn.Module) -> None:
    """Re-draw the SEANet conv weights with gain 1.5: the default init shrinks the signal to a
    nearly constant latent, which would make most codes identical over time."""
    for conv in seanet.modules():
        if isinstance(conv, torch.nn.Conv1d):
            conv.weight.normal_(0.0, 1.5 / conv.weight[0].numel() ** 0.5)


def tiny_encoder(seed: int = 0, cfg: MimiConfig = TINY) -> MimiEncoder:
    torch.manual_seed(seed)
    model = MimiEncoder(cfg).eval()
    spread_seanet(model.encoder)
    with torch.no_grad():  # codebooks on the scale of the residuals, so every stage matters
        for stack in (model.quantizer.rvq_first, model.quantizer.rvq_rest):
            for layer in stack.vq.layers:
                layer._codebook.embedding.normal_(0.0, 1.0)
    return model


def stream(model: MimiEncoder, pcm: Tensor, chunk_frames: list[int]) -> Tensor:
    """Feed ``pcm`` [B, 1, n * FRAME] in chunks of the given numbers of frames (cycled)."""
    state = model.allocate_state(pcm.shape[0])
    codes, pos, i = [], 0, 0
    while pos < pcm.shape[-1]:
        size = chunk_frames[i % len(chunk_frames)] * FRAME
        codes.append(model.encode_chunk(pcm[..., pos : pos + size], state))
        pos += size
        i += 1
    return torch.cat(codes, dim=-1)


# --------------------------------------------------------------------------------------------
# parity with the reference package


def codebook_search(monkeypatch: pytest.MonkeyPatch, quantizer, compiled: bool) -> list[int]:
    """With ``compiled``, swap the compiled codebook search (``cpu.codebook``) into both
    halves of Mimi's ``quantizer``, as ``cpu.install`` does; returns a list that counts the
    compiled calls."""
    calls: list[int] = []
    if not compiled:
        return calls
    if kernels_problem() is not None:
        pytest.skip(f"no compiled kernels: {kernels_problem()}")
    real = codebook.vq_encode
    monkeypatch.setattr(codebook, "vq_encode", lambda *a: calls.append(1) or real(*a))
    for half in ("rvq_first", "rvq_rest"):
        setattr(quantizer, half, codebook.CompiledResidualVQ(getattr(quantizer, half)))
    return calls


@pytest.mark.reference
@pytest.mark.parametrize("compiled", [False, True], ids=["torch-search", "compiled-search"])
@pytest.mark.parametrize("num_codebooks", [8, 5])
def test_codes_equal_reference_streaming(
    tmp_path: Path, num_codebooks: int, compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("moshi")
    from safetensors.torch import save_file

    cfg = dataclasses.replace(TINY, num_codebooks=num_codebooks)
    torch.manual_seed(1)
    ref = reference_mimi(cfg)
    randomize_reference_mimi(ref, seed=2)
    path = tmp_path / "mimi.safetensors"
    save_file(official_tensors(ref), str(path))
    ours = load_mimi(path, cfg)
    calls = codebook_search(monkeypatch, ours.quantizer, compiled)

    n_frames = 40  # 80 encoder positions, 8x the window of 10
    pcm = make_audio(n_frames * FRAME / 24000, seed=3, batch=2)
    with torch.no_grad(), ref.streaming(2):
        expected = torch.cat([ref.encode(frame) for frame in pcm.split(FRAME, dim=-1)], -1)
    assert expected.shape == (2, num_codebooks, n_frames)
    # non-trivial codes in every codebook, so that equality means something
    assert all(expected[:, k].unique().numel() > 5 for k in range(num_codebooks))

    for chunks in ([1], [2], [1, 3, 2, 5, 1]):
        assert torch.equal(stream(ours, pcm, chunks), expected), chunks
    assert torch.equal(ours.encode(pcm), expected)
    assert bool(calls) == compiled


@pytest.mark.parametrize("batch", [1, 5, 33])
def test_compiled_codebook_search_gives_the_torch_loops_codes(
    batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    quantizer = tiny_encoder(seed=4).quantizer
    g = torch.Generator().manual_seed(batch)
    latent = torch.randn(batch, TINY.dimension, 1, generator=g) * 3
    expected = quantizer.encode(latent)
    assert expected.shape == (batch, TINY.num_codebooks)
    assert expected[:, 1:].unique().numel() > min(batch, 10)  # the search picks varied entries
    calls = codebook_search(monkeypatch, quantizer, compiled=True)
    assert set(quantizer.state_dict()) == set(tiny_encoder(seed=4).quantizer.state_dict())
    assert torch.equal(quantizer.encode(latent), expected)
    assert len(calls) == 2  # the semantic stage and the acoustic stages


# --------------------------------------------------------------------------------------------
# streaming semantics


def test_state_dict_uses_official_names() -> None:
    keys = set(tiny_encoder().state_dict())
    for key in (
        "encoder.model.0.conv.conv.weight",
        "encoder.model.1.block.1.conv.conv.weight",
        "encoder.model.1.block.3.conv.conv.bias",
        "encoder.model.14.conv.conv.weight",
        "encoder_transformer.transformer.layers.0.self_attn.in_proj_weight",
        "encoder_transformer.transformer.layers.1.layer_scale_2.scale",
        "downsample.conv.conv.conv.weight",
        "quantizer.rvq_first.input_proj.weight",
        "quantizer.rvq_first.vq.layers.0._codebook.embedding",
        "quantizer.rvq_rest.vq.layers.6._codebook.embedding",
    ):
        assert key in keys, key
    assert "quantizer.rvq_rest.vq.layers.7._codebook.embedding" not in keys
    assert not any(k.startswith(("decoder", "upsample")) for k in keys)


def test_encode_equals_chunked_streaming_and_pads_the_tail() -> None:
    model = tiny_encoder()
    pcm = make_audio(1.5, seed=4, batch=2)[..., : 18 * FRAME + 700]  # ragged tail
    codes = model.encode(pcm)
    assert codes.shape == (2, TINY.num_codebooks, 19) and codes.dtype == torch.long
    padded = torch.nn.functional.pad(pcm, (0, FRAME - 700))
    assert torch.equal(stream(model, padded, [1]), codes)
    assert torch.equal(stream(model, padded, [3, 1, 2]), codes)
    # other accepted layouts, and each item of the batch encodes as if alone
    assert torch.equal(model.encode(pcm[:, 0]), codes)
    assert torch.equal(model.encode(pcm[1, 0]), codes[1:])
    assert model.encode(pcm[..., :0]).shape == (2, TINY.num_codebooks, 0)


def test_causal_future_audio_does_not_change_past_codes() -> None:
    model = tiny_encoder()
    pcm = make_audio(1.0, seed=5)[..., : 12 * FRAME]
    other = pcm.clone()
    other[..., 7 * FRAME :] = make_audio(1.0, seed=6)[..., 7 * FRAME : 12 * FRAME]
    a, b = model.encode(pcm), model.encode(other)
    assert torch.equal(a[..., :7], b[..., :7])
    assert not torch.equal(a[..., 7:], b[..., 7:])


def _slot_state(state: MimiState, b: int) -> list[Tensor]:
    """Copies of everything slot ``b`` owns (the ring's shared trash entry excluded)."""
    kv, C = state.kv, state.kv.context
    return [
        t.clone()
        for t in (
            *(buf[b] for buf in state.conv_buffers),
            state.downsample_buffer[b],
            state.first[b],
            kv.keys[:, b, :, :C],
            kv.values[:, b, :, :C],
            kv.key_positions[b, :C],
            kv.positions[b],
        )
    ]


def test_slots_are_independent_under_masks_and_resets() -> None:
    model = tiny_encoder()
    n = 30
    audio = make_audio(n * FRAME / 24000, seed=7, batch=4)
    noise = make_audio(n * FRAME / 24000, seed=8, batch=3)
    idle = {0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 17, 25}  # slot 1 joins late, then pauses
    reset_at = 13  # slot 2 starts a new stream (audio[3]) at this tick

    state = model.allocate_state(3)
    got: list[list[Tensor]] = [[], [], []]
    consumed1 = 0
    for t in range(n):
        active = torch.tensor([True, t not in idle, True])
        if t == reset_at:
            state.reset(torch.tensor([False, False, True]))
        frame = noise[..., t * FRAME : (t + 1) * FRAME].clone()  # idle slots get garbage
        frame[0] = audio[0, :, t * FRAME : (t + 1) * FRAME]
        if active[1]:
            frame[1] = audio[1, :, consumed1 * FRAME : (consumed1 + 1) * FRAME]
        src, start = (2, t) if t < reset_at else (3, t - reset_at)
        frame[2] = audio[src, :, start * FRAME : (start + 1) * FRAME]
        before = _slot_state(state, 1)
        codes = model.step(frame, state, active)
        if active[1]:
            consumed1 += 1
            got[1].append(codes[1])
        else:
            after = _slot_state(state, 1)
            assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))
        got[0].append(codes[0])
        got[2].append(codes[2])

    alone = lambda i, frames: model.encode(audio[i : i + 1, :, : frames * FRAME])[0]  # noqa: E731
    assert torch.equal(torch.stack(got[0], -1), alone(0, n))
    assert torch.equal(torch.stack(got[1], -1), alone(1, n - len(idle)))
    assert torch.equal(torch.stack(got[2][:reset_at], -1), alone(2, reset_at))
    assert torch.equal(torch.stack(got[2][reset_at:], -1), alone(3, n - reset_at))


# --------------------------------------------------------------------------------------------
# bad input


def test_errors_name_the_problem() -> None:
    model = tiny_encoder()
    pcm = make_audio(0.2, seed=9)
    with pytest.raises(MimiInputError, match="24000 Hz.*16000"):
        model.encode(pcm, sample_rate=16000)
    with pytest.raises(MimiInputError, match=r"\[B, 1, N\].*\[1, 2, 4800\]"):
        model.encode(pcm.expand(1, 2, -1))
    with pytest.raises(MimiInputError, match="floating point.*int16"):
        model.encode((pcm * 32767).to(torch.int16))
    state = model.allocate_state(2)
    active = torch.ones(2, dtype=torch.bool)
    with pytest.raises(MimiInputError, match=r"\[B, 1, 1920\].*\[2, 1, 960\]"):
        model.step(torch.zeros(2, 1, 960), state, active)
    with pytest.raises(MimiInputError, match="floating point.*int64"):
        model.step(torch.zeros(2, 1, FRAME, dtype=torch.long), state, active)
    with pytest.raises(MimiInputError, match="state has 2 slots.*3"):
        model.step(torch.zeros(3, 1, FRAME), state, torch.ones(3, dtype=torch.bool))
    with pytest.raises(MimiInputError, match="multiple of 1920.*2000"):
        model.encode_chunk(torch.zeros(2, 1, 2000), state)
    assert issubclass(MimiInputError, ValueError)


@pytest.mark.slow
def test_full_size_step_timing() -> None:
    """Not an assertion: prints the CPU time of one full-size step at batch 1."""
    torch.manual_seed(0)
    model = MimiEncoder(MimiConfig()).eval()
    state = model.allocate_state(1)
    active = torch.ones(1, dtype=torch.bool)
    pcm = make_audio(1.0, seed=0)[..., :FRAME]
    for _ in range(3):
        model.step(pcm, state, active)
    n = 20
    start = time.perf_counter()
    for _ in range(n):
        codes = model.step(pcm, state, active)
    ms = (time.perf_counter() - start) / n * 1000
    print(
        f"\nfull-size MimiEncoder.step, CPU, batch 1, {torch.get_num_threads()} threads: "
        f"{ms:.2f} ms/frame ({ms / 80:.3f} x real time)"
    )
    assert codes.shape == (1, 32)
