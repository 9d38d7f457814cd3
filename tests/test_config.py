from __future__ import annotations

import pytest

from dsm_stt.model.config import (
    PRESETS,
    ConfigError,
    MimiConfig,
    mimi_config_json,
    parse_config_json,
    parse_mimi_config_json,
    parse_moshi_server_model,
    preset,
)

# config.json of kyutai/stt-2.6b-en as published (spec §1.2)
STT_2B6_JSON = {
    "card": 2048,
    "n_q": 32,
    "dep_q": 0,
    "delays": [0] * 33,
    "dim": 2048,
    "text_card": 4000,
    "existing_text_padding_id": 3,
    "num_heads": 32,
    "num_layers": 48,
    "hidden_scale": 4.125,
    "causal": True,
    "layer_scale": None,
    "context": 375,
    "max_period": 100000.0,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_dim": 1024,
    "depformer_num_heads": 16,
    "depformer_num_layers": 6,
    "depformer_dim_feedforward": None,
    "depformer_multi_linear": True,
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "conditioners": {},
    "cross_attention": False,
    "model_id": {"sig": "dabcc802", "epoch": 50},
    "lm_gen_config": {"temp": 0.0, "temp_text": 0.0, "top_k": 250, "top_k_text": 50},
    "stt_config": {"audio_delay_seconds": 2.5, "audio_silence_prefix_seconds": 1.0},
    "model_type": "stt",
    "mimi_name": "mimi-pytorch-e351c8d8@125.safetensors",
    "tokenizer_name": "tokenizer_en_audio_4000.model",
}

STT_1B_CANDLE_JSON = {
    "dim": 2048,
    "num_layers": 16,
    "num_heads": 16,
    "hidden_scale": 4.125,
    "context": 750,
    "max_period": 100000.0,
    "n_q": 32,
    "card": 2048,
    "text_card": 8000,
    "existing_text_padding_id": 3,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_dim": 1024,
    "depformer_num_heads": 16,
    "depformer_num_layers": 6,
    "depformer_multi_linear": True,
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "delays": [0] * 33,
    "dep_q": 0,
    "causal": True,
    "layer_scale": None,
    "extra_heads_num_heads": 4,
    "extra_heads_dim": 6,
    "stt_config": {"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0},
    "model_type": "stt",
    "mimi_name": "mimi-pytorch-e351c8d8@125.safetensors",
    "tokenizer_name": "tokenizer_en_fr_audio_8000.model",
}


def test_published_configs_match_presets() -> None:
    assert parse_config_json(STT_2B6_JSON) == preset("kyutai/stt-2.6b-en")
    cfg = parse_config_json(STT_1B_CANDLE_JSON)
    assert cfg == preset("kyutai/stt-1b-en_fr-candle")
    assert cfg.lm.hidden_dim == 5632
    assert cfg.lm.head_dim == 128
    assert cfg.stt.asr_delay_in_tokens == 6
    assert preset("kyutai/stt-2.6b-en").stt.asr_delay_in_tokens == 32
    assert cfg.mimi.frame_size == 1920


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("dim", "2048"),
        ("num_heads", 0),
        ("num_heads", 3),
        ("gating", "gelu"),
        ("norm", "layer_norm"),
        ("dep_q", 8),
        ("delays", [1] * 33),
        ("context", -1),
        ("text_card", True),
        ("model_type", "moshi"),
        ("hidden_scale", -2.0),
        ("existing_text_padding_id", 9000),
    ],
)
def test_invalid_values_name_the_key(key: str, value: object) -> None:
    bad = dict(STT_1B_CANDLE_JSON, **{key: value})
    with pytest.raises(ConfigError) as info:
        parse_config_json(bad)
    message = str(info.value)
    expected_names = {
        "num_heads": ("num_heads", "dim"),
        "existing_text_padding_id": ("text_padding_id",),
    }.get(key, (key,))
    assert any(name in message for name in expected_names), message


def test_missing_keys_fall_back_to_the_preset() -> None:
    cfg = parse_config_json(
        {"stt_config": {"audio_delay_seconds": 2.5}}, base=preset("kyutai/stt-2.6b-en")
    )
    assert cfg.lm == preset("kyutai/stt-2.6b-en").lm
    assert cfg.stt.asr_delay_in_tokens == 32


def test_moshi_server_toml_sections_map_to_presets() -> None:
    model_1b = {
        "audio_vocab_size": 2049,
        "text_in_vocab_size": 8001,
        "text_out_vocab_size": 8000,
        "audio_codebooks": 32,
        "transformer": {
            "d_model": 2048,
            "num_heads": 16,
            "num_layers": 16,
            "dim_feedforward": 8192,
            "causal": True,
            "norm_first": True,
            "bias_ff": False,
            "bias_attn": False,
            "context": 750,
            "max_period": 100000,
            "use_conv_block": False,
            "use_conv_bias": True,
            "gating": "silu",
            "norm": "RmsNorm",
            "positional_embedding": "Rope",
            "conv_layout": False,
            "conv_kernel_size": 3,
            "kv_repeat": 1,
            "max_seq_len": 40960,
        },
        "extra_heads": {"num_heads": 4, "dim": 6},
    }
    cfg = parse_moshi_server_model(model_1b, asr_delay_in_tokens=6)
    assert cfg.lm == preset("kyutai/stt-1b-en_fr-candle").lm
    assert cfg.stt.asr_delay_in_tokens == 6
    model_2b = dict(model_1b, text_in_vocab_size=4001, text_out_vocab_size=4000)
    model_2b.pop("extra_heads")
    model_2b["transformer"] = dict(
        model_1b["transformer"], num_heads=32, num_layers=48, context=375
    )
    assert parse_moshi_server_model(model_2b).lm == preset("kyutai/stt-2.6b-en").lm
    # Unmute runs the 1B with 20 codebooks: Mimi then emits 20 codes
    assert parse_moshi_server_model(dict(model_1b, audio_codebooks=20)).mimi.num_codebooks == 20
    with pytest.raises(ConfigError, match="text_in_vocab_size"):
        parse_moshi_server_model(dict(model_1b, text_in_vocab_size=8000))
    with pytest.raises(ConfigError, match=r"model\.transformer\.num_layers"):
        parse_moshi_server_model(
            dict(model_1b, transformer={**model_1b["transformer"], "num_layers": "16"})
        )


def test_mimi_json_round_trip_and_errors() -> None:
    tiny = MimiConfig(
        dimension=32,
        n_filters=4,
        num_heads=2,
        num_layers=2,
        dim_feedforward=64,
        context=10,
        quantizer_dim=16,
        quantizer_n_q=8,
        quantizer_bins=64,
        num_codebooks=8,
    )
    assert parse_mimi_config_json(mimi_config_json(tiny), 8) == tiny
    bad = mimi_config_json(tiny)
    bad["transformer"]["d_model"] = 64
    with pytest.raises(ConfigError, match="d_model"):
        parse_mimi_config_json(bad, 8)
    with pytest.raises(ConfigError, match="num_codebooks"):
        parse_mimi_config_json(mimi_config_json(tiny), 9)


def test_unknown_preset_lists_known() -> None:
    with pytest.raises(ConfigError, match="kyutai/stt-2.6b-en"):
        preset("kyutai/stt-7b")
    assert set(PRESETS) == {
        "kyutai/stt-1b-en_fr",
        "kyutai/stt-1b-en_fr-candle",
        "kyutai/stt-2.6b-en",
        "kyutai/stt-2.6b-en-candle",
    }
