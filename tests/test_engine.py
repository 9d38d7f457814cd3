"""Engine: slot independence, the §2.8 alignment, long streams in constant memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_support import KERNELS_PROBLEM, make_engine, needs_kernels

from dsm_stt.config import EngineConfig
from dsm_stt.cpu.plan import choose
from dsm_stt.engine.engine import Engine
from dsm_stt.model.synthetic import random_model, tiny_config

FRAME = 1920
needs_kernel = needs_kernels
# VAD probabilities of one stream computed in batches of different sizes: equal up to the
# float32 rounding of the heads' dot products, whose order the matrix kernels may choose by
# row count (seen on AVX2: 3e-8). A two-class softmax moves by at most a quarter of its
# logits' change, and each logit's rounding is at most D * 2^-24 of its terms' sum (D = 64,
# terms of order 1): 1e-6 bounds it with room, and is far below any VAD decision.
VAD_ROUNDING = 1e-6


def _audio(seed: int, frames: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(frames * FRAME) / 24000
    f = rng.uniform(100, 900)
    return (
        0.3 * np.sin(2 * np.pi * f * t) * np.sin(2 * np.pi * 0.7 * t)
        + 0.05 * rng.standard_normal(t.size)
    ).astype(np.float32)


def _engine(
    batch_size: int,
    context: int = 32,
    kv_cache: str = "float",
    quantize: str = "none",
    lookahead: bool = False,
) -> Engine:
    model = random_model("tiny")
    if context != model.config.lm.context:
        from dsm_stt.model.synthetic import random_lm

        cfg = tiny_config(context=context)
        model.config = cfg
        model.lm = random_lm(cfg.lm, seed=0)
    return make_engine(model, batch_size, quantize=quantize, kv_cache=kv_cache, lookahead=lookahead)


def _run_alone(engine: Engine, audio: np.ndarray) -> list[int]:
    B = engine.batch_size
    tokens = []
    for i in range(audio.size // FRAME):
        pcm = np.zeros((B, FRAME), np.float32)
        pcm[0] = audio[i * FRAME : (i + 1) * FRAME]
        active = np.zeros(B, bool)
        active[0] = True
        reset = np.zeros(B, bool)
        reset[0] = i == 0
        tokens.append(engine.step(pcm, active, reset).tokens[0])
    return tokens


# the fused layer step: one slot (a one-row VNNI product) against four (AMX tiles where the
# CPU has them): the same integer sums
def _fused_here() -> bool:
    if KERNELS_PROBLEM is not None:
        return False
    config = EngineConfig(batch_size=1, device="cpu", quantize="w8a8", kv_cache="int8")
    return choose(config).fused_layers


needs_fused = pytest.mark.skipif(
    not _fused_here(), reason="no fused layer step here (needs AMX or AVX512-VNNI and the kernels)"
)


@pytest.mark.parametrize(
    ("pattern", "kv_cache", "quantize"),
    [
        ("join_leave", "float", "none"),
        ("reset_idle", "float", "none"),
        ("all_busy", "float", "none"),
        pytest.param("join_leave", "int8", "none", marks=needs_kernel),
        pytest.param("reset_idle", "int8", "w8a8", marks=needs_fused),
    ],
)
def test_stream_is_independent_of_its_neighbours(
    pattern: str, kv_cache: str, quantize: str
) -> None:
    frames = 40
    target = _audio(0, frames)
    alone_engine = _engine(1, kv_cache=kv_cache, quantize=quantize)
    alone = _run_alone(alone_engine, target)
    engine = _engine(4, kv_cache=kv_cache, quantize=quantize)
    assert engine.fused_layers == alone_engine.fused_layers == (quantize == "w8a8")
    rng = np.random.default_rng(7)
    tokens = []
    for i in range(frames):
        pcm = (0.3 * rng.standard_normal((4, FRAME))).astype(np.float32)
        pcm[2] = target[i * FRAME : (i + 1) * FRAME]
        if pattern == "join_leave":
            active = np.array([i < 10, 5 <= i < 30, True, i >= 20])
            reset = np.array([i == 0, i == 5, i == 0, i == 20])
        elif pattern == "reset_idle":
            active = np.array([i % 3 != 0, i < 12 or i > 25, True, False])
            reset = np.array([i in (0, 15), i in (0, 26), i == 0, False])
        else:
            active = np.ones(4, bool)
            reset = np.array([i % 9 == 0, i % 7 == 0, i == 0, i % 5 == 0])
        tokens.append(engine.step(pcm, active, reset).tokens[2])
    assert tokens == alone
    assert len(set(alone)) > 1  # random weights still give varied tokens


@pytest.mark.parametrize(
    ("kv_cache", "quantize"),
    [("float", "none"), pytest.param("int8", "w8a8", marks=needs_fused)],
)
def test_lookahead_gives_the_same_tokens_and_vad(kv_cache: str, quantize: str) -> None:
    """Computing each slot's next LM position right after its frame hands out the same
    tokens and VAD, with streams joining, leaving, restarting, idling and moving slots."""
    plain, ahead = (
        _engine(4, kv_cache=kv_cache, quantize=quantize, lookahead=la) for la in (False, True)
    )
    rng = np.random.default_rng(11)
    compared = 0
    for i in range(36):
        pcm = (0.3 * rng.standard_normal((4, FRAME))).astype(np.float32)
        active = np.array([i % 4 != 1, 6 <= i < 26, True, i >= 12 and i % 5 != 0])
        reset = np.array([i in (0, 17), i == 6, i == 0, i == 12])
        if i == 30:  # slot 1 is free from step 26: the stream in slot 3 moves down
            for engine in (plain, ahead):
                engine.move_slot(3, 1)
        if i >= 30:  # ... and goes on there
            active[1], active[3], reset[1] = active[3], False, False
        outs = [engine.step(pcm, active, reset) for engine in (plain, ahead)]
        for slot in np.flatnonzero(active):
            assert outs[0].tokens[slot] == outs[1].tokens[slot], (i, slot)
            np.testing.assert_allclose(outs[0].prs[slot], outs[1].prs[slot], atol=VAD_ROUNDING)
            compared += 1
    assert compared > 100


def test_lookahead_hands_out_the_step_before_running_the_lm(monkeypatch) -> None:
    """With lookahead, a step's first half runs no LM position (but a stream's first step
    does, for its position 0); the second half runs one after the Mimi encode."""
    engine = _engine(2, lookahead=True)
    calls: list[str] = []
    real_step, real_mimi = engine.lm.step, engine.mimi.step
    monkeypatch.setattr(engine.lm, "step", lambda *a, **k: calls.append("lm") or real_step(*a, **k))
    monkeypatch.setattr(
        engine.mimi, "step", lambda *a, **k: calls.append("mimi") or real_mimi(*a, **k)
    )
    pcm = np.zeros((2, FRAME), np.float32)
    both = np.ones(2, bool)
    engine.begin_step(pcm, both, both)
    assert calls == ["lm"]  # position 0 of the new streams
    engine.end_step()
    assert calls == ["lm", "mimi", "lm"]  # frame 0, then position 1
    calls.clear()
    out = engine.begin_step(pcm, both, ~both)
    assert calls == [] and all(t >= 0 for t in out.tokens)
    engine.end_step()
    assert calls == ["mimi", "lm"]


def test_only_the_slots_up_to_the_last_used_one_are_computed() -> None:
    """A stream in the last slot pauses while slot 0 keeps going: those steps compute slot 0
    alone (slot 3 reads token -1 and keeps its state bit for bit), and slot 3's tokens still
    equal a run alone."""
    frames = 30
    target = _audio(5, frames)
    alone = _run_alone(_engine(1), target)
    engine = _engine(4)
    rng = np.random.default_rng(3)
    tokens, sent, paused_steps = [], 0, 0
    for i in range(frames + 10):
        pcm = (0.3 * rng.standard_normal((4, FRAME))).astype(np.float32)
        paused = 8 <= i < 18
        active = np.array([True, False, False, not paused and sent < frames])
        reset = np.array([i == 0, False, False, i == 0])
        if active[3]:
            pcm[3] = target[sent * FRAME : (sent + 1) * FRAME]
        before = [t[:, 3].clone() if t.dim() == 5 else t[3].clone() for t in _state_tensors(engine)]
        out = engine.step(pcm, active, reset)
        if active[3]:
            tokens.append(out.tokens[3])
            sent += 1
        elif paused:
            paused_steps += 1
            assert out.tokens[1:] == [-1, -1, -1] and out.prs[3] == (0.0,) * len(out.prs[0])
            after = [t[:, 3] if t.dim() == 5 else t[3] for t in _state_tensors(engine)]
            assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert paused_steps == 10
    assert tokens == alone


@pytest.mark.parametrize("kv_cache", ["float", pytest.param("int8", marks=needs_kernel)])
def test_a_stream_moved_to_another_slot_goes_on_unchanged(kv_cache: str) -> None:
    """A stream runs in slot 3 (slot 0 busy with another), moves to slot 1 half way, between
    the two halves of one of its steps, and goes on there: its tokens equal a run alone."""
    frames = 24
    target = _audio(2, frames)
    alone_engine = _engine(1, kv_cache=kv_cache)
    alone = _run_alone(alone_engine, target)
    engine = _engine(4, kv_cache=kv_cache)
    rng = np.random.default_rng(9)
    tokens, slot = [], 3
    for i in range(frames):
        pcm = (0.3 * rng.standard_normal((4, FRAME))).astype(np.float32)
        pcm[slot] = target[i * FRAME : (i + 1) * FRAME]
        active = np.array([True, slot == 1, False, slot == 3])
        reset = np.array([i == 0, False, False, i == 0])
        if i == 12:  # the move comes between the two halves of the stream's step
            tokens.append(engine.begin_step(pcm, active, reset).tokens[slot])
            engine.move_slot(3, 1)
            slot = 1
        else:
            tokens.append(engine.step(pcm, active, reset).tokens[slot])
    assert tokens == alone and len(set(alone)) > 1
    for moved, ref in zip(_slot_state(engine, 1), _slot_state(alone_engine, 0), strict=True):
        if moved.is_floating_point():
            torch.testing.assert_close(moved, ref, atol=1e-5, rtol=0)
        elif moved.dtype == torch.int8:  # rows rounded from floats equal within 1e-5
            assert (moved.int() - ref.int()).abs().max() <= 1
        else:
            assert torch.equal(moved, ref)
    with pytest.raises(ValueError, match="slot 4 out of range for 4 slots"):
        engine.move_slot(0, 4)


def test_alignment_step_t_sees_frame_t_minus_1() -> None:
    """The text predicted at step t depends on frames 0..t-1 only (spec §2.8)."""
    a = _audio(1, 12)
    b = a.copy()
    b[8 * FRAME :] = _audio(2, 4)  # frames 8.. differ
    ta = _run_alone(_engine(1), a)
    tb = _run_alone(_engine(1), b)
    assert ta[:9] == tb[:9]  # step 8 saw frames 0..7 only
    # and the LM inputs at step 0 are the start tokens: the first token does not depend on audio
    tc = _run_alone(_engine(1), _audio(3, 12))
    assert tc[0] == ta[0]


def test_begin_step_returns_before_the_mimi_half_and_copies_its_inputs() -> None:
    """``begin_step`` gives the step's tokens with the frame not yet encoded; ``end_step``
    (or the next ``begin_step``) encodes it, from copies: the caller may reuse its arrays."""
    audio = _audio(6, 10)
    ref, engine = _engine(2), _engine(2)
    pcm = np.zeros((2, FRAME), np.float32)
    for i in range(10):
        pcm[0] = audio[i * FRAME : (i + 1) * FRAME]
        active, reset = np.array([True, False]), np.array([i == 0, False])
        before = ref.state.prev_codes.clone()  # the codes of the frame before
        expected = ref.step(pcm, active, reset)  # both halves at once
        out = engine.begin_step(pcm, active, reset)
        assert out == expected
        assert torch.equal(engine.state.prev_codes, before)  # this frame not encoded yet
        pcm[:], active[:], reset[:] = 7.0, True, True  # reused by the caller at once
        if i % 2:  # the other steps are finished by the next begin_step
            engine.end_step()
            assert torch.equal(engine.state.prev_codes, ref.state.prev_codes)
            engine.end_step()  # nothing left: no effect
        pcm[:] = 0.0
    engine.end_step()
    assert all(
        torch.equal(a, b) for a, b in zip(_state_tensors(engine), _state_tensors(ref), strict=True)
    )


def test_long_stream_constant_memory_and_teacher_forcing() -> None:
    """2,000 steps with context 64: no state grows, and the streamed tokens equal a teacher-forced
    windowed forward over the same codes and tokens."""
    engine = _engine(1, context=64)
    steps = 2000
    audio = _audio(4, steps)
    state_ptrs = {id(t): t.data_ptr() for t in _state_tensors(engine)}
    codes, tokens = [], []
    for i in range(steps):
        frame = audio[i * FRAME : (i + 1) * FRAME]
        out = engine.step(frame[None], np.ones(1, bool), np.array([i == 0]))
        tokens.append(out.tokens[0])
        codes.append(engine.state.prev_codes.clone())  # the codes of frame i, fed at step i+1
    assert {id(t): t.data_ptr() for t in _state_tensors(engine)} == state_ptrs
    lm = engine.lm
    text = torch.tensor(tokens)[None]
    audio_codes = torch.cat(codes)[None].transpose(1, 2)  # [1, K, T]
    text_in, audio_in = lm.shift_inputs(text, audio_codes)
    with torch.no_grad():
        full = lm.forward_sequence(text_in, audio_in)
    assert full.logits.argmax(-1)[0].tolist() == tokens


def _slot_state(engine: Engine, slot: int) -> list[torch.Tensor]:
    """Every per-slot buffer of one slot."""
    s = engine.state
    caches = (s.lm, s.mimi.kv)
    scales = [
        t[:, slot]
        for t in (getattr(s.lm, n, None) for n in ("key_scales", "value_scales"))
        if t is not None
    ]
    return [
        *(t[:, slot] for kv in caches for t in (kv.keys, kv.values)),
        *scales,
        *(t[slot] for kv in caches for t in (kv.key_positions, kv.positions)),
        *(t[slot] for t in (*s.mimi.conv_buffers, s.mimi.downsample_buffer, s.mimi.first)),
        s.prev_codes[slot],
        s.prev_text[slot],
    ]


def _state_tensors(engine: Engine) -> list[torch.Tensor]:
    s = engine.state
    return [
        s.lm.keys,
        s.lm.values,
        s.lm.key_positions,
        s.prev_codes,
        s.prev_text,
        *s.mimi.conv_buffers,
        s.mimi.kv.keys,
    ]


def test_temperature_sampling_is_seeded_and_varies() -> None:
    model = random_model("tiny")
    audio = _audio(5, 20)
    greedy = _run_alone(make_engine(model, 1), audio)
    hot1 = _run_alone(make_engine(model, 1, temperature=5.0, seed=1), audio)
    hot1b = _run_alone(make_engine(model, 1, temperature=5.0, seed=1), audio)
    assert hot1 == hot1b
    assert hot1 != greedy
    assert len(set(hot1)) > 3  # real samples, not one token (NaN noise gave token 0 always)
    # Gumbel-max at a temperature near 0 is the argmax: the noise is finite
    assert _run_alone(make_engine(model, 1, temperature=1e-4, seed=2), audio) == greedy


def test_step_rejects_wrong_shapes() -> None:
    engine = _engine(2)
    with pytest.raises(ValueError, match=r"\[2, 1920\]"):
        engine.step(np.zeros((2, 1000), np.float32), np.ones(2, bool), np.ones(2, bool))


@pytest.mark.reference
def test_engine_tokens_equal_a_reference_decoding(tmp_path) -> None:
    """Reference Mimi + reference LM (same weights, saved in the official layout and loaded by
    us), decoded greedily with the §2.8 alignment: every token equals the engine's, and so do
    the words built from them."""
    pytest.importorskip("moshi")
    from reference import official_tensors, randomize_reference_mimi, reference_lm, reference_mimi

    from dsm_stt.engine.words import WordAssembler
    from dsm_stt.model.checkpoint import load_model
    from dsm_stt.model.synthetic import write_checkpoint

    cfg = tiny_config(context=16)
    torch.manual_seed(0)
    ref_mimi = reference_mimi(cfg.mimi)
    randomize_reference_mimi(ref_mimi)
    ref_lm = reference_lm(cfg.lm)
    lm_tensors = official_tensors(ref_lm, torch.bfloat16)
    ref_lm.load_state_dict({k: v.float() for k, v in lm_tensors.items()})
    write_checkpoint(
        tmp_path / "ckpt",
        cfg,
        None,
        None,
        lm_tensors=lm_tensors,
        mimi_tensors=official_tensors(ref_mimi),
    )
    model = load_model(tmp_path / "ckpt")
    engine = make_engine(model, 2)

    frames = 60
    audio = np.stack([_audio(10, frames), _audio(11, frames)])
    ours = []
    for i in range(frames):
        out = engine.step(
            audio[:, i * FRAME : (i + 1) * FRAME], np.ones(2, bool), np.full(2, i == 0)
        )
        ours.append(out.tokens)

    expected = []
    with torch.no_grad(), ref_mimi.streaming(2), ref_lm.streaming(2):
        initial = ref_lm._get_initial_token().expand(2, -1, -1)  # [B, 1 + K, 1]
        prev = initial
        for i in range(frames):
            codes = ref_mimi.encode(torch.from_numpy(audio[:, None, i * FRAME : (i + 1) * FRAME]))
            _, logits = ref_lm.forward_text(prev)
            token = logits[:, 0, 0].float().argmax(-1)
            expected.append(token.tolist())
            prev = torch.cat([token[:, None, None], codes], dim=1)
    assert ours == expected
    assert len({t for step in expected for t in step}) > 3

    def words(tokens: list[int]) -> list:
        asm = WordAssembler(cfg.stt.asr_delay_in_tokens, model.tokenizer.decode)
        return [e for t in tokens for e in asm.push(t)] + asm.finish()

    for b in range(2):
        assert words([s[b] for s in ours]) == words([s[b] for s in expected])


def test_full_size_1b_architecture_builds_and_steps_on_cpu() -> None:
    """stt-1b-en_fr-candle with random weights (bf16, ~2 GB): two batched steps."""
    model = random_model("kyutai/stt-1b-en_fr-candle", dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.lm.parameters()) == 989_253_632
    engine = make_engine(model, 2, dtype=torch.bfloat16)
    for i in range(2):
        out = engine.step(
            _audio(i, 1).reshape(1, -1).repeat(2, 0), np.ones(2, bool), np.full(2, i == 0)
        )
        assert all(0 <= t < 8000 for t in out.tokens)
        assert all(len(p) == 4 and all(0.0 <= x <= 1.0 for x in p) for p in out.prs)
