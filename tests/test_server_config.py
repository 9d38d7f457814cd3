"""Server settings and moshi-server TOML files, as delayed-streams-modeling and Unmute ship them."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsm_stt.model.config import PRESETS
from dsm_stt.server.config import (
    ServerConfig,
    ServerConfigError,
    read_moshi_server_toml,
)

_TRANSFORMER = """
[modules.asr.model.transformer]
d_model = 2048
num_heads = {heads}
num_layers = {layers}
dim_feedforward = 8192
causal = true
norm_first = true
bias_ff = false
bias_attn = false
context = {context}
max_period = 100000
use_conv_block = false
use_conv_bias = true
gating = "silu"
norm = "RmsNorm"
positional_embedding = "Rope"
conv_layout = false
conv_kernel_size = 3
kv_repeat = 1
max_seq_len = 40960
"""

# delayed-streams-modeling configs/config-stt-en_fr-hf.toml (spec §1.4, §5.9)
DSM_EN_FR = (
    """
static_dir = "./static/"
log_dir = "$HOME/tmp/tts-logs"
instance_name = "tts"
authorized_ids = ["public_token"]

[modules.asr]
path = "/api/asr-streaming"
type = "BatchedAsr"
lm_model_file = "hf://kyutai/stt-1b-en_fr-candle/model.safetensors"
text_tokenizer_file = "hf://kyutai/stt-1b-en_fr-candle/tokenizer_en_fr_audio_8000.model"
audio_tokenizer_file = "hf://kyutai/stt-1b-en_fr-candle/mimi-pytorch-e351c8d8@125.safetensors"
asr_delay_in_tokens = 6
batch_size = 64
conditioning_learnt_padding = true
temperature = 0.0

[modules.asr.model]
audio_vocab_size = 2049
text_in_vocab_size = 8001
text_out_vocab_size = 8000
audio_codebooks = 32
"""
    + _TRANSFORMER.format(heads=16, layers=16, context=750)
    + """
[modules.asr.model.extra_heads]
num_heads = 4
dim = 6
"""
)

# delayed-streams-modeling configs/config-stt-en-hf.toml
DSM_EN = """
static_dir = "./static/"
log_dir = "$HOME/tmp/tts-logs"
instance_name = "tts"
authorized_ids = ["public_token"]

[modules.asr]
path = "/api/asr-streaming"
type = "BatchedAsr"
lm_model_file = "hf://kyutai/stt-2.6b-en-candle/model.safetensors"
text_tokenizer_file = "hf://kyutai/stt-2.6b-en-candle/tokenizer_en_audio_4000.model"
audio_tokenizer_file = "hf://kyutai/stt-2.6b-en-candle/mimi-pytorch-e351c8d8@125.safetensors"
asr_delay_in_tokens = 32
batch_size = 16
conditioning_learnt_padding = true
temperature = 0

[modules.asr.model]
audio_vocab_size = 2049
text_in_vocab_size = 4001
text_out_vocab_size = 4000
audio_codebooks = 32
""" + _TRANSFORMER.format(heads=32, layers=48, context=375)


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_dsm_en_fr_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    cfg = read_moshi_server_toml(write(tmp_path, DSM_EN_FR))
    assert cfg.api_keys == ("public_token",)
    assert cfg.path == "/api/asr-streaming"
    assert cfg.engine.batch_size == 64
    assert cfg.engine.temperature == 0.0
    assert cfg.static_dir == "./static/"
    files = cfg.model_files
    assert files is not None
    # hf:// references are kept as they are (downloaded when the model loads)
    assert files.lm == "hf://kyutai/stt-1b-en_fr-candle/model.safetensors"
    assert files.tokenizer.endswith("tokenizer_en_fr_audio_8000.model")
    assert files.mimi.endswith("mimi-pytorch-e351c8d8@125.safetensors")
    model = files.config
    expected = PRESETS["kyutai/stt-1b-en_fr-candle"]
    assert model.lm == expected.lm  # incl. the 5632 gated hidden size and 4 VAD heads
    assert model.stt.asr_delay_in_tokens == 6
    assert model.mimi == expected.mimi
    assert cfg.model_name == files.lm


def test_dsm_en_config(tmp_path: Path) -> None:
    cfg = read_moshi_server_toml(write(tmp_path, DSM_EN))
    assert cfg.engine.batch_size == 16
    assert cfg.model_files is not None
    model = cfg.model_files.config
    assert model.lm == PRESETS["kyutai/stt-2.6b-en"].lm
    assert model.lm.extra_heads_num_heads == 0
    assert model.stt.asr_delay_in_tokens == 32
    # what the TOML does not say comes from the matching published architecture
    assert model.stt.audio_silence_prefix_seconds == 1.0


def test_unmute_variant_and_env_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unmute's copy: 20 codebooks, temperature 0.25, a local path with $VAR, dtype override."""
    monkeypatch.setenv("MODELS", "/data/models")
    text = (
        DSM_EN_FR.replace("audio_codebooks = 32", "audio_codebooks = 20")
        .replace("temperature = 0.0", 'temperature = 0.25\ndtype_override = "f32"')
        .replace("hf://kyutai/stt-1b-en_fr-candle/model.safetensors", "$MODELS/lm.safetensors")
    )
    cfg = read_moshi_server_toml(write(tmp_path, text))
    assert cfg.model_files is not None
    assert cfg.model_files.lm == "/data/models/lm.safetensors"
    assert cfg.model_files.config.lm.n_q == 20
    assert cfg.model_files.config.mimi.num_codebooks == 20
    assert cfg.engine.temperature == 0.25
    assert cfg.engine.dtype == "float32"


def test_conditioning_delay_overrides_the_delay(tmp_path: Path) -> None:
    text = DSM_EN_FR.replace("asr_delay_in_tokens = 6", "conditioning_delay = 0.5")
    cfg = read_moshi_server_toml(write(tmp_path, text))
    assert cfg.model_files is not None
    assert cfg.model_files.config.stt.asr_delay_in_tokens == 7  # floor(0.5 * 12.5) + 1


def test_settings_absent_from_the_file_keep_the_base(tmp_path: Path) -> None:
    base = ServerConfig(port=9000, queue_timeout=3.0)
    text = DSM_EN_FR.replace('authorized_ids = ["public_token"]\n', "")
    cfg = read_moshi_server_toml(write(tmp_path, text), base)
    assert cfg.port == 9000 and cfg.queue_timeout == 3.0
    assert cfg.api_keys == ()


def test_other_modules_are_ignored_but_one_asr_module_is_needed(tmp_path: Path) -> None:
    tts = '\n[modules.tts_py]\ntype = "Py"\npath = "/api/tts_streaming"\nbatch_size = 2\n'
    cfg = read_moshi_server_toml(write(tmp_path, DSM_EN_FR + tts))
    assert cfg.path == "/api/asr-streaming"
    with pytest.raises(ServerConfigError, match=r"no ASR module.*tts_py \('Py'\)"):
        read_moshi_server_toml(write(tmp_path, tts, "tts.toml"))
    second = DSM_EN_FR[DSM_EN_FR.index("[modules.asr]") :].replace("modules.asr", "modules.asr2")
    with pytest.raises(ServerConfigError, match=r"2 ASR modules \(asr, asr2\)"):
        read_moshi_server_toml(write(tmp_path, DSM_EN_FR + second, "two.toml"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("batch_size = 64", 'batch_size = "64"'), r"modules\.asr\.batch_size must be an integer"),
        (("batch_size = 64", "batch_size = true"), r"batch_size must be an integer, got True"),
        (("batch_size = 64", "batch_size = 0"), "batch size must be >= 1"),
        (("temperature = 0.0", "temperature = -1.0"), "temperature must be >= 0"),
        (("temperature = 0.0", 'dtype_override = "f8"'), "dtype_override must be one of"),
        (('authorized_ids = ["public_token"]', "authorized_ids = [1]"), "authorized_ids"),
        (("text_out_vocab_size = 8000", "text_out_vocab_size = 7000"), "text_in_vocab_size"),
        (('gating = "silu"', 'gating = "gelu"'), "gating"),
        (("lm_model_file", "lm_file"), "missing lm_model_file"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    text = DSM_EN_FR.replace(*change)
    assert text != DSM_EN_FR
    with pytest.raises(ServerConfigError, match=message) as info:
        read_moshi_server_toml(write(tmp_path, text))
    assert str(tmp_path) in str(info.value)  # the file is named too


def test_unreadable_or_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ServerConfigError, match="cannot read config file"):
        read_moshi_server_toml(tmp_path / "missing.toml")
    with pytest.raises(ServerConfigError, match="not valid TOML"):
        read_moshi_server_toml(write(tmp_path, "[modules.asr\n"))
    with pytest.raises(ServerConfigError, match=r"no \[modules"):
        read_moshi_server_toml(write(tmp_path, 'static_dir = "x"\n'))


def test_server_config_validation() -> None:
    with pytest.raises(ValueError, match="path must start with '/'"):
        ServerConfig(path="api")
    with pytest.raises(ValueError, match="port"):
        ServerConfig(port=70000)
    with pytest.raises(ValueError, match="queue_timeout must be a finite number"):
        ServerConfig(queue_timeout=float("nan"))
    with pytest.raises(ValueError, match="api keys"):
        ServerConfig(api_keys=("",))
    assert ServerConfig().host == "127.0.0.1"


def test_serve_flags_override_the_file(tmp_path: Path) -> None:
    from dsm_stt.cli import _server_config, build_parser

    path = write(tmp_path, DSM_EN_FR)
    args = build_parser().parse_args(["serve", "--config", str(path)])
    cfg = _server_config(args)
    assert cfg.engine.batch_size == 64 and cfg.api_keys == ("public_token",)
    assert cfg.model_files is not None and cfg.host == "127.0.0.1" and cfg.port == 8080
    args = build_parser().parse_args(
        ["serve", "--config", str(path), "--batch-size", "3", "--api-key", "a", "--api-key", "b",
         "--queue-timeout", "2.5", "--port", "9999", "--temperature", "0.5"]
    )  # fmt: skip
    cfg = _server_config(args)
    assert (cfg.engine.batch_size, cfg.api_keys, cfg.queue_timeout, cfg.port) == (
        3,
        ("public_token", "a", "b"),  # --api-key adds to the file's authorized_ids
        2.5,
        9999,
    )
    assert cfg.engine.temperature == 0.5
    args = build_parser().parse_args(["serve", "--config", str(path), "--model", "some/repo"])
    cfg = _server_config(args)
    assert cfg.model == "some/repo" and cfg.model_files is None
    plain = _server_config(build_parser().parse_args(["serve", "--device", "cpu"]))
    assert plain.engine.batch_size == 8 and plain.model == "kyutai/stt-1b-en_fr-candle"


def test_serve_reports_missing_model_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dsm_stt.cli import main

    text = DSM_EN_FR.replace("hf://kyutai/stt-1b-en_fr-candle/", str(tmp_path / "nowhere") + "/")
    assert main(["serve", "--config", str(write(tmp_path, text)), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "file not found" in err and "nowhere" in err
    assert main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_serve_interrupted_while_loading_exits_at_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while the engine thread loads: a one-line message and exit status 130, without
    waiting for the load (the thread may be deep in a download)."""
    import concurrent.futures

    import dsm_stt.server.runner as runner_module
    from dsm_stt.cli import main

    class Interrupted(concurrent.futures.Future):
        def result(self, timeout: float | None = None) -> object:
            raise KeyboardInterrupt

    class Thread:
        def submit(self, fn: object, *args: object) -> concurrent.futures.Future:
            return Interrupted()

        def shutdown(self, wait: bool = True) -> None:
            pass

    def fake_exit(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(runner_module, "engine_thread", Thread)
    monkeypatch.setattr("os._exit", fake_exit)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--random-weights", "--model", "tiny", "--device", "cpu"])
    assert exit_info.value.code == 130
    assert "interrupted while loading the model" in capsys.readouterr().err
