"""Tests for dsm_stt.server.protocol: wire compatibility, round-trips and malformed input."""

from __future__ import annotations

import math
import struct
import time

import msgpack
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dsm_stt.server.protocol import (
    MAX_PCM_SAMPLES,
    Audio,
    EndWord,
    Error,
    Flush,
    Flushed,
    Init,
    Marker,
    OggOpus,
    ProtocolError,
    Ready,
    Step,
    Word,
    decode_client_message,
    decode_server_message,
    encode_client_message,
    encode_server_message,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _pcm(n: int = 1920, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


# --- what real clients send --------------------------------------------------------------------


def test_decodes_audio_as_kyutai_scripts_pack_it() -> None:
    pcm = _pcm()
    data = msgpack.packb(
        {"type": "Audio", "pcm": pcm.tolist()}, use_bin_type=True, use_single_float=True
    )
    assert data.count(b"\xca") >= 1920  # the samples really are float32 on the wire
    msg = decode_client_message(data)
    assert isinstance(msg, Audio)
    assert msg.pcm.dtype == np.float32 and msg.pcm.shape == (1920,)
    np.testing.assert_array_equal(msg.pcm, pcm)


def test_decodes_audio_packed_as_float64_and_ints() -> None:
    pcm64 = np.random.default_rng(1).uniform(-1, 1, 1920)
    msg = decode_client_message(msgpack.packb({"type": "Audio", "pcm": pcm64.tolist()}))
    assert isinstance(msg, Audio)
    np.testing.assert_array_equal(msg.pcm, pcm64.astype(np.float32))
    msg = decode_client_message(msgpack.packb({"type": "Audio", "pcm": [0, 1, -1, 0.5]}))
    np.testing.assert_array_equal(msg.pcm, np.array([0, 1, -1, 0.5], dtype=np.float32))


def test_audio_keeps_finite_values_unclipped_and_accepts_empty() -> None:
    msg = decode_client_message(msgpack.packb({"type": "Audio", "pcm": [3.5, -7.0]}))
    np.testing.assert_array_equal(msg.pcm, np.array([3.5, -7.0], dtype=np.float32))
    msg = decode_client_message(msgpack.packb({"type": "Audio", "pcm": []}))
    assert isinstance(msg, Audio) and msg.pcm.shape == (0,) and msg.pcm.dtype == np.float32


def test_decodes_unmute_and_rust_client_shapes() -> None:
    # Unmute: a list of Python floats packed as float32; extra keys are ignored like serde does.
    data = msgpack.packb({"pcm": [0.25] * 4, "type": "Audio", "extra": 1}, use_single_float=True)
    np.testing.assert_array_equal(decode_client_message(data).pcm, np.full(4, 0.25, np.float32))
    # Rust rmp-serde writes bin-less old-style strings when not in human-readable mode.
    data = msgpack.packb({"type": "Marker", "id": 7}, use_bin_type=False)
    assert decode_client_message(data) == Marker(7)


def test_decodes_init_marker_and_ogg_opus() -> None:
    assert decode_client_message(msgpack.packb({"type": "Init"})) == Init()
    for marker_id in (0, -1, 2**40, INT64_MAX, INT64_MIN):
        assert decode_client_message(msgpack.packb({"type": "Marker", "id": marker_id})) == Marker(
            marker_id
        )
    page = bytes(range(256)) + b"OggS"
    assert decode_client_message(msgpack.packb({"type": "OggOpus", "data": page})) == OggOpus(page)
    as_ints = msgpack.packb({"type": "OggOpus", "data": list(page)})
    assert decode_client_message(as_ints) == OggOpus(page)


def test_flush_id_is_optional() -> None:
    assert decode_client_message(msgpack.packb({"type": "Flush"})) == Flush(0)
    assert decode_client_message(msgpack.packb({"type": "Flush", "id": None})) == Flush(0)
    assert decode_client_message(msgpack.packb({"type": "Flush", "id": 42})) == Flush(42)


def test_accepts_bytearray_and_memoryview() -> None:
    data = msgpack.packb({"type": "Marker", "id": 3})
    assert decode_client_message(bytearray(data)) == Marker(3)
    assert decode_client_message(memoryview(data)) == Marker(3)


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg", [Init(), Marker(INT64_MIN), Marker(12), Flush(), Flush(INT64_MAX), OggOpus(b"\x00OggS")]
)
def test_client_round_trip(msg: object) -> None:
    assert decode_client_message(encode_client_message(msg)) == msg


def test_client_audio_round_trip_is_exact_float32() -> None:
    pcm = _pcm(24_000, seed=3)
    data = encode_client_message(Audio(pcm))
    # Same bytes as Kyutai's scripts produce.
    assert data == msgpack.packb({"type": "Audio", "pcm": pcm.tolist()}, use_single_float=True)
    out = decode_client_message(data)
    assert isinstance(out, Audio)
    np.testing.assert_array_equal(out.pcm, pcm)


@pytest.mark.parametrize(
    "msg",
    [
        Ready(),
        Word("héllo,", 1.52),
        Word("", 0.0),
        EndWord(2.08),
        Step(step_idx=123456, prs=(0.5, 0.25, 1.0, 0.0), buffered_pcm=1920),
        Step(step_idx=0, prs=(), buffered_pcm=0),
        Marker(INT64_MAX),
        Marker(-5),
        Error("no free channels"),
        Flushed(9),
    ],
)
def test_server_round_trip(msg: object) -> None:
    assert decode_server_message(encode_server_message(msg)) == msg


def test_word_tokens_are_not_sent() -> None:
    data = encode_server_message(Word("hi", 0.5, tokens=(10, 11)))
    assert msgpack.unpackb(data) == {"type": "Word", "text": "hi", "start_time": 0.5}


# --- exact wire format of server messages ------------------------------------------------------


def test_server_messages_are_tagged_maps() -> None:
    cases = {
        Ready(): {"type": "Ready"},
        Word("a", 0.1): {"type": "Word", "text": "a", "start_time": 0.1},
        EndWord(0.3): {"type": "EndWord", "stop_time": 0.3},
        Marker(4): {"type": "Marker", "id": 4},
        Error("boom"): {"type": "Error", "message": "boom"},
        Flushed(2): {"type": "Flushed", "id": 2},
        Step(7, (0.5,), 10): {"type": "Step", "step_idx": 7, "prs": [0.5], "buffered_pcm": 10},
    }
    for msg, expected in cases.items():
        data = encode_server_message(msg)
        assert data[0] & 0xF0 == 0x80  # a fixmap
        assert msgpack.unpackb(data) == expected


def test_times_are_float64_and_prs_float32() -> None:
    data = encode_server_message(Word("x", 0.1))
    assert data.endswith(b"\xcb" + struct.pack(">d", 0.1))
    data = encode_server_message(EndWord(np.float32(2.5)))  # numpy scalars are converted
    assert data.endswith(b"\xcb" + struct.pack(">d", 2.5))
    prs = (0.1, 0.9, np.float32(0.5))
    data = encode_server_message(Step(np.int64(3), prs, 0))
    assert b"\xcb" not in data
    assert b"\x93" + b"".join(b"\xca" + struct.pack(">f", p) for p in prs) in data
    assert msgpack.unpackb(data)["step_idx"] == 3


def test_encode_rejects_non_messages() -> None:
    with pytest.raises(TypeError, match="not a server message: Init"):
        encode_server_message(Init())
    with pytest.raises(TypeError, match="not a client message: Ready"):
        encode_client_message(Ready())


# --- malformed input ---------------------------------------------------------------------------


def _packed(obj: object, **kwargs: object) -> bytes:
    return msgpack.packb(obj, **kwargs)


MALFORMED = [
    (b"", "not a valid MessagePack message"),
    (b"\xc1", "not a valid MessagePack message"),  # the never-used byte
    (_packed({"type": "Init"})[:-2], "not a valid MessagePack message"),  # truncated
    (_packed({"type": "Init"}) + b"\x00", "not a valid MessagePack message"),  # trailing data
    (b"\x81\xa4type\xa2\xff\xfe", "not a valid MessagePack message"),  # bad UTF-8
    (_packed({1: 2, "type": "Init"}), "not a valid MessagePack message"),  # non-string key
    (b"\x91" * 100_000 + b"\xc0", "not a valid MessagePack message: nested too deeply"),
    (b"\xdd\xff\xff\xff\xff", "not a valid MessagePack message"),  # array header lies
    (b"\xd6\xff\x00", "not a valid MessagePack message"),  # malformed timestamp extension
    (_packed(["Audio", []]), "must be a map with a 'type' key, got array"),
    (_packed(3), "must be a map with a 'type' key, got integer"),
    (_packed({"pcm": []}), "'type' is missing"),
    (_packed({"type": None}), "the message 'type' must be a string, got nil"),
    (_packed({"type": 1}), "the message 'type' must be a string, got integer"),
    (_packed({"type": b"Audio"}), "the message 'type' must be a string, got binary"),
    (_packed({"type": "Word"}), "unknown message type 'Word'; expected one of Init, Audio"),
    (_packed({"type": "Audio"}), "Audio message is missing the field 'pcm'"),
    (_packed({"type": "Audio", "pcm": b"\x00\x00"}), "Audio.pcm must be an array of numbers"),
    (_packed({"type": "Audio", "pcm": 0.5}), "Audio.pcm must be an array of numbers, got float"),
    (_packed({"type": "Audio", "pcm": [0.1, "0.2"]}), "must be an array of numbers, found string"),
    (_packed({"type": "Audio", "pcm": [0.1, True]}), "must be an array of numbers, found boolean"),
    (_packed({"type": "Audio", "pcm": [None, [1]]}), "numbers, found array, nil"),
    (_packed({"type": "Audio", "pcm": [0.0, math.nan]}), "sample 1 is nan"),
    (_packed({"type": "Audio", "pcm": [0.0, 0.0, -math.inf]}), "finite float32 samples"),
    (_packed({"type": "Audio", "pcm": [1e300]}), "sample 0 is 1e+300"),  # overflows float32
    (_packed({"type": "Marker"}), "Marker message is missing the field 'id'"),
    (_packed({"type": "Marker", "id": 1.0}), "Marker.id must be an integer, got float"),
    (_packed({"type": "Marker", "id": True}), "Marker.id must be an integer, got boolean"),
    (_packed({"type": "Marker", "id": "1"}), "Marker.id must be an integer, got string"),
    (_packed({"type": "Marker", "id": 2**63}), "signed 64-bit integer, got 9223372036854775808"),
    (_packed({"type": "Flush", "id": 2**64 - 1}), "Flush.id must fit in a signed 64-bit"),
    (_packed({"type": "Flush", "id": "x"}), "Flush.id must be an integer, got string"),
    (_packed({"type": "OggOpus"}), "OggOpus message is missing the field 'data'"),
    (_packed({"type": "OggOpus", "data": "OggS"}), "OggOpus.data must be binary or an array"),
    (_packed({"type": "OggOpus", "data": [1, 256]}), "found a value outside 0..255"),
    (_packed({"type": "OggOpus", "data": [1, -1]}), "found a value outside 0..255"),
    (_packed({"type": "OggOpus", "data": [1, 2.0]}), "got array"),
    (_packed({"type": "OggOpus", "data": [True]}), "OggOpus.data must be binary"),
    (_packed({"type": "Marker", "id": msgpack.ExtType(1, b"x")}), "got extension"),
]


@pytest.mark.parametrize(("data", "match"), MALFORMED)
def test_malformed_client_message(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_client_message(data)
    assert match in str(info.value)


def test_rejects_text_frames_and_oversized_messages() -> None:
    with pytest.raises(ProtocolError, match="expected a binary frame, got str"):
        decode_client_message('{"type": "Init"}')  # type: ignore[arg-type]
    data = msgpack.packb({"type": "Audio", "pcm": [0.0] * 1000})
    assert isinstance(decode_client_message(data, max_message_bytes=len(data)), Audio)
    with pytest.raises(ProtocolError, match=f"message of {len(data)} bytes exceeds the limit"):
        decode_client_message(data, max_message_bytes=len(data) - 1)
    with pytest.raises(ProtocolError, match="has 1000 samples, more than the limit of 999"):
        decode_client_message(data, max_pcm_samples=999)


def test_default_limits_admit_a_minute_of_float32_audio() -> None:
    data = encode_client_message(Audio(np.zeros(MAX_PCM_SAMPLES, dtype=np.float32)))
    assert decode_client_message(data).pcm.shape == (MAX_PCM_SAMPLES,)
    data = encode_client_message(Audio(np.zeros(MAX_PCM_SAMPLES + 1, dtype=np.float32)))
    with pytest.raises(ProtocolError, match="more than the limit"):
        decode_client_message(data)


def test_protocol_error_is_a_value_error() -> None:
    assert issubclass(ProtocolError, ValueError)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"type": "Word", "text": "a"}, "Word message is missing the field 'start_time'"),
        ({"type": "Word", "text": 1, "start_time": 0.0}, "Word.text must be a string"),
        ({"type": "EndWord", "stop_time": "1"}, "EndWord.stop_time must be a number"),
        ({"type": "Step", "step_idx": -1, "prs": [], "buffered_pcm": 0}, "non-negative"),
        ({"type": "Step", "step_idx": 0, "prs": [None], "buffered_pcm": 0}, "found nil"),
        ({"type": "Error"}, "Error message is missing the field 'message'"),
        ({"type": "Audio", "pcm": []}, "unknown message type 'Audio'"),
    ],
)
def test_malformed_server_message(obj: object, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_server_message(msgpack.packb(obj))


# --- fuzzing: nothing but ProtocolError escapes ------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(width=32)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.sampled_from(["Init", "Audio", "OggOpus", "Marker", "Flush", "type", "pcm", "id"])
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(st.sampled_from(["type", "pcm", "id", "data", "x"]), inner, max_size=4)
    ),
    max_leaves=20,
)
_messages = st.fixed_dictionaries(
    {"type": st.sampled_from(["Init", "Audio", "OggOpus", "Marker", "Flush", "Nope"]) | _scalars},
    optional={"pcm": _values, "id": _values, "data": _values},
)


def _decode_or_protocol_error(data: bytes) -> None:
    try:
        decode_client_message(data, max_message_bytes=4096, max_pcm_samples=16)
    except ProtocolError as exc:
        assert str(exc)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_or_protocol_error(data)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_messages, _values), st.booleans(), st.booleans())
def test_fuzz_random_msgpack_objects(obj: object, single: bool, bin_type: bool) -> None:
    try:
        data = msgpack.packb(obj, use_single_float=single, use_bin_type=bin_type)
    except OverflowError:  # a float64 beyond float32 range cannot be packed single
        assume(False)
    _decode_or_protocol_error(data)


@settings(max_examples=200, deadline=None)
@given(_messages, st.integers(min_value=0, max_value=40))
def test_fuzz_truncated_messages(obj: dict, cut: int) -> None:
    data = msgpack.packb(obj)
    _decode_or_protocol_error(data[: max(0, len(data) - cut)])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_corrupted_valid_messages(data: st.DataObject) -> None:
    valid = [
        encode_client_message(Audio(_pcm(8))),
        encode_client_message(Marker(2**40)),
        encode_client_message(OggOpus(b"OggS\x00\x02")),
        msgpack.packb({"type": "Audio", "pcm": [0.5, 1, -2.0]}),
    ]
    buf = bytearray(data.draw(st.sampled_from(valid)))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        buf[data.draw(st.integers(min_value=0, max_value=len(buf) - 1))] = data.draw(
            st.integers(min_value=0, max_value=255)
        )
    _decode_or_protocol_error(bytes(buf))


# --- cost --------------------------------------------------------------------------------------


def test_decoding_a_frame_is_cheap() -> None:
    data = encode_client_message(Audio(_pcm()))
    n = 200
    start = time.perf_counter()
    for _ in range(n):
        decode_client_message(data)
    per_message = (time.perf_counter() - start) / n
    assert per_message < 2e-3, f"{per_message * 1e6:.0f} µs per 1920-sample Audio message"
