"""Tests of dsm_stt.model.lm: parity with the reference LMModel, streaming == teacher forcing,
slot independence, published tensor inventory, and input errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from reference import official_tensors, reference_lm

from dsm_stt.model.config import LMConfig, ffn_hidden_dim, preset
from dsm_stt.model.lm import LM, LMInputError, LMOutput

TINY = LMConfig(
    dim=64,
    num_heads=4,
    num_layers=2,
    hidden_dim=ffn_hidden_dim(64, 4.125),
    context=16,
    max_period=100000.0,
    text_card=50,
    card=32,
    n_q=4,
    extra_heads_num_heads=4,
    extra_heads_dim=6,
)


def make_lm(cfg: LMConfig = TINY, seed: int = 0) -> LM:
    torch.manual_seed(seed)
    lm = LM(cfg).eval()
    with torch.no_grad():  # non-trivial norm gains, so that a mis-wired alpha shows
        for name, p in lm.named_parameters():
            if name.endswith("alpha"):
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return lm


def random_inputs(cfg: LMConfig, B: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, cfg.text_card, (B, T), generator=g)
    audio = torch.randint(0, cfg.card, (B, cfg.n_q, T), generator=g)
    return text, audio


def stream(lm: LM, text_in: torch.Tensor, audio_in: torch.Tensor) -> LMOutput:
    """Run ``step`` over already-aligned inputs [B, T] / [B, K, T]; outputs stacked on T."""
    B, T = text_in.shape
    cache = lm.allocate_state(B)
    active = torch.ones(B, dtype=torch.bool)
    outs = [lm.step(text_in[:, t], audio_in[:, :, t], cache, active) for t in range(T)]
    return LMOutput(torch.stack([o.logits for o in outs], 1), torch.stack([o.vad for o in outs], 1))


# --------------------------------------------------------------------------------------------
# structure


def official_lm_shapes(cfg: LMConfig) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of spec §1.5 (alpha as [D]), written out independently."""
    D = cfg.dim
    shapes = {"text_emb.weight": (cfg.text_card + 1, D)}
    shapes |= {f"emb.{k}.weight": (cfg.card + 1, D) for k in range(cfg.n_q)}
    for i in range(cfg.num_layers):
        p = f"transformer.layers.{i}."
        shapes |= {
            p + "self_attn.in_proj_weight": (3 * D, D),
            p + "self_attn.out_proj.weight": (D, D),
            p + "gating.linear_in.weight": (2 * cfg.hidden_dim, D),
            p + "gating.linear_out.weight": (D, cfg.hidden_dim),
            p + "norm1.alpha": (D,),
            p + "norm2.alpha": (D,),
        }
    shapes |= {"out_norm.alpha": (D,), "text_linear.weight": (cfg.text_card, D)}
    shapes |= {
        f"extra_heads.{i}.weight": (cfg.extra_heads_dim, D)
        for i in range(cfg.extra_heads_num_heads)
    }
    return shapes


def test_state_dict_is_the_official_layout() -> None:
    sd = LM(TINY).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == official_lm_shapes(TINY)


@pytest.mark.parametrize(
    ("name", "tensors", "params"),
    [
        ("kyutai/stt-1b-en_fr", 131, 989_204_480),
        ("kyutai/stt-1b-en_fr-candle", 135, 989_253_632),
        ("kyutai/stt-2.6b-en", 323, 2_617_118_720),
    ],
)
def test_full_size_inventory_matches_published_counts(name: str, tensors: int, params: int) -> None:
    cfg = preset(name).lm
    lm = LM(cfg, device="meta")  # shapes only, no memory
    sd = lm.state_dict()
    assert len(sd) == tensors
    assert sum(v.numel() for v in sd.values()) == params
    assert {k: tuple(v.shape) for k, v in sd.items()} == official_lm_shapes(cfg)


def test_random_init_is_not_degenerate() -> None:
    lm = make_lm()
    text, audio = lm.initial_tokens(1)
    out = lm.step(text, audio, lm.allocate_state(1), torch.ones(1, dtype=torch.bool))
    assert out.logits.dtype == torch.float32 and out.logits.shape == (1, TINY.text_card)
    assert 0.3 < out.logits.std().item() < 3.0
    assert out.vad.shape == (1, 4) and ((out.vad > 0) & (out.vad < 1)).all()


# --------------------------------------------------------------------------------------------
# alignment helpers, streaming == teacher forcing


def test_initial_tokens_and_shift_inputs() -> None:
    lm = make_lm()
    text0, audio0 = lm.initial_tokens(2)
    assert text0.tolist() == [TINY.text_start_id] * 2
    assert audio0.shape == (2, TINY.n_q) and (audio0 == TINY.audio_pad_id).all()
    text, audio = random_inputs(TINY, 2, 5, seed=1)
    text_in, audio_in = lm.shift_inputs(text, audio)
    assert torch.equal(text_in[:, 0], text0) and torch.equal(text_in[:, 1:], text[:, :-1])
    assert torch.equal(audio_in[:, :, 0], audio0) and torch.equal(
        audio_in[:, :, 1:], audio[:, :, :-1]
    )


def test_step_equals_forward_sequence_past_the_window() -> None:
    lm = make_lm()
    text_in, audio_in = lm.shift_inputs(*random_inputs(TINY, 2, 60, seed=2))
    streamed = stream(lm, text_in, audio_in)
    with torch.no_grad():
        full = lm.forward_sequence(text_in, audio_in)
    assert full.logits.shape == (2, 60, TINY.text_card) and full.vad.shape == (2, 60, 4)
    torch.testing.assert_close(streamed.logits, full.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(streamed.vad, full.vad, atol=1e-5, rtol=0)
    # the window matters: a model with a longer context disagrees after step 16
    wide = make_lm(dataclasses.replace(TINY, context=64))
    with torch.no_grad():
        wide_logits = wide.forward_sequence(text_in, audio_in).logits
    torch.testing.assert_close(wide_logits[:, :16], full.logits[:, :16], atol=1e-5, rtol=0)
    assert (wide_logits[:, 17:] - full.logits[:, 17:]).abs().max() > 1e-3


def test_bf16_weights_give_float32_outputs_close_to_fp32() -> None:
    lm = make_lm()
    lm16 = LM(TINY, dtype=torch.bfloat16)
    lm16.load_state_dict(lm.state_dict())
    text_in, audio_in = lm.shift_inputs(*random_inputs(TINY, 1, 20, seed=3))
    cache = lm16.allocate_state(1, dtype=torch.bfloat16)
    out = lm16.step(text_in[:, 0], audio_in[:, :, 0], cache, torch.ones(1, dtype=torch.bool))
    assert out.logits.dtype == torch.float32 and out.vad.dtype == torch.float32
    ref = stream(lm, text_in[:, :1], audio_in[:, :, :1])
    torch.testing.assert_close(out.logits, ref.logits[:, 0], atol=0.1, rtol=0.05)


def test_no_extra_heads_gives_empty_vad() -> None:
    lm = make_lm(dataclasses.replace(TINY, extra_heads_num_heads=0))
    text, audio = lm.initial_tokens(3)
    out = lm.step(text, audio, lm.allocate_state(3), torch.ones(3, dtype=torch.bool))
    assert out.vad.shape == (3, 0) and out.vad.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# slot independence


def test_slots_are_independent_of_idle_and_reset_neighbours() -> None:
    lm = make_lm()
    T, idle, reset_at = 45, range(10, 26), 30
    text, audio = lm.shift_inputs(*random_inputs(TINY, 3, T, seed=4))
    # slot 2's second stream, which starts from the initial tokens at step `reset_at`
    text2, audio2 = lm.shift_inputs(*random_inputs(TINY, 1, T - reset_at, seed=5))
    noise_text, noise_audio = random_inputs(TINY, 3, T, seed=6)

    cache = lm.allocate_state(3)
    got: list[list[torch.Tensor]] = [[], [], []]
    cursor = [0, 0, 0]  # next input index of each slot's stream
    for t in range(T):
        active = torch.tensor([True, t not in idle, True])
        if t == reset_at:
            cache.reset(torch.tensor([False, False, True]))
            cursor[2] = 0
        srcs = [
            (text[0], audio[0]),
            (text[1], audio[1]),
            (text[2], audio[2]) if t < reset_at else (text2[0], audio2[0]),
        ]
        step_text, step_audio = noise_text[:, t].clone(), noise_audio[:, :, t].clone()
        for b, (tx, au) in enumerate(srcs):
            if active[b]:
                step_text[b], step_audio[b] = tx[cursor[b]], au[:, cursor[b]]
        out = lm.step(step_text, step_audio, cache, active)
        for b in range(3):
            if active[b]:
                got[b].append(out.logits[b])
                cursor[b] += 1

    def alone(tx: torch.Tensor, au: torch.Tensor, n: int) -> torch.Tensor:
        return stream(lm, tx[None, :n], au[None, :, :n]).logits[0]

    expected = [
        alone(text[0], audio[0], T),
        alone(text[1], audio[1], T - len(idle)),
        torch.cat([alone(text[2], audio[2], reset_at), alone(text2[0], audio2[0], T - reset_at)]),
    ]
    for b in range(3):
        torch.testing.assert_close(torch.stack(got[b]), expected[b], atol=1e-5, rtol=0)
    assert cache.positions.tolist() == [T, T - len(idle), T - reset_at]


# --------------------------------------------------------------------------------------------
# errors


def _step_args(B: int = 2) -> dict:
    lm = make_lm()
    text, audio = lm.initial_tokens(B)
    return {
        "lm": lm,
        "text": text,
        "audio": audio,
        "cache": lm.allocate_state(B),
        "active": torch.ones(B, dtype=torch.bool),
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: {"text": a["text"].int()}, r"text: expected int64 \[B\]"),
        (lambda a: {"text": a["text"][:, None]}, r"text: expected int64 \[B\], got .* \[2, 1\]"),
        (lambda a: {"audio": a["audio"][:, :3]}, r"audio: expected shape \[2, 4\].*got \[2, 3\]"),
        (lambda a: {"audio": a["audio"][:1]}, r"audio: expected shape \[2, 4\]"),
        (lambda a: {"audio": a["audio"].float()}, r"audio: expected int64"),
        (lambda a: {"active": torch.ones(2, dtype=torch.long)}, r"active: expected bool \[2\]"),
        (lambda a: {"active": torch.ones(3, dtype=torch.bool)}, r"active: expected bool \[2\]"),
        (lambda a: {"cache": a["lm"].allocate_state(3)}, r"cache holds 3 slots, inputs have 2"),
        (lambda a: {"cache": a["lm"].allocate_state(2, dtype=torch.bfloat16)}, r"cache dtype"),
        (lambda a: {"text": torch.tensor([0, 51])}, r"text ids must be in 0\.\.50.*max 51"),
        (lambda a: {"audio": a["audio"] - 33}, r"audio ids must be in 0\.\.32.*min -1"),
        (lambda a: {"audio": a["audio"] + 1}, r"audio ids must be in 0\.\.32.*max 33"),
    ],
)
def test_step_rejects_bad_input(change, message: str) -> None:
    args = _step_args()
    args.update(change(args))
    lm = args.pop("lm")
    with pytest.raises(LMInputError, match=message):
        lm.step(**args)


def test_forward_sequence_and_allocation_errors() -> None:
    lm = make_lm()
    text, audio = random_inputs(TINY, 2, 5, seed=7)
    with pytest.raises(LMInputError, match=r"audio: expected shape \[2, 4, 5\]"):
        lm.forward_sequence(text, audio[:, :, :4])
    with pytest.raises(LMInputError, match=r"text: expected int64 \[B, T\]"):
        lm.forward_sequence(text[0], audio)
    with pytest.raises(LMInputError, match=r"text ids must be in 0\.\.50"):
        lm.forward_sequence(text + 100, audio)
    with pytest.raises(LMInputError, match="batch_size must be positive"):
        lm.allocate_state(0)
    assert issubclass(LMInputError, ValueError)


# --------------------------------------------------------------------------------------------
# parity with the reference implementation


@pytest.mark.reference
def test_streaming_parity_with_reference(tmp_path) -> None:
    pytest.importorskip("moshi")
    from safetensors.torch import save_file

    from dsm_stt.model import checkpoint

    cfg, B, T = TINY, 2, 210
    torch.manual_seed(10)
    ref = reference_lm(cfg)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("alpha"):
                p.mul_(1 + 0.2 * torch.randn_like(p))
    tensors = official_tensors(ref, torch.bfloat16)
    assert set(tensors) == set(official_lm_shapes(cfg))  # nothing to drop for dep_q == 0
    assert tensors["out_norm.alpha"].shape == (1, 1, cfg.dim)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    ref.load_state_dict({k: v.float() for k, v in tensors.items()})  # its own rename hook
    ours = checkpoint.load_lm(path, cfg, dtype=torch.float32)
    assert isinstance(ours, LM)

    g = torch.Generator().manual_seed(11)
    codes = torch.randint(0, cfg.card, (B, cfg.n_q, T), generator=g)  # frame t = codes[..., t]
    initial = ref._get_initial_token().expand(B, -1, -1)  # [B, 1 + K, 1] start ids
    text_prev, audio_prev = ours.initial_tokens(B)
    assert torch.equal(initial[:, 0, 0], text_prev) and torch.equal(initial[:, 1:, 0], audio_prev)
    cache = ours.allocate_state(B)
    active = torch.ones(B, dtype=torch.bool)
    tokens, ref_logits = [], []
    with torch.no_grad(), ref.streaming(B):
        for t in range(T):
            # §2.8: step t sees the token predicted at t-1 and audio frame t-1
            seq = torch.cat([text_prev[:, None], audio_prev], dim=1)[:, :, None]
            hidden, logits = ref.forward_text(seq)
            ref_step = logits[:, 0, 0].float()
            ref_vad = torch.stack(
                [h(hidden[:, 0]).softmax(-1)[:, 0] for h in ref.extra_heads], dim=1
            )
            out = ours.step(text_prev, audio_prev, cache, active)
            assert (out.logits - ref_step).abs().max() < 1e-4, f"logits differ at step {t}"
            assert (out.vad - ref_vad).abs().max() < 1e-4, f"VAD differs at step {t}"
            token = ref_step.argmax(-1)
            assert torch.equal(out.logits.argmax(-1), token), f"argmax differs at step {t}"
            tokens.append(token)
            ref_logits.append(ref_step)
            text_prev, audio_prev = token, codes[:, :, t]
    assert len(set(torch.stack(tokens).flatten().tolist())) > 5  # a varied token sequence

    # teacher forcing, the reference's training convention: [initial] ++ codes, minus the
    # last frame; the output at t predicts frame t's text, i.e. what streaming produced.
    with torch.no_grad():
        full = torch.cat([torch.stack(tokens, 1)[:, None], codes], dim=1)  # [B, 1 + K, T]
        _, tf_logits = ref.forward_text(torch.cat([initial, full], dim=2)[:, :, :-1])
        ours_tf = ours.forward_sequence(*ours.shift_inputs(full[:, 0], full[:, 1:]))
    torch.testing.assert_close(
        tf_logits[:, 0].float(), torch.stack(ref_logits, 1), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(ours_tf.logits, torch.stack(ref_logits, 1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("hours", [0, 3, 24])
def test_rotary_angles_stay_exact_for_hours(hours: int) -> None:
    """A session's positions grow without bound (12.5 per second for the LM, 25 for Mimi's
    transformer): RoPE's cos / sin at the position of hour 3 and hour 24 are as exact as at
    hour 0 (float64 ground truth; float32 results are within a few 1e-7 of it)."""
    from dsm_stt.model.layers import rope_rotation

    head_dim, period = 128, 10_000.0
    for rate in (12.5, 25.0):
        start = round(hours * 3600 * rate)
        positions = torch.arange(start, start + 8)[None]
        cos, sin = rope_rotation(positions, head_dim, period)
        # the float32 frequencies the model uses, as exact float64 values
        ds = torch.arange(head_dim // 2, dtype=torch.float32)
        freqs = torch.exp(ds * (-math.log(period) * 2 / head_dim)).double()
        exact = positions.double()[0, :, None] * freqs
        assert (cos[0, 0].double() - torch.cos(exact)).abs().max() < 1e-6
        assert (sin[0, 0].double() - torch.sin(exact)).abs().max() < 1e-6
