"""What a checkpoint says about its architecture: MimiConfig, LMConfig, SttConfig, ModelConfig.

Owns parsing of a checkpoint's ``config.json`` (spec §1.2) and of a moshi-server TOML model
section (spec §1.4) into frozen dataclasses, validation with messages naming the offending key,
and the built-in presets of the four published repositories. It does not read files from the hub
(that is ``checkpoint.py``) and it knows nothing about operator settings (batch size, device).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key."""


# The audio format of every published Mimi, written once: what the server's wire, the
# decoders and the clients speak (a checkpoint's own ``MimiConfig`` may still say otherwise).
SAMPLE_RATE = 24000  # Hz, mono
FRAME_SIZE = 1920  # samples per model step: 80 ms at 24 kHz (spec §3.1)


@dataclass(frozen=True)
class MimiConfig:
    """Mimi encoder hyper-parameters (spec §1.3). Defaults are the published codec."""

    sample_rate: int = SAMPLE_RATE
    frame_rate: float = SAMPLE_RATE / FRAME_SIZE
    channels: int = 1
    # SEANet encoder
    dimension: int = 512
    n_filters: int = 64
    ratios: tuple[int, ...] = (8, 6, 5, 4)
    n_residual_layers: int = 1
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2
    # encoder transformer (d_model == dimension: no projections)
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    layer_scale: float = 0.01
    context: int = 250
    max_period: float = 10000.0
    # split residual vector quantizer
    quantizer_dim: int = 256
    quantizer_n_q: int = 32
    quantizer_bins: int = 2048
    # codebooks actually emitted (the LM's n_q)
    num_codebooks: int = 32

    @property
    def hop_length(self) -> int:
        """Samples per encoder-transformer position (960 for the published codec)."""
        return math.prod(self.ratios)

    @property
    def encoder_frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def downsample_stride(self) -> int:
        return round(self.encoder_frame_rate / self.frame_rate)

    @property
    def frame_size(self) -> int:
        """Samples per code frame (1920 = 80 ms at 24 kHz)."""
        return self.hop_length * self.downsample_stride

    def validate(self) -> MimiConfig:
        _positive(
            self,
            "sample_rate",
            "dimension",
            "n_filters",
            "num_heads",
            "num_layers",
            "dim_feedforward",
            "context",
            "quantizer_dim",
            "quantizer_n_q",
            "quantizer_bins",
            "num_codebooks",
        )
        if self.dimension % self.num_heads:
            raise ConfigError(
                f"mimi: 'dimension' ({self.dimension}) must be divisible by "
                f"'num_heads' ({self.num_heads})"
            )
        if not 1 <= self.num_codebooks <= self.quantizer_n_q:
            raise ConfigError(
                f"mimi: 'num_codebooks' ({self.num_codebooks}) must be in 1..{self.quantizer_n_q}"
            )
        if abs(self.encoder_frame_rate / self.frame_rate - self.downsample_stride) > 1e-9:
            raise ConfigError(
                "mimi: 'frame_rate' must divide the SEANet frame rate "
                f"({self.encoder_frame_rate} Hz)"
            )
        return self


@dataclass(frozen=True)
class LMConfig:
    """The DSM language model (spec §2). No depth transformer: STT has ``dep_q == 0``."""

    dim: int = 2048
    num_heads: int = 16
    num_layers: int = 16
    hidden_dim: int = 5632  # gated FFN width (each of the two branches)
    context: int = 750
    max_period: float = 100000.0
    text_card: int = 8000  # output classes; the start token is text_card
    card: int = 2048  # audio codebook size; the start/pad token is card
    n_q: int = 32
    text_padding_id: int = 3
    end_of_padding_id: int = 0
    extra_heads_num_heads: int = 0
    extra_heads_dim: int = 6
    norm_eps: float = 1e-8

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def text_start_id(self) -> int:
        return self.text_card

    @property
    def audio_pad_id(self) -> int:
        return self.card

    def validate(self) -> LMConfig:
        _positive(
            self,
            "dim",
            "num_heads",
            "num_layers",
            "hidden_dim",
            "context",
            "text_card",
            "card",
            "n_q",
            "extra_heads_dim",
        )
        if self.dim % self.num_heads:
            raise ConfigError(
                f"'dim' ({self.dim}) must be divisible by 'num_heads' ({self.num_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head dim dim/num_heads = {self.head_dim} must be even for RoPE")
        if self.extra_heads_num_heads < 0:
            raise ConfigError("'extra_heads_num_heads' must be >= 0")
        for key in ("text_padding_id", "end_of_padding_id"):
            if not 0 <= getattr(self, key) < self.text_card:
                raise ConfigError(f"'{key}' must be a valid text id (< text_card)")
        if self.max_period <= 0:
            raise ConfigError("'max_period' must be > 0")
        return self


# moshi-server's asr_delay_in_tokens for the published delays (spec §1.4); other delays
# fall back to floor(delay * frame_rate).
_KNOWN_ASR_DELAYS = {0.5: 6, 2.5: 32}


@dataclass(frozen=True)
class SttConfig:
    """Streaming-decoding facts carried by the checkpoint (spec §1.2 ``stt_config``)."""

    audio_delay_seconds: float = 0.5
    audio_silence_prefix_seconds: float = 0.0
    asr_delay_in_tokens: int = 6

    @staticmethod
    def delay_tokens_for(audio_delay_seconds: float, frame_rate: float = 12.5) -> int:
        known = _KNOWN_ASR_DELAYS.get(round(audio_delay_seconds, 6))
        return known if known is not None else max(1, math.floor(audio_delay_seconds * frame_rate))


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build and load one STT checkpoint."""

    lm: LMConfig = field(default_factory=LMConfig)
    mimi: MimiConfig = field(default_factory=MimiConfig)
    stt: SttConfig = field(default_factory=SttConfig)
    moshi_name: str = "model.safetensors"
    mimi_name: str = "mimi-pytorch-e351c8d8@125.safetensors"
    tokenizer_name: str = "tokenizer_en_fr_audio_8000.model"
    mimi_config_name: str | None = None  # optional Mimi JSON in the checkpoint (moshi layout)
    model_type: str = "stt"

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _positive(obj: Any, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"'{key}' must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------------------------
# config.json (PyTorch loader semantics)

_IGNORED_JSON_KEYS = {
    # provenance, sampling defaults, and options that have no tensors for STT checkpoints
    "model_id",
    "lm_gen_config",
    "tts_config",
    "lora_name",
    "card_out",
    "conditioners",
    "fuser",
    "cross_attention",
    "demux_second_stream",
    "text_card_out",
    "quantize",
    "bias_proj",
    "norm_emb",
    "layer_scale",
    "causal",
    "delays",
    "dep_q",
}


def _get(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    if key not in data or (data[key] is None and default is not None):
        return default
    value = data[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise ConfigError(f"config key '{key}' has invalid value {value!r}")
    return value


def ffn_hidden_dim(
    dim: int, hidden_scale: float | None = None, dim_feedforward: int | None = None
) -> int:
    """Gated FFN branch width, by the Python rule (hidden_scale) or the Rust rule (dim_ff)."""
    if dim_feedforward is None:
        dim_feedforward = int(hidden_scale * dim) if hidden_scale is not None else 4 * dim
    if dim_feedforward == 4 * dim:
        return 11 * dim // 4
    return 2 * dim_feedforward // 3


def parse_config_json(data: Mapping[str, Any], base: ModelConfig | None = None) -> ModelConfig:
    """Turn a checkpoint's ``config.json`` (already JSON-decoded) into a ModelConfig.

    Values absent from the JSON are taken from ``base`` (a preset) or from LMModel's defaults.
    """
    if not isinstance(data, Mapping):
        raise ConfigError("config.json must hold a JSON object")
    base = base or ModelConfig()
    lm0 = base.lm
    checks = {
        "gating": ("silu",),
        "norm": ("rms_norm_f32",),
        "positional_embedding": ("rope",),
    }
    for key, allowed in checks.items():
        if key in data and data[key] not in allowed:
            raise ConfigError(
                f"config key '{key}' = {data[key]!r} is not supported "
                f"(expected one of {list(allowed)})"
            )
    if data.get("causal", True) is not True:
        raise ConfigError("config key 'causal' must be true for streaming STT")
    if data.get("dep_q", 0) not in (0, None):
        raise ConfigError(
            f"config key 'dep_q' = {data['dep_q']!r}: only STT checkpoints "
            "(dep_q 0, no depth transformer) are supported"
        )
    delays = data.get("delays")
    if delays is not None and (not isinstance(delays, list) or any(d != 0 for d in delays)):
        raise ConfigError("config key 'delays' must be all zeros for STT checkpoints")
    if data.get("layer_scale") is not None:
        raise ConfigError("config key 'layer_scale' must be null for STT checkpoints")
    if data.get("cross_attention"):
        raise ConfigError("config key 'cross_attention' is not supported")
    model_type = _get(data, "model_type", str, base.model_type)
    if model_type != "stt":
        raise ConfigError(f"config key 'model_type' = {model_type!r}: expected 'stt'")

    dim = _get(data, "dim", int, lm0.dim)
    if "hidden_scale" in data:
        hidden_scale = _get(data, "hidden_scale", float, 4.125)
        if hidden_scale <= 0:
            raise ConfigError(f"config key 'hidden_scale' has invalid value {hidden_scale!r}")
        hidden_dim = ffn_hidden_dim(dim, hidden_scale=hidden_scale)
    elif "dim" in data:
        hidden_dim = ffn_hidden_dim(dim, hidden_scale=4.125)
    else:
        hidden_dim = lm0.hidden_dim
    lm = LMConfig(
        dim=dim,
        num_heads=_get(data, "num_heads", int, lm0.num_heads),
        num_layers=_get(data, "num_layers", int, lm0.num_layers),
        hidden_dim=hidden_dim,
        context=_get(data, "context", int, lm0.context),
        max_period=_get(data, "max_period", float, lm0.max_period),
        text_card=_get(data, "text_card", int, lm0.text_card),
        card=_get(data, "card", int, lm0.card),
        n_q=_get(data, "n_q", int, lm0.n_q),
        text_padding_id=_get(data, "existing_text_padding_id", int, lm0.text_padding_id),
        end_of_padding_id=_get(data, "existing_text_end_padding_id", int, lm0.end_of_padding_id),
        extra_heads_num_heads=_get(data, "extra_heads_num_heads", int, lm0.extra_heads_num_heads),
        extra_heads_dim=_get(data, "extra_heads_dim", int, lm0.extra_heads_dim),
    ).validate()
    stt_data = _get(data, "stt_config", dict, {})
    delay = _get(stt_data, "audio_delay_seconds", float, base.stt.audio_delay_seconds)
    prefix = _get(
        stt_data, "audio_silence_prefix_seconds", float, base.stt.audio_silence_prefix_seconds
    )
    if delay < 0 or prefix < 0:
        raise ConfigError("config key 'stt_config' must hold non-negative delays")
    if "asr_delay_in_tokens" in stt_data:
        delay_tokens = _get(stt_data, "asr_delay_in_tokens", int, 0)
    elif "audio_delay_seconds" in stt_data:
        delay_tokens = SttConfig.delay_tokens_for(delay)
    else:
        delay_tokens = base.stt.asr_delay_in_tokens
    stt = SttConfig(delay, prefix, delay_tokens)
    mimi = dataclasses.replace(base.mimi, num_codebooks=lm.n_q).validate()
    return ModelConfig(
        lm=lm,
        mimi=mimi,
        stt=stt,
        moshi_name=_get(data, "moshi_name", str, base.moshi_name),
        mimi_name=_get(data, "mimi_name", str, base.mimi_name),
        tokenizer_name=_get(data, "tokenizer_name", str, base.tokenizer_name),
        mimi_config_name=_get(data, "mimi_config_name", str, base.mimi_config_name),
        model_type=model_type,
    )


def parse_mimi_config_json(data: Mapping[str, Any], num_codebooks: int) -> MimiConfig:
    """A Mimi JSON in moshi's layout (``seanet``, ``transformer``, ``quantizer`` tables), as
    named by a checkpoint's ``mimi_config_name``."""
    if not isinstance(data, Mapping):
        raise ConfigError("Mimi config must hold a JSON object")
    d = MimiConfig()
    seanet = _get(data, "seanet", dict, {})
    tr = _get(data, "transformer", dict, {})
    q = _get(data, "quantizer", dict, {})
    dimension = _get(seanet, "dimension", int, d.dimension)
    if _get(tr, "d_model", int, dimension) != dimension:
        raise ConfigError("Mimi config: 'transformer.d_model' must equal 'seanet.dimension'")
    ratios = _get(seanet, "ratios", list, list(d.ratios))
    if not ratios or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ratios):
        raise ConfigError(f"Mimi config key 'seanet.ratios' has invalid value {ratios!r}")
    return MimiConfig(
        sample_rate=_get(data, "sample_rate", int, d.sample_rate),
        frame_rate=_get(data, "frame_rate", float, d.frame_rate),
        channels=_get(data, "channels", int, d.channels),
        dimension=dimension,
        n_filters=_get(seanet, "n_filters", int, d.n_filters),
        ratios=tuple(ratios),
        n_residual_layers=_get(seanet, "n_residual_layers", int, d.n_residual_layers),
        kernel_size=_get(seanet, "kernel_size", int, d.kernel_size),
        residual_kernel_size=_get(seanet, "residual_kernel_size", int, d.residual_kernel_size),
        last_kernel_size=_get(seanet, "last_kernel_size", int, d.last_kernel_size),
        dilation_base=_get(seanet, "dilation_base", int, d.dilation_base),
        compress=_get(seanet, "compress", int, d.compress),
        num_heads=_get(tr, "num_heads", int, d.num_heads),
        num_layers=_get(tr, "num_layers", int, d.num_layers),
        dim_feedforward=_get(tr, "dim_feedforward", int, d.dim_feedforward),
        layer_scale=_get(tr, "layer_scale", float, d.layer_scale),
        context=_get(tr, "context", int, d.context),
        max_period=_get(tr, "max_period", float, d.max_period),
        quantizer_dim=_get(q, "dimension", int, d.quantizer_dim),
        quantizer_n_q=_get(q, "n_q", int, d.quantizer_n_q),
        quantizer_bins=_get(q, "bins", int, d.quantizer_bins),
        num_codebooks=num_codebooks,
    ).validate()


def mimi_config_json(cfg: MimiConfig) -> dict[str, Any]:
    """The moshi-layout JSON of a Mimi config (inverse of ``parse_mimi_config_json``)."""
    return {
        "sample_rate": cfg.sample_rate,
        "channels": cfg.channels,
        "frame_rate": cfg.frame_rate,
        "seanet": {
            "dimension": cfg.dimension,
            "channels": cfg.channels,
            "causal": True,
            "n_filters": cfg.n_filters,
            "n_residual_layers": cfg.n_residual_layers,
            "activation": "ELU",
            "compress": cfg.compress,
            "dilation_base": cfg.dilation_base,
            "disable_norm_outer_blocks": 0,
            "kernel_size": cfg.kernel_size,
            "residual_kernel_size": cfg.residual_kernel_size,
            "last_kernel_size": cfg.last_kernel_size,
            "norm": "none",
            "pad_mode": "constant",
            "ratios": list(cfg.ratios),
            "true_skip": True,
        },
        "quantizer": {
            "dimension": cfg.quantizer_dim,
            "n_q": cfg.quantizer_n_q,
            "bins": cfg.quantizer_bins,
            "input_dimension": cfg.dimension,
            "output_dimension": cfg.dimension,
        },
        "transformer": {
            "d_model": cfg.dimension,
            "num_heads": cfg.num_heads,
            "num_layers": cfg.num_layers,
            "causal": True,
            "layer_scale": cfg.layer_scale,
            "context": cfg.context,
            "conv_layout": True,
            "max_period": cfg.max_period,
            "gating": "none",
            "norm": "layer_norm",
            "positional_embedding": "rope",
            "dim_feedforward": cfg.dim_feedforward,
            "input_dimension": cfg.dimension,
            "output_dimensions": [cfg.dimension],
        },
    }


# --------------------------------------------------------------------------------------------
# moshi-server TOML model section (Rust naming)


def parse_moshi_server_model(
    model: Mapping[str, Any],
    base: ModelConfig | None = None,
    asr_delay_in_tokens: int | None = None,
) -> ModelConfig:
    """Turn a ``[modules.X.model]`` table of a moshi-server TOML into a ModelConfig."""
    base = base or ModelConfig()
    if not isinstance(model, Mapping):
        raise ConfigError("moshi-server 'model' section must be a table")
    tr = model.get("transformer")
    if not isinstance(tr, Mapping):
        raise ConfigError("moshi-server config: missing table 'model.transformer'")

    def req(table: Mapping[str, Any], key: str, prefix: str) -> int:
        value = table.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"moshi-server config key '{prefix}{key}' must be an integer, got {value!r}"
            )
        return value

    audio_vocab = req(model, "audio_vocab_size", "model.")
    text_in = req(model, "text_in_vocab_size", "model.")
    text_out = req(model, "text_out_vocab_size", "model.")
    if text_in != text_out + 1:
        raise ConfigError(
            "moshi-server config: 'model.text_in_vocab_size' must be 'text_out_vocab_size' + 1"
        )
    n_q = req(model, "audio_codebooks", "model.")
    dim = req(tr, "d_model", "model.transformer.")
    dim_ff = tr.get("dim_feedforward", 4 * dim)
    for key, allowed in (
        ("gating", ("silu",)),
        ("norm", ("RmsNorm", "rms_norm_f32")),
        ("positional_embedding", ("Rope", "rope")),
    ):
        if key in tr and tr[key] not in allowed:
            raise ConfigError(
                f"moshi-server config key 'model.transformer.{key}' = {tr[key]!r} is not supported"
            )
    heads = model.get("extra_heads") or {}
    lm = LMConfig(
        dim=dim,
        num_heads=req(tr, "num_heads", "model.transformer."),
        num_layers=req(tr, "num_layers", "model.transformer."),
        hidden_dim=ffn_hidden_dim(dim, dim_feedforward=int(dim_ff)),
        context=req(tr, "context", "model.transformer."),
        max_period=float(tr.get("max_period", base.lm.max_period)),
        text_card=text_out,
        card=audio_vocab - 1,
        n_q=n_q,
        extra_heads_num_heads=int(heads.get("num_heads", 0)),
        extra_heads_dim=int(heads.get("dim", 6)),
    ).validate()
    stt = base.stt
    if asr_delay_in_tokens is not None:
        if asr_delay_in_tokens < 1:
            raise ConfigError("moshi-server config key 'asr_delay_in_tokens' must be >= 1")
        stt = dataclasses.replace(stt, asr_delay_in_tokens=asr_delay_in_tokens)
    mimi = dataclasses.replace(base.mimi, num_codebooks=n_q).validate()
    return dataclasses.replace(base, lm=lm, mimi=mimi, stt=stt)


# --------------------------------------------------------------------------------------------
# presets

_LM_1B = LMConfig(
    dim=2048, num_heads=16, num_layers=16, hidden_dim=5632, context=750, text_card=8000
)
_LM_2B6 = LMConfig(
    dim=2048, num_heads=32, num_layers=48, hidden_dim=5632, context=375, text_card=4000
)
_STT_1B = SttConfig(
    audio_delay_seconds=0.5, audio_silence_prefix_seconds=0.0, asr_delay_in_tokens=6
)
_STT_2B6 = SttConfig(
    audio_delay_seconds=2.5, audio_silence_prefix_seconds=1.0, asr_delay_in_tokens=32
)

PRESETS: dict[str, ModelConfig] = {
    "kyutai/stt-1b-en_fr": ModelConfig(
        lm=_LM_1B, stt=_STT_1B, tokenizer_name="tokenizer_en_fr_audio_8000.model"
    ),
    "kyutai/stt-1b-en_fr-candle": ModelConfig(
        lm=dataclasses.replace(_LM_1B, extra_heads_num_heads=4),
        stt=_STT_1B,
        tokenizer_name="tokenizer_en_fr_audio_8000.model",
    ),
    "kyutai/stt-2.6b-en": ModelConfig(
        lm=_LM_2B6, stt=_STT_2B6, tokenizer_name="tokenizer_en_audio_4000.model"
    ),
    "kyutai/stt-2.6b-en-candle": ModelConfig(
        lm=_LM_2B6, stt=_STT_2B6, tokenizer_name="tokenizer_en_audio_4000.model"
    ),
}
DEFAULT_MODEL = "kyutai/stt-1b-en_fr-candle"


def preset(name: str) -> ModelConfig:
    """The built-in config of a published repo id (``kyutai/stt-1b-en_fr`` …)."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(PRESETS)
        raise ConfigError(f"unknown model {name!r}; known architectures: {known}") from None
