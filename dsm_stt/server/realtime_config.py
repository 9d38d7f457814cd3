"""What a Realtime transcription session is configured with, and how its input audio decodes.

Owns ``SessionConfig`` (the session as OpenAI's Realtime API describes it: input format,
transcription, turn detection, noise reduction, include), parsed once from the client's
``session.update`` (GA shape: ``session.audio.input.*``) or ``transcription_session.update``
(beta shape: flat ``input_audio_format`` and friends) and written back in either shape for
``session.created`` / ``session.updated``; ``RealtimeError`` (an ``error`` event's code,
message and param); and ``InputDecoder`` (the ``input_audio_buffer.append`` bytes of a format
→ 24 kHz float32 samples). The session itself lives in ``realtime.py``.

Fields the model cannot use are accepted and echoed without effect: ``transcription.language``
and ``prompt`` (the model finds the language itself and takes no prompt),
``noise_reduction``, ``include`` (no log probabilities), and ``create_response``,
``interrupt_response``, ``idle_timeout_ms`` of a turn detection (there are no responses).
Unknown fields are ignored. Turn detection runs on the model's VAD heads
(``engine/turns.py``), so it needs a model that has them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soxr

from ..engine.turns import EAGERNESS, TurnConfig

SAMPLE_RATE = 24000
TELEPHONY_RATE = 8000
PCM, PCMU, PCMA = "audio/pcm", "audio/pcmu", "audio/pcma"
# beta names of the formats
_BETA_FORMATS = {"pcm16": PCM, "g711_ulaw": PCMU, "g711_alaw": PCMA}
_FORMAT_RATES = {PCM: SAMPLE_RATE, PCMU: TELEPHONY_RATE, PCMA: TELEPHONY_RATE}
_NOISE_REDUCTION = ("near_field", "far_field")
_UNUSED_TURN_FIELDS = {  # accepted, echoed, no effect: they are about responses
    "create_response": bool,
    "interrupt_response": bool,
    "idle_timeout_ms": int,
}


class RealtimeError(ValueError):
    """A client event the session refuses: becomes an ``error`` event (the session goes on)."""

    def __init__(
        self,
        message: str,
        code: str = "invalid_value",
        param: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.kind = kind


# --- reading JSON values -----------------------------------------------------------------------

_JSON_TYPES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "an object",
    list: "an array",
}


def _expect(value: object, kinds: tuple[type, ...], param: str, nullable: bool = False) -> Any:
    """``value`` if it is one of ``kinds`` (ints count as numbers, booleans never do)."""
    if value is None and nullable:
        return None
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds) or (float in kinds and isinstance(value, int))
    if not ok:
        wanted = " or ".join(_JSON_TYPES[k] for k in kinds) + (" or null" if nullable else "")
        raise RealtimeError(
            f"Invalid type for '{param}': expected {wanted}, got {_json_name(value)}.",
            "invalid_type",
            param,
        )
    return value


def _json_name(value: object) -> str:
    if value is None:
        return "null"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _choice(value: object, choices: tuple[str, ...], param: str) -> str:
    _expect(value, (str,), param)
    if value not in choices:
        supported = ", ".join(f"'{c}'" for c in choices)
        raise RealtimeError(
            f"Invalid value: '{str(value)[:64]}'. Supported values are: {supported}.",
            "invalid_value",
            param,
        )
    return value  # type: ignore[return-value]


# --- the configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnDetection:
    """``turn_detection`` as the client set it (``server_vad`` or ``semantic_vad``)."""

    type: str = "server_vad"
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    eagerness: str = "auto"
    unused: tuple[tuple[str, object], ...] = ()  # create_response & co, echoed as given

    def turn_config(self) -> TurnConfig:
        """The detector settings on the model's heads (``engine/turns.py``)."""
        if self.type == "semantic_vad":
            return TurnConfig.semantic_vad(self.eagerness)
        return TurnConfig.server_vad(
            self.threshold, self.prefix_padding_ms, self.silence_duration_ms
        )

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"type": self.type}
        if self.type == "semantic_vad":
            out["eagerness"] = self.eagerness
        else:
            out["threshold"] = self.threshold
            out["prefix_padding_ms"] = self.prefix_padding_ms
            out["silence_duration_ms"] = self.silence_duration_ms
        out.update(self.unused)
        return out

    @classmethod
    def parse(cls, value: object, param: str) -> TurnDetection | None:
        if _expect(value, (dict,), param, nullable=True) is None:
            return None
        assert isinstance(value, dict)
        kind = _choice(
            value.get("type", "server_vad"), ("server_vad", "semantic_vad"), param + ".type"
        )
        unused = tuple(
            (key, _expect(value[key], (kinds,), f"{param}.{key}", nullable=True))
            for key, kinds in _UNUSED_TURN_FIELDS.items()
            if key in value
        )
        if kind == "semantic_vad":
            eagerness = value.get("eagerness")
            if eagerness is not None:
                _choice(eagerness, EAGERNESS, param + ".eagerness")
            return cls(type=kind, eagerness=eagerness or "auto", unused=unused)
        defaults = cls()
        threshold = _expect(value.get("threshold"), (float,), param + ".threshold", True)
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise RealtimeError(
                f"Invalid '{param}.threshold': {threshold} is not between 0.0 and 1.0.",
                "invalid_value",
                param + ".threshold",
            )
        ms = {}
        for key in ("prefix_padding_ms", "silence_duration_ms"):
            number = _expect(value.get(key), (int,), f"{param}.{key}", nullable=True)
            if number is not None and not 0 <= number <= 60_000:
                raise RealtimeError(
                    f"Invalid '{param}.{key}': {number} is not between 0 and 60000.",
                    "invalid_value",
                    f"{param}.{key}",
                )
            ms[key] = getattr(defaults, key) if number is None else number
        return cls(
            type=kind,
            threshold=defaults.threshold if threshold is None else float(threshold),
            unused=unused,
            **ms,
        )


@dataclass(frozen=True)
class SessionConfig:
    """A transcription session's settings. ``transcription`` holds ``model``, ``language``
    and ``prompt`` as the client gave them; ``noise_reduction`` and ``include`` are echoed."""

    format: str = PCM
    transcription: Mapping[str, str | None] = field(default_factory=dict)
    turn_detection: TurnDetection | None = None
    noise_reduction: Mapping[str, object] | None = None
    include: tuple[str, ...] | None = None

    @property
    def sample_rate(self) -> int:
        """The sample rate of the appended audio."""
        return _FORMAT_RATES[self.format]

    # -- reading updates -----------------------------------------------------------------------

    def update(self, session: object, beta: bool = False) -> SessionConfig:
        """This configuration with the fields ``session`` (a ``session.update``'s session, or
        with ``beta`` a ``transcription_session.update``'s) sets; ``RealtimeError`` names the
        first bad one."""
        _expect(session, (dict,), "session")
        assert isinstance(session, dict)
        return self._update_beta(session) if beta else self._update_ga(session)

    def _update_ga(self, session: dict) -> SessionConfig:
        kind = session.get("type", "transcription")
        if kind != "transcription":
            _expect(kind, (str,), "session.type")
            raise RealtimeError(
                f"Invalid value: '{str(kind)[:64]}'. This server runs transcription sessions "
                "only (connect with ?intent=transcription, session.type 'transcription').",
                "invalid_value",
                "session.type",
            )
        changes: dict[str, Any] = {}
        audio = _expect(session.get("audio"), (dict,), "session.audio", nullable=True) or {}
        audio_input = _expect(audio.get("input"), (dict,), "session.audio.input", nullable=True)
        audio_input = audio_input or {}
        where = "session.audio.input"
        if "format" in audio_input:
            changes["format"] = _parse_format(audio_input["format"], where + ".format")
        if "transcription" in audio_input:
            changes["transcription"] = _parse_transcription(
                audio_input["transcription"], where + ".transcription"
            )
        if "turn_detection" in audio_input:
            changes["turn_detection"] = TurnDetection.parse(
                audio_input["turn_detection"], where + ".turn_detection"
            )
        if "noise_reduction" in audio_input:
            changes["noise_reduction"] = _parse_noise_reduction(
                audio_input["noise_reduction"], where + ".noise_reduction"
            )
        if "include" in session:
            changes["include"] = _parse_include(session["include"], "session.include")
        return dataclasses.replace(self, **changes)

    def _update_beta(self, session: dict) -> SessionConfig:
        changes: dict[str, Any] = {}
        if "input_audio_format" in session:
            name = _choice(
                session["input_audio_format"], tuple(_BETA_FORMATS), "session.input_audio_format"
            )
            changes["format"] = _BETA_FORMATS[name]
        if "input_audio_transcription" in session:
            changes["transcription"] = _parse_transcription(
                session["input_audio_transcription"], "session.input_audio_transcription"
            )
        if "turn_detection" in session:
            changes["turn_detection"] = TurnDetection.parse(
                session["turn_detection"], "session.turn_detection"
            )
        if "input_audio_noise_reduction" in session:
            changes["noise_reduction"] = _parse_noise_reduction(
                session["input_audio_noise_reduction"], "session.input_audio_noise_reduction"
            )
        if "include" in session:
            changes["include"] = _parse_include(session["include"], "session.include")
        return dataclasses.replace(self, **changes)

    # -- describing ----------------------------------------------------------------------------

    def describe(self, session_id: str, beta: bool = False) -> dict[str, object]:
        """The session object of ``session.created`` / ``session.updated`` (GA shape), or with
        ``beta`` of ``transcription_session.created`` / ``.updated``."""
        turn = None if self.turn_detection is None else self.turn_detection.describe()
        noise = None if self.noise_reduction is None else dict(self.noise_reduction)
        include = None if self.include is None else list(self.include)
        transcription = dict(self.transcription)
        if beta:
            beta_name = {v: k for k, v in _BETA_FORMATS.items()}[self.format]
            return {
                "id": session_id,
                "object": "realtime.transcription_session",
                "input_audio_format": beta_name,
                "input_audio_transcription": transcription,
                "turn_detection": turn,
                "input_audio_noise_reduction": noise,
                "include": include,
            }
        audio_format: dict[str, object] = {"type": self.format}
        if self.format == PCM:
            audio_format["rate"] = SAMPLE_RATE
        return {
            "type": "transcription",
            "object": "realtime.transcription_session",
            "id": session_id,
            "audio": {
                "input": {
                    "format": audio_format,
                    "transcription": transcription,
                    "noise_reduction": noise,
                    "turn_detection": turn,
                }
            },
            "include": include,
        }


def _parse_format(value: object, param: str) -> str:
    _expect(value, (dict,), param)
    assert isinstance(value, dict)
    kind = _choice(value.get("type", PCM), (PCM, PCMU, PCMA), param + ".type")
    rate = value.get("rate")
    if rate is not None:
        _expect(rate, (int,), param + ".rate")
        if rate != _FORMAT_RATES[kind]:
            raise RealtimeError(
                f"Invalid value: {rate}. '{kind}' audio is {_FORMAT_RATES[kind]} Hz.",
                "invalid_value",
                param + ".rate",
            )
    return kind


def _parse_transcription(value: object, param: str) -> dict[str, str | None]:
    if _expect(value, (dict,), param, nullable=True) is None:
        return {}  # "off": this server transcribes anyway (that is what the session is for)
    assert isinstance(value, dict)
    out: dict[str, str | None] = {}
    for key in ("model", "language", "prompt"):
        if key in value:
            out[key] = _expect(value[key], (str,), f"{param}.{key}", nullable=True)
    return out


def _parse_noise_reduction(value: object, param: str) -> dict[str, object] | None:
    if _expect(value, (dict,), param, nullable=True) is None:
        return None
    assert isinstance(value, dict)
    out: dict[str, object] = {}
    if value.get("type") is not None:
        out["type"] = _choice(value["type"], _NOISE_REDUCTION, param + ".type")
    if value.get("strength") is not None:
        out["strength"] = _expect(value["strength"], (float,), param + ".strength")
    return out


def _parse_include(value: object, param: str) -> tuple[str, ...] | None:
    if _expect(value, (list,), param, nullable=True) is None:
        return None
    assert isinstance(value, list)
    return tuple(_expect(item, (str,), f"{param}[{i}]") for i, item in enumerate(value))


# --- input audio ---------------------------------------------------------------------------------


def _ulaw_table() -> np.ndarray:
    """G.711 μ-law byte → 16-bit linear sample (ITU-T G.711; the bytes are sent inverted)."""
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent, mantissa = (u >> 4) & 0x07, u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.float32)


def _alaw_table() -> np.ndarray:
    """G.711 A-law byte → 16-bit linear sample (even bits inverted on the wire)."""
    a = np.arange(256, dtype=np.int32) ^ 0x55
    exponent, mantissa = (a >> 4) & 0x07, a & 0x0F
    magnitude = np.where(
        exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0)
    )
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.float32)


G711_TABLES = {PCMU: _ulaw_table() / 32768, PCMA: _alaw_table() / 32768}


class InputDecoder:
    """``input_audio_buffer.append`` bytes of one format → float32 samples at 24 kHz.

    ``audio/pcm``: 16-bit little-endian; an odd byte at the end of a chunk waits for the next.
    ``audio/pcmu`` / ``audio/pcma``: G.711 at 8 kHz, expanded by table and resampled with soxr,
    which holds a few milliseconds back until ``close``.
    """

    def __init__(self, audio_format: str) -> None:
        self.format = audio_format
        self._odd = b""
        self._resampler: soxr.ResampleStream | None = None
        if audio_format != PCM:
            self._resampler = soxr.ResampleStream(
                TELEPHONY_RATE, SAMPLE_RATE, 1, dtype="float32", quality="HQ"
            )

    def feed(self, data: bytes) -> np.ndarray:
        if self.format == PCM:
            data = self._odd + data
            whole = len(data) - len(data) % 2
            self._odd = data[whole:]
            return np.frombuffer(data[:whole], dtype="<i2").astype(np.float32) / 32768
        assert self._resampler is not None
        samples = G711_TABLES[self.format][np.frombuffer(data, dtype=np.uint8)]
        return self._resampler.resample_chunk(samples)

    def close(self) -> np.ndarray:
        """What the decoder still holds (the resampler's tail); it starts over afterwards."""
        self._odd = b""
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        tail = self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._resampler.clear()
        return tail
