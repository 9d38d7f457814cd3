"""The WebSocket message codec, wire-compatible with moshi-server's ASR protocol (spec §5.2).

Owns the message vocabulary of both directions, its MessagePack encoding, and strict validation of
what clients send. It does not own what the messages *do* (the session and the scheduler do) and
it never touches asyncio or tensors; audio comes out as a NumPy float32 array.

Wire format: one MessagePack **map** per binary WebSocket frame, with a string key ``"type"``
naming the variant and the variant's fields as string keys (serde's internally tagged enums,
struct-as-map). Unknown extra keys are ignored, as serde does. Float widths follow moshi-server:
``Word.start_time`` and ``EndWord.stop_time`` are float64, ``Step.prs`` items are float32.

Client → server:

* ``Init`` — reset this connection's stream (state, buffered audio, pending markers and flushes,
  stream clock back to 0); the server answers ``Ready`` again. Clients need not send it: a new
  connection starts fresh. This is also how to restart without reconnecting.
* ``Audio{pcm}`` — 24 kHz mono samples, nominally in [-1, 1], as an array of numbers (float32 as
  Kyutai's clients send them, float64 and integers are accepted too). Every sample must be finite
  as a float32; finite values are passed on unchanged (no clipping, like moshi-server).
* ``OggOpus{data}`` — Ogg/Opus stream bytes, as MessagePack bin or as an array of ints 0..255.
* ``Marker{id}`` — int64; echoed as ``Marker{id}`` once all audio sent before it is transcribed.
  As with moshi-server, the client must keep sending audio (silence) after it (spec §4.5).
* ``Flush{id}`` (extension; ``id`` is an optional int64, default 0) — "everything I sent so far is
  final". The server zero-pads the last partial frame, feeds the model the silence it needs to
  catch up with the text delay (without waiting for real time), sends every Word (and EndWord)
  that audio produces, then answers ``Flushed{id}``. The inserted silence advances the stream
  clock like sent audio would, so later timestamps stay monotonic, and audio sent after a Flush
  continues the same stream. To finish a session: send ``Flush``, read until ``Flushed``, close.
  This replaces the "Marker, then seconds of silence" recipe, which keeps working unchanged.

Server → client: ``Ready``, ``Word{text, start_time}``, ``EndWord{stop_time}``,
``Step{step_idx, prs, buffered_pcm}``, ``Marker{id}``, ``Error{message}`` and, only in answer to
a Flush, ``Flushed{id}``. Clients that never send the extension never see it. Only in sessions
that asked for it (``?end_of_turn=1``, see ``websocket.py``), ``EndOfTurn{step, time,
probability, head}`` (extension): the model's VAD says the speaker finished a turn; ``step`` is
the ``Step.step_idx`` that decided it, ``time`` the seconds of the stream's audio heard by then
(the clock of ``Word.start_time``), ``probability`` the pause probability of VAD head ``head``.

``Word``, ``EndWord``, ``Step``, ``Marker`` and ``Flushed`` are the engine's event values
(:mod:`dsm_stt.engine.events`), ``EndOfTurn`` the turn detector's
(:mod:`dsm_stt.engine.turns`); ``Marker`` is the same value in both directions.

``Audio`` frames in the layout Kyutai's clients send (``type`` first, float32 samples) are read
into numpy directly, with no Python float per sample: the same samples the general decoder
gives, at a small fraction of its cost, which bounds how many sessions one event loop feeds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from dsm_stt.engine.events import EndWord, Flushed, Marker, Step, Word
from dsm_stt.engine.turns import EndOfTurn
from dsm_stt.model.config import SAMPLE_RATE

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_PCM_SAMPLES",
    "Audio",
    "ClientMessage",
    "EndOfTurn",
    "EndWord",
    "Error",
    "Flush",
    "Flushed",
    "Init",
    "Marker",
    "OggOpus",
    "ProtocolError",
    "Ready",
    "ServerMessage",
    "Step",
    "Word",
    "decode_client_message",
    "decode_server_message",
    "encode_client_message",
    "encode_server_message",
]

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
"""Default limit on one incoming frame; bounds the objects the unpacker can build."""
MAX_PCM_SAMPLES = 60 * SAMPLE_RATE
"""Default limit on one Audio message: a minute at 24 kHz (fits 8 MiB as float32)."""

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_NUMBER_TYPES = frozenset((float, int))  # exact types: bool is not a number on the wire


class ProtocolError(ValueError):
    """A frame is not a valid message; the text is meant to be sent back in an ``Error``."""


# --- client → server ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Init:
    """Reset the stream; the server answers ``Ready``."""


@dataclass(frozen=True, slots=True, eq=False)
class Audio:
    """PCM samples at 24 kHz, ``pcm`` float32 of shape [N] (``eq=False``: arrays have no ``==``)."""

    pcm: np.ndarray


@dataclass(frozen=True, slots=True)
class OggOpus:
    """A chunk of an Ogg/Opus stream."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Flush:
    """Extension: transcribe everything sent so far, then answer ``Flushed{id}``."""

    id: int = 0


ClientMessage = Init | Audio | OggOpus | Marker | Flush


# --- server → client ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    """The stream is (re)set and accepts audio."""


@dataclass(frozen=True, slots=True)
class Error:
    """Something went wrong; ``message`` says what."""

    message: str


ServerMessage = Ready | Word | EndWord | Step | Marker | Error | Flushed | EndOfTurn


# --- validation helpers ------------------------------------------------------------------------


_TYPE_NAMES: dict[type, str] = {
    type(None): "nil",
    bool: "boolean",
    int: "integer",
    float: "float",
    str: "string",
    bytes: "binary",
    list: "array",
    dict: "map",
}


def _wire_type(value: object) -> str:
    """The MessagePack type name of an unpacked value, for error messages."""
    return _TYPE_NAMES.get(type(value), "extension")


def _field(obj: dict[Any, Any], kind: str, name: str) -> Any:
    try:
        return obj[name]
    except KeyError:
        raise ProtocolError(f"{kind} message is missing the field {name!r}") from None


def _int64(value: object, where: str) -> int:
    if type(value) is not int:
        raise ProtocolError(f"{where} must be an integer, got {_wire_type(value)}")
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ProtocolError(f"{where} must fit in a signed 64-bit integer, got {value}")
    return value


def _uint(value: object, where: str) -> int:
    if type(value) is not int:
        raise ProtocolError(f"{where} must be a non-negative integer, got {_wire_type(value)}")
    if value < 0:
        raise ProtocolError(f"{where} must be a non-negative integer, got {value}")
    return value


def _number(value: object, where: str) -> float:
    if type(value) not in _NUMBER_TYPES:
        raise ProtocolError(f"{where} must be a number, got {_wire_type(value)}")
    return float(value)  # type: ignore[arg-type]


def _string(value: object, where: str) -> str:
    if type(value) is not str:
        raise ProtocolError(f"{where} must be a string, got {_wire_type(value)}")
    return value


def _check_numbers(items: object, where: str) -> list[Any]:
    """``items`` must be an array of numbers; checked per type, not per sample, in C."""
    if type(items) is not list:
        raise ProtocolError(f"{where} must be an array of numbers, got {_wire_type(items)}")
    kinds = set(map(type, items))
    if not kinds <= _NUMBER_TYPES:
        bad = sorted({_TYPE_NAMES.get(k, "extension") for k in kinds - _NUMBER_TYPES})
        raise ProtocolError(f"{where} must be an array of numbers, found {', '.join(bad)}")
    return items


def _unpack(data: bytes | bytearray | memoryview, max_message_bytes: int) -> tuple[str, dict]:
    """Unpack one frame into (type, map), rejecting anything that is not a tagged map."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"expected a binary frame, got {type(data).__name__}")
    size = memoryview(data).nbytes
    if size > max_message_bytes:
        raise ProtocolError(f"message of {size} bytes exceeds the limit of {max_message_bytes}")
    try:
        obj = msgpack.unpackb(data, raw=False)
    except msgpack.StackError:
        raise ProtocolError("not a valid MessagePack message: nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as exc:
        # Every other failure of the unpacker on untrusted bytes: truncation, trailing bytes,
        # bad UTF-8, non-string map keys, malformed extension values.
        raise ProtocolError(f"not a valid MessagePack message: {exc}") from None
    if type(obj) is not dict:
        raise ProtocolError(f"a message must be a map with a 'type' key, got {_wire_type(obj)}")
    if "type" not in obj:
        raise ProtocolError("a message must be a map with a 'type' key; 'type' is missing")
    return _string(obj["type"], "the message 'type'"), obj


# --- client messages ---------------------------------------------------------------------------


def _decode_audio(obj: dict[Any, Any], max_pcm_samples: int) -> Audio:
    pcm = _field(obj, "Audio", "pcm")
    if type(pcm) is list and len(pcm) > max_pcm_samples:
        raise ProtocolError(
            f"Audio.pcm has {len(pcm)} samples, more than the limit of {max_pcm_samples}"
        )
    _check_numbers(pcm, "Audio.pcm")
    with np.errstate(over="ignore"):  # float64 beyond float32 range → inf, rejected below
        samples = np.array(pcm, dtype=np.float32)
    finite = np.isfinite(samples)
    if not finite.all():
        i = int(np.argmin(finite))
        raise ProtocolError(
            f"Audio.pcm must hold finite float32 samples (nominally in [-1, 1]); "
            f"sample {i} is {pcm[i]!r}"
        )
    return Audio(samples)


def _decode_ogg_opus(obj: dict[Any, Any]) -> OggOpus:
    data = _field(obj, "OggOpus", "data")
    if type(data) is bytes:
        return OggOpus(data)
    message = "OggOpus.data must be binary or an array of integers in 0..255"
    if type(data) is not list or not set(map(type, data)) <= {int}:
        raise ProtocolError(f"{message}, got {_wire_type(data)}")
    try:
        return OggOpus(bytes(data))
    except ValueError:
        raise ProtocolError(f"{message}, found a value outside 0..255") from None


_CLIENT_TYPES = ("Init", "Audio", "OggOpus", "Marker", "Flush")

# {"type": "Audio", "pcm": [...]} as Kyutai's clients (and ours) pack it: a 2-entry map, "type"
# first, then the samples as an array of float32 (0xca and 4 big-endian bytes each).
_AUDIO_PREFIX = b"\x82\xa4type\xa5Audio\xa3pcm"
_FLOAT32_TAG = b"\xca"
_TAGGED_FLOAT32 = np.dtype([("tag", "u1"), ("value", ">f4")])


def _fast_audio(data: bytes, max_pcm_samples: int) -> Audio | None:
    """The common Audio frame read straight into numpy, without a Python float per sample;
    None for any other frame (the general decoder then decides). Accepts only frames the
    general decoder reads to the same samples: that exact layout, float32 samples, all
    finite, within the sample limit, nothing after the array."""
    p = len(_AUDIO_PREFIX)
    if len(data) <= p or not data.startswith(_AUDIO_PREFIX):
        return None
    tag = data[p]
    if 0x90 <= tag <= 0x9F:
        n, head = tag & 0x0F, 1
    elif tag == 0xDC:
        n, head = int.from_bytes(data[p + 1 : p + 3], "big"), 3
    elif tag == 0xDD:
        n, head = int.from_bytes(data[p + 1 : p + 5], "big"), 5
    else:
        return None
    start = p + head
    if n == 0 or n > max_pcm_samples or len(data) != start + 5 * n:
        return None
    if data[start::5] != _FLOAT32_TAG * n:  # every element a float32
        return None
    cells = np.frombuffer(data, _TAGGED_FLOAT32, count=n, offset=start)
    samples = cells["value"].astype(np.float32)
    if not np.isfinite(samples).all():
        return None
    return Audio(samples)


def decode_client_message(
    data: bytes | bytearray | memoryview,
    *,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    max_pcm_samples: int = MAX_PCM_SAMPLES,
) -> ClientMessage:
    """Decode one binary frame from a client; raise :class:`ProtocolError` if it is invalid."""
    if type(data) is bytes and len(data) <= max_message_bytes:
        audio = _fast_audio(data, max_pcm_samples)
        if audio is not None:
            return audio
    return _decode_general(data, max_message_bytes, max_pcm_samples)


def _decode_general(
    data: bytes | bytearray | memoryview, max_message_bytes: int, max_pcm_samples: int
) -> ClientMessage:
    kind, obj = _unpack(data, max_message_bytes)
    if kind == "Audio":  # by far the most frequent: tested first
        return _decode_audio(obj, max_pcm_samples)
    if kind == "Marker":
        return Marker(_int64(_field(obj, kind, "id"), "Marker.id"))
    if kind == "OggOpus":
        return _decode_ogg_opus(obj)
    if kind == "Init":
        return Init()
    if kind == "Flush":
        flush_id = obj.get("id")  # optional; nil (a Rust client's None) means absent
        return Flush(0 if flush_id is None else _int64(flush_id, "Flush.id"))
    raise ProtocolError(
        f"unknown message type {kind[:64]!r}; expected one of {', '.join(_CLIENT_TYPES)}"
    )


def encode_client_message(msg: ClientMessage) -> bytes:
    """Encode a client message as Kyutai's clients do (pcm as float32, data as bin)."""
    if isinstance(msg, Audio):
        pcm = np.asarray(msg.pcm, dtype=np.float32).reshape(-1).tolist()
        return msgpack.packb({"type": "Audio", "pcm": pcm}, use_single_float=True)
    if isinstance(msg, Marker | Flush):
        return msgpack.packb({"type": type(msg).__name__, "id": int(msg.id)})
    if isinstance(msg, OggOpus):
        return msgpack.packb({"type": "OggOpus", "data": bytes(msg.data)})
    if isinstance(msg, Init):
        return _INIT_BYTES
    raise TypeError(f"not a client message: {type(msg).__name__}")


_INIT_BYTES = msgpack.packb({"type": "Init"})


# --- server messages ---------------------------------------------------------------------------
# Encoders are called per model step per stream: plain dicts and one packb call each (~1 µs).


def _encode_word(msg: Word) -> bytes:
    return msgpack.packb({"type": "Word", "text": msg.text, "start_time": float(msg.start_time)})


def _encode_end_word(msg: EndWord) -> bytes:
    return msgpack.packb({"type": "EndWord", "stop_time": float(msg.stop_time)})


def _encode_step(msg: Step) -> bytes:
    # use_single_float applies to every float of the call; prs are the only floats in a Step.
    step = {
        "type": "Step",
        "step_idx": int(msg.step_idx),
        "prs": [float(p) for p in msg.prs],
        "buffered_pcm": int(msg.buffered_pcm),
    }
    return msgpack.packb(step, use_single_float=True)


def _encode_marker(msg: Marker) -> bytes:
    return msgpack.packb({"type": "Marker", "id": int(msg.id)})


def _encode_error(msg: Error) -> bytes:
    return msgpack.packb({"type": "Error", "message": str(msg.message)})


def _encode_flushed(msg: Flushed) -> bytes:
    return msgpack.packb({"type": "Flushed", "id": int(msg.id)})


def _encode_end_of_turn(msg: EndOfTurn) -> bytes:
    end = {
        "type": "EndOfTurn",
        "step": int(msg.step),
        "time": float(msg.time),
        "probability": float(msg.probability),
        "head": int(msg.head),
    }
    return msgpack.packb(end)


_READY_BYTES = msgpack.packb({"type": "Ready"})

_SERVER_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    Word: _encode_word,
    EndWord: _encode_end_word,
    Step: _encode_step,
    Marker: _encode_marker,
    Error: _encode_error,
    Flushed: _encode_flushed,
    EndOfTurn: _encode_end_of_turn,
    Ready: lambda _msg: _READY_BYTES,
}


def encode_server_message(msg: ServerMessage) -> bytes:
    """Encode one server message as moshi-server does (times float64, prs float32)."""
    try:
        encode = _SERVER_ENCODERS[type(msg)]
    except KeyError:
        raise TypeError(f"not a server message: {type(msg).__name__}") from None
    return encode(msg)


def decode_server_message(
    data: bytes | bytearray | memoryview, *, max_message_bytes: int = MAX_MESSAGE_BYTES
) -> ServerMessage:
    """Decode one frame from a server (for clients); raise :class:`ProtocolError` if invalid."""
    kind, obj = _unpack(data, max_message_bytes)
    if kind == "Word":
        text = _string(_field(obj, kind, "text"), "Word.text")
        return Word(text, _number(_field(obj, kind, "start_time"), "Word.start_time"))
    if kind == "EndWord":
        return EndWord(_number(_field(obj, kind, "stop_time"), "EndWord.stop_time"))
    if kind == "Step":
        prs = _check_numbers(_field(obj, kind, "prs"), "Step.prs")
        return Step(
            step_idx=_uint(_field(obj, kind, "step_idx"), "Step.step_idx"),
            prs=tuple(map(float, prs)),
            buffered_pcm=_uint(_field(obj, kind, "buffered_pcm"), "Step.buffered_pcm"),
        )
    if kind == "Marker":
        return Marker(_int64(_field(obj, kind, "id"), "Marker.id"))
    if kind == "Ready":
        return Ready()
    if kind == "Error":
        return Error(_string(_field(obj, kind, "message"), "Error.message"))
    if kind == "Flushed":
        return Flushed(_int64(_field(obj, kind, "id"), "Flushed.id"))
    if kind == "EndOfTurn":
        return EndOfTurn(
            step=_uint(_field(obj, kind, "step"), "EndOfTurn.step"),
            time=_number(_field(obj, kind, "time"), "EndOfTurn.time"),
            probability=_number(_field(obj, kind, "probability"), "EndOfTurn.probability"),
            head=_uint(_field(obj, kind, "head"), "EndOfTurn.head"),
        )
    known = "Ready, Word, EndWord, Step, Marker, Error, Flushed, EndOfTurn"
    raise ProtocolError(f"unknown message type {kind[:64]!r}; expected one of {known}")
