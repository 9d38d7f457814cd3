"""Tests for dsm_stt.server.protocol: wire compatibility, round-trips and malformed input; and the
EndOfTurn extension end to end (a session that asks for it, the client that yields it)."""

from __future__ import annotations

import asyncio
import io
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import websockets
from engine_support import exact_config
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from server_support import (
    FRAME,
    SAMPLE_RATE,
    ThreadedServer,
    connect,
    pack,
    recv,
    recv_until,
    send_frames,
    threaded_server,
    write_wav,
)
from turn_support import turn_signal, write_turn_checkpoint

from dsm_stt.cli import main
from dsm_stt.client import LivePrinter, stream_audio
from dsm_stt.loading import load_engine
from dsm_stt.server import protocol
from dsm_stt.server.config import ServerConfig
from dsm_stt.server.protocol import (
    MAX_MESSAGE_BYTES,
    MAX_PCM_SAMPLES,
    Audio,
    ClientMessage,
    EndOfTurn,
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


def _audio_frame(values: np.ndarray, header: str, tail: bytes = b"") -> bytes:
    """``{"type": "Audio", "pcm": values}`` packed by hand: float32 samples (0xca each), the
    array's length as a fixarray, array16 or array32 header, then ``tail``."""
    n = len(values)
    head = {
        "fix": lambda: bytes([0x90 | n]) if n < 16 else b"",
        "16": lambda: b"\xdc" + n.to_bytes(2, "big"),
        "32": lambda: b"\xdd" + n.to_bytes(4, "big"),
    }[header]()
    if not head:
        raise ValueError(f"a fixarray holds at most 15 items, not {n}")
    cells = np.empty(n, dtype=[("tag", "u1"), ("value", ">f4")])
    cells["tag"], cells["value"] = 0xCA, values
    return b"\x82\xa4type\xa5Audio\xa3pcm" + head + cells.tobytes() + tail


def _outcome(decode, data: bytes) -> tuple[str, object]:
    try:
        msg = decode(data)
    except ProtocolError as exc:
        return "error", str(exc)
    if isinstance(msg, Audio):  # samples compared bit for bit (-0.0, subnormals)
        return "audio", (msg.pcm.dtype.str, msg.pcm.view(np.uint32).tolist())
    return "other", msg


def _general(data: bytes) -> ClientMessage:
    return protocol._decode_general(data, MAX_MESSAGE_BYTES, MAX_PCM_SAMPLES)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=40),
    st.sampled_from(["fix", "16", "32"]),
    st.sampled_from([b"", b"\x00", b"\xc0"]),
    st.one_of(
        st.none(),  # the header and the first samples often, any byte sometimes
        st.tuples(st.one_of(st.integers(0, 24), st.integers(min_value=0)), st.integers(0, 255)),
    ),
)
def test_the_fast_audio_path_decodes_what_the_general_decoder_does(
    bits: list[int], header: str, tail: bytes, poke: tuple[int, int] | None
) -> None:
    """Any bit pattern (NaN, infinities, -0.0, subnormals), any array header, bytes after the
    array, one byte changed anywhere: the decoder answers what msgpack and the checks answer."""
    assume(header != "fix" or len(bits) < 16)
    values = np.array(bits, dtype=np.uint32).view(np.float32)
    data = bytearray(_audio_frame(values, header, tail))
    if poke is not None:
        data[poke[0] % len(data)] = poke[1]
    assert _outcome(decode_client_message, bytes(data)) == _outcome(_general, bytes(data))


@pytest.mark.parametrize("header", ["fix", "16", "32"])
def test_every_byte_of_an_audio_frame_changed_decodes_as_the_general_decoder_does(
    header: str,
) -> None:
    frame = _audio_frame(np.array([0.5, -0.0, 1e-40], dtype=np.float32), header)
    for i in range(len(frame)):
        for value in {0x00, 0xFF, (frame[i] + 1) % 256, 0xCB, 0x7F}:
            data = frame[:i] + bytes([value]) + frame[i + 1 :]
            assert _outcome(decode_client_message, data) == _outcome(_general, data), (i, value)
    for cut in range(len(frame)):  # truncated anywhere
        data = frame[:cut]
        assert _outcome(decode_client_message, data) == _outcome(_general, data), cut


def test_audio_frames_as_clients_pack_them_skip_msgpack(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kyutai's clients' frames (1920 samples: array16; a few: fixarray) take the direct
    path, to the same samples; anything else still goes through msgpack."""
    frames = [
        encode_client_message(Audio(_pcm())),
        msgpack.packb({"type": "Audio", "pcm": _pcm(8).tolist()}, use_single_float=True),
        _audio_frame(_pcm(70000), "32"),
    ]
    expected = [_outcome(_general, f) for f in frames]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("msgpack was used")

    monkeypatch.setattr(protocol.msgpack, "unpackb", refuse)
    assert [_outcome(decode_client_message, f) for f in frames] == expected
    assert all(kind == "audio" for kind, _ in expected)
    with pytest.raises(AssertionError, match="msgpack was used"):  # float64 samples
        decode_client_message(msgpack.packb({"type": "Audio", "pcm": [0.5, 0.25]}))


# --- the EndOfTurn extension -------------------------------------------------------------------


def test_end_of_turn_round_trip_and_wire_format() -> None:
    msg = EndOfTurn(step=4321, time=3.36, probability=0.9162, head=2)
    data = encode_server_message(msg)
    assert decode_server_message(data) == msg
    assert msgpack.unpackb(data) == {
        "type": "EndOfTurn",
        "step": 4321,
        "time": 3.36,
        "probability": 0.9162,
        "head": 2,
    }
    assert data.count(b"\xcb") == 2  # time and probability are float64


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        (
            {"type": "EndOfTurn", "step": 1, "time": 0.1, "head": 2},
            "missing the field 'probability'",
        ),
        (
            {"type": "EndOfTurn", "step": -1, "time": 0.1, "probability": 1, "head": 2},
            "non-negative",
        ),
        ({"type": "EndOfTurn", "step": 1, "time": "x", "probability": 1, "head": 2}, "a number"),
    ],
)
def test_malformed_end_of_turn(obj: object, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_server_message(msgpack.packb(obj))


@pytest.fixture(scope="module")
def turn_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    """A server on a checkpoint whose VAD heads hear silence (``turn_support``)."""
    checkpoint = write_turn_checkpoint(tmp_path_factory.mktemp("turns") / "ckpt")
    engine = load_engine(str(checkpoint), exact_config(batch_size=2))
    with threaded_server(ServerConfig(), engine) as server:
        yield server


TURNS = turn_signal([("speech", 3.0), ("silence", 3.5), ("speech", 3.0), ("silence", 2.0)])
TURN_ENDS = (38 * FRAME / SAMPLE_RATE, 120 * FRAME / SAMPLE_RATE)  # where the speech stops


async def _session(url: str, pcm: np.ndarray) -> list[dict]:
    async with await connect(url) as ws:
        assert (await recv(ws))["type"] == "Ready"
        await send_frames(ws, pcm)
        await ws.send(pack({"type": "Flush", "id": 1}))
        return await recv_until(ws, "Flushed")


def test_end_of_turn_follows_the_step_that_ends_each_turn(turn_server: ThreadedServer) -> None:
    url = turn_server.url + "?end_of_turn=1&end_of_turn_threshold=0.7"
    msgs = asyncio.run(_session(url, TURNS))
    ends = [(i, m) for i, m in enumerate(msgs) if m["type"] == "EndOfTurn"]
    assert len(ends) == 2  # one per turn: speech, then the pause
    steps_seen = 0
    for i, msg in enumerate(msgs):
        steps_seen += msg["type"] == "Step"
        if msg["type"] != "EndOfTurn":
            continue
        step = msgs[i - 1]  # right after the Step that decided it
        assert step["type"] == "Step" and step["step_idx"] == msg["step"]
        assert msg["head"] == 2 and msg["probability"] == pytest.approx(step["prs"][2])
        assert msg["probability"] >= 0.7
        assert msg["time"] == pytest.approx(steps_seen * FRAME / SAMPLE_RATE)
    # the step that ended each turn is the first whose head 2 reached the threshold
    for (_, end), turn_end in zip(ends, TURN_ENDS, strict=True):
        assert turn_end < end["time"] <= turn_end + 0.4  # Mimi's lag: a few frames
        before = [m for m in msgs if m["type"] == "Step" and m["step_idx"] < end["step"]]
        last_speech = max(s["step_idx"] for s in before if s["prs"][2] < 0.7)
        assert all(
            s["prs"][2] >= 0.7 for s in before if last_speech < s["step_idx"]
        )  # no earlier pause step in this turn
    # without the parameter: moshi-server's messages, unchanged
    plain = asyncio.run(_session(turn_server.url, TURNS))
    assert not [m for m in plain if m["type"] == "EndOfTurn"]
    assert [m for m in plain if m["type"] != "Step"] == [
        m for m in msgs if m["type"] not in ("Step", "EndOfTurn")
    ]


@pytest.mark.parametrize(
    ("query", "match"),
    [
        ("end_of_turn=maybe", "end_of_turn must be 1 or 0"),
        ("end_of_turn=1&end_of_turn_head=4", "needs VAD head 4; this model has 4 VAD head"),
        ("end_of_turn=1&end_of_turn_threshold=2", "threshold must be in"),
        ("end_of_turn=1&end_of_turn_head=x", "end_of_turn"),
    ],
)
def test_bad_end_of_turn_settings_get_400(
    turn_server: ThreadedServer, query: str, match: str
) -> None:
    async def main() -> None:
        with pytest.raises(websockets.InvalidStatus) as caught:
            await connect(f"{turn_server.url}?{query}")
        assert caught.value.response.status_code == 400
        assert match in caught.value.response.body.decode()

    asyncio.run(main())


def test_the_client_yields_end_of_turn_and_prints_turns(turn_server: ThreadedServer) -> None:
    async def main() -> list[object]:
        got = []
        async for msg in stream_audio(turn_server.url, TURNS, rtf=100.0, end_of_turn=True):
            got.append(msg)
        return got

    msgs = asyncio.run(main())
    ends = [m for m in msgs if isinstance(m, EndOfTurn)]
    assert len(ends) == 2 and all(e.head == 2 for e in ends)
    out = io.StringIO()
    printer = LivePrinter(out)
    for msg in msgs:
        printer.on_message(msg)
    printer.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and all(line.endswith("[pause]") for line in lines)
    words = [m.text.strip() for m in msgs if isinstance(m, Word) and m.text.strip()]
    assert " ".join(line.removeprefix("> ").removesuffix(" [pause]") for line in lines) == " ".join(
        words
    )


def test_the_live_printer_follows_end_of_turn_once_it_has_one() -> None:
    out = io.StringIO()
    printer = LivePrinter(out)
    for msg in [
        Word("one", 0.0),
        Step(1, (0.9, 0.9, 0.9, 0.9), 0),  # no EndOfTurn yet: the Steps decide (moshi-server)
        Word("two", 1.0),
        EndOfTurn(2, 1.5, 0.8, 2),
        Word("three", 2.0),
        Step(3, (0.9, 0.9, 0.9, 0.9), 0),  # the server says where turns end: ignored now
        Word("four", 2.5),
        EndOfTurn(4, 3.0, 0.8, 2),
        EndOfTurn(5, 3.1, 0.8, 2),  # nothing said since: nothing printed
    ]:
        printer.on_message(msg)
    printer.close()
    assert out.getvalue() == "> one [pause]\n> two [pause]\n> three four [pause]\n"


def test_the_stream_command_prints_finished_turns_as_lines(
    turn_server: ThreadedServer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    wav = write_wav(tmp_path / "turns.wav", TURNS)
    args = ["stream", str(wav), "--url", turn_server.url, "--rtf", "1000", "--prefix", "0"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(lines)  # one line per turn
    assert main([*args, "--timestamps"]) == 0  # word rows, whatever the turns
    rows = [row.split(None, 2)[2] for row in capsys.readouterr().out.splitlines()]
    assert " ".join(lines).split() == " ".join(rows).split()
