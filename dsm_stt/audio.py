"""Audio in: decode any file to 24 kHz mono float32, and decode a live Ogg/Opus byte stream.

Owns the conversion of whatever a user sends into what the model eats (spec §3.1, §4.4):
mono float32 in [-1, 1] at 24 kHz, cut into frames of 1920 samples. Files of any format FFmpeg
reads are decoded with PyAV and resampled with soxr, streaming, so an hour-long file never
exists as a Python list of samples; ``probe`` checks a file (readable, a container FFmpeg opens,
an audio stream that decodes; else what the file holds) and reads its duration without decoding
it, so a command can refuse bad inputs before it loads a model. ``OggOpusStreamDecoder`` turns
the pieces of one Ogg/Opus stream (moshi-server's ``OggOpus{data}`` message, spec §5.2) into
samples as they arrive.

It does not know about models, slots or the wire protocol, and it imports no torch: callers
get numpy arrays.
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
import soxr

from .model.config import FRAME_SIZE, SAMPLE_RATE

# Sources accepted by ``load_audio`` / ``iter_audio``: a path, the encoded bytes, or an open
# binary file (an HTTP upload).
AudioSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO

_SOXR_QUALITY = "HQ"  # soxr's "high quality" preset: 20-bit precision, 91% passband
_DEFAULT_CHUNK_SECONDS = 10.0
_LOAD_CHUNK_SECONDS = 30.0  # bigger chunks when the caller wants everything anyway
_EMPTY = np.zeros(0, dtype=np.float32)


class AudioDecodeError(ValueError):
    """Input that cannot be turned into audio; the message names the source and the problem."""


class UnsupportedCodecError(AudioDecodeError):
    """An audio stream in a codec this FFmpeg has no decoder for (a server answers 415, not
    400: the file may be fine). ``codec`` names it (``unknown`` when FFmpeg does not even
    know its name), ``container`` the file's format."""

    def __init__(self, message: str, codec: str, container: str) -> None:
        super().__init__(message)
        self.codec = codec
        self.container = container


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """One decoded frame → float32 mono (mean of the channels), whatever the sample format.

    Done in numpy rather than with ``av.AudioResampler``: the mean over channels needs the
    channels anyway, and a numpy conversion has no fixed input setup to break when a stream
    changes format or layout midway (concatenated MP3s do).
    """
    data = frame.to_ndarray()
    channels = frame.layout.nb_channels
    if not frame.format.is_planar:
        data = data.reshape(-1, channels).T  # packed [1, n*C] → [C, n]
    if data.dtype == np.uint8:
        data = (data.astype(np.float32) - 128.0) / 128.0
    elif data.dtype.kind == "i":
        data = data.astype(np.float32) * np.float32(1.0 / (1 << (8 * data.dtype.itemsize - 1)))
    else:
        data = data.astype(np.float32, copy=False)
    if channels == 1:
        return data[0]
    return data.mean(axis=0, dtype=np.float32)


class _Resampler:
    """Streaming resampler from whatever rate the decoder reports to a fixed output rate.

    Wraps ``soxr.ResampleStream``; a change of input rate flushes the old stream and starts a
    new one, and input already at the output rate passes through untouched.
    """

    def __init__(self, out_rate: int) -> None:
        self.out_rate = out_rate
        self._in_rate: int | None = None
        self._stream: soxr.ResampleStream | None = None

    def __call__(self, x: np.ndarray, in_rate: int) -> np.ndarray:
        head = _EMPTY
        if in_rate != self._in_rate:
            head = self.flush()
            self._in_rate = in_rate
            if in_rate != self.out_rate:
                self._stream = soxr.ResampleStream(
                    in_rate, self.out_rate, 1, dtype="float32", quality=_SOXR_QUALITY
                )
        body = x if self._stream is None else self._stream.resample_chunk(x)
        return body if head.size == 0 else np.concatenate([head, body])

    def flush(self) -> np.ndarray:
        """The samples soxr still holds back (its filter delay); the stream is then closed."""
        out = _EMPTY
        if self._stream is not None:
            out = self._stream.resample_chunk(_EMPTY, last=True)
        self._stream = None
        self._in_rate = None
        return out


def _clip(x: np.ndarray) -> np.ndarray:
    # Lossy codecs and the resampling filter overshoot full scale slightly; the model expects
    # [-1, 1] (spec §5.2).
    return np.clip(x, -1.0, 1.0, out=x) if x.flags.writeable else np.clip(x, -1.0, 1.0)


def _check_rate(sample_rate: int) -> None:
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _describe(source: AudioSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)  # type: ignore[return-value]
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    name = getattr(source, "name", None)
    return name if isinstance(name, str) else "<stream>"


def _open(source: AudioSource, name: str) -> av.container.InputContainer:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise AudioDecodeError(f"{name}: no such file")
        if path.is_dir():
            raise AudioDecodeError(f"{name}: is a directory, not an audio file")
        if path.stat().st_size == 0:
            raise AudioDecodeError(f"{name}: empty file (0 bytes)")
        file: str | BinaryIO = os.fspath(path)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise AudioDecodeError(f"{name}: empty input (0 bytes)")
        file = io.BytesIO(bytes(source))
    else:
        file = source
    try:
        return av.open(file, mode="r", **_open_options())
    except av.error.InvalidDataError as e:
        raise AudioDecodeError(
            f"{name}: not an audio file FFmpeg can read ({e.strerror or e})"
        ) from e
    except (av.error.FFmpegError, OSError) as e:
        raise AudioDecodeError(f"{name}: cannot open ({getattr(e, 'strerror', None) or e})") from e


def _open_options() -> dict[str, str]:
    """PyAV before 19 decodes container metadata strictly unless told to ignore bad bytes;
    19 dropped the option (and the strictness with it)."""
    major = int(av.__version__.split(".")[0])
    return {"metadata_errors": "ignore"} if major < 19 else {}


def _audio_stream(container: av.container.InputContainer, name: str) -> av.audio.AudioStream:
    if not container.streams.audio:
        raise AudioDecodeError(f"{name}: no audio stream ({_holdings(container)})")
    return container.streams.best("audio") or container.streams.audio[0]


def _holdings(container: av.container.InputContainer) -> str:
    """What a file holds, for a user: ``the file (MOV) holds 1 video stream (mpeg4)``."""
    codecs: dict[str, list[str]] = {}
    for stream in container.streams:
        context = getattr(stream, "codec_context", None)
        codec = getattr(context, "name", None) or "unknown codec"
        codecs.setdefault(stream.type or "data", []).append(codec)
    kind = (container.format.name or "?").split(",")[0]
    if kind == "tty":  # FFmpeg shows any text as ANSI art
        return "it is a text file"
    if kind == "image2" or kind.endswith("_pipe"):
        return f"it is an image ({', '.join(codecs.get('video', [kind]))})"
    kind = kind.upper()
    if not codecs:
        return f"the file ({kind}) holds no stream at all"
    parts = [
        f"{len(found)} {what} stream{'s' if len(found) > 1 else ''} ({', '.join(found)})"
        for what, found in sorted(codecs.items())
    ]
    return f"the file ({kind}) holds {' and '.join(parts)}"


@dataclass(frozen=True)
class AudioInfo:
    """What ``probe`` learnt of a file without decoding it whole."""

    source: str
    duration: float | None  # seconds, when the container says (None: unknown until decoded)
    codec: str
    sample_rate: int
    channels: int


_PROBE_PACKETS = 64  # packets tried before the codec is declared undecodable


def probe(source: str | os.PathLike) -> AudioInfo:
    """Check that ``source`` can be transcribed, cheaply: it exists, is a readable file, is a
    container FFmpeg opens, holds an audio stream (else the error says what it holds) and its
    first audio packets decode. Raises ``AudioDecodeError`` with one line naming the file and
    the problem; a file that passes can still fail later (a read error midway)."""
    name = _describe(source)
    path = Path(source)
    if path.is_file() and not os.access(path, os.R_OK):
        raise AudioDecodeError(f"{name}: not readable (permission denied)")
    container = _open(source, name)
    try:
        stream = _audio_stream(container, name)
        context = stream.codec_context
        codec = context.name if context is not None else "unknown"
        if stream.duration is not None and stream.time_base is not None:
            duration: float | None = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = None
        first_error: Exception | None = None
        tried = 0
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the demuxer's end-of-stream packet
            tried += 1
            try:
                if packet.decode():
                    first_error = None
                    break
            except av.error.FFmpegError as e:
                first_error = first_error or e
            if tried >= _PROBE_PACKETS:
                break
        if first_error is not None:
            raise AudioDecodeError(
                f"{name}: the {codec} audio stream could not be decoded "
                f"({getattr(first_error, 'strerror', None) or first_error})"
            )
        return AudioInfo(name, duration, codec, context.sample_rate or 0, context.channels or 0)
    except av.error.FFmpegError as e:
        raise AudioDecodeError(f"{name}: read error ({e.strerror or e})") from e
    finally:
        container.close()


def iter_audio(
    source: AudioSource,
    sample_rate: int = SAMPLE_RATE,
    chunk_seconds: float = _DEFAULT_CHUNK_SECONDS,
) -> Iterator[np.ndarray]:
    """Decode ``source`` progressively into float32 mono chunks at ``sample_rate``.

    Each chunk holds about ``chunk_seconds`` of audio (the last one less; chunk boundaries are
    not aligned to model frames). Channels are averaged; the best audio stream of a video is
    used and the video packets are skipped without decoding. Decoding and resampling both
    stream, so memory stays bounded by one chunk. Packets the decoder rejects are skipped, as
    FFmpeg's command line does; a stream in which no packet decodes is an error.
    Raises ``AudioDecodeError`` (when the generator is first advanced) for unreadable input,
    and its subclass ``UnsupportedCodecError`` for audio in a codec FFmpeg cannot decode.
    """
    _check_rate(sample_rate)
    if not chunk_seconds > 0:
        raise ValueError(f"chunk_seconds must be > 0, got {chunk_seconds!r}")
    name = _describe(source)
    container = _open(source, name)
    try:
        stream = _audio_stream(container, name)
        resampler = _Resampler(sample_rate)
        pending: list[np.ndarray] = []
        pending_len = 0
        pending_rate = 0
        decoded = 0
        first_error: Exception | None = None

        def drain(last: bool) -> np.ndarray:
            nonlocal pending, pending_len
            x = np.concatenate(pending) if len(pending) > 1 else (pending or [_EMPTY])[0]
            pending, pending_len = [], 0
            out = resampler(x, pending_rate) if x.size else _EMPTY
            if last:
                out = np.concatenate([out, resampler.flush()])
            return _clip(out)

        try:
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.FFmpegError as e:
                    first_error = first_error or e
                    continue
                for frame in frames:
                    if frame.sample_rate != pending_rate and pending:
                        out = drain(last=False)
                        if out.size:
                            yield out
                    pending_rate = frame.sample_rate
                    mono = _frame_to_mono(frame)
                    pending.append(mono)
                    pending_len += mono.size
                    decoded += mono.size
                    if pending_len >= chunk_seconds * pending_rate:
                        out = drain(last=False)
                        if out.size:
                            yield out
        except av.error.FFmpegError as e:
            seconds = decoded / pending_rate if pending_rate else 0.0
            raise AudioDecodeError(
                f"{name}: read error after {seconds:.2f} s of audio ({e.strerror or e})"
            ) from e
        if decoded == 0 and first_error is not None:
            codec = stream.codec_context.name if stream.codec_context else "unknown"
            if isinstance(first_error, av.error.DecoderNotFoundError):
                kind = (container.format.name or "?").split(",")[0].upper()
                raise UnsupportedCodecError(
                    f"{name}: the file ({kind}) holds audio in a codec FFmpeg cannot decode "
                    f"({codec})",
                    codec,
                    kind,
                )
            raise AudioDecodeError(
                f"{name}: the {codec} audio stream could not be decoded "
                f"({getattr(first_error, 'strerror', None) or first_error})"
            )
        out = drain(last=True)
        if out.size:
            yield out
    finally:
        container.close()


def load_audio(source: AudioSource, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode a whole file (path, bytes or binary file) to float32 mono in [-1, 1].

    Any container/codec FFmpeg reads works (wav, mp3, flac, ogg/vorbis, ogg/opus, m4a/aac, the
    audio track of a video...). Channels are averaged, the result is resampled with soxr (high
    quality) to ``sample_rate``. Encoder padding is trimmed where the container says how much
    (MP3 gapless headers, Ogg granule positions, MP4 edit lists). A valid file with no samples
    gives an empty array. Raises ``AudioDecodeError`` for anything else.
    """
    chunks = list(iter_audio(source, sample_rate, chunk_seconds=_LOAD_CHUNK_SECONDS))
    if not chunks:
        return _EMPTY.copy()
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


def pad_for_stream(
    pcm: np.ndarray,
    prefix_seconds: float,
    sample_rate: int = SAMPLE_RATE,
    *,
    suffix_seconds: float = 0.0,
) -> np.ndarray:
    """Surround ``pcm`` with zeros: the checkpoint's ``audio_silence_prefix_seconds`` before it
    and optionally the flush silence after it (spec §4.4). Returns a new float32 array."""
    _check_rate(sample_rate)
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim != 1:
        raise ValueError(f"pcm must be 1-D mono samples, got shape {pcm.shape}")
    for label, value in (("prefix_seconds", prefix_seconds), ("suffix_seconds", suffix_seconds)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{label} must be a finite number >= 0, got {value!r}")
    before = round(prefix_seconds * sample_rate)
    after = round(suffix_seconds * sample_rate)
    out = np.zeros(before + pcm.size + after, dtype=np.float32)
    out[before : before + pcm.size] = pcm
    return out


def to_frames(pcm: np.ndarray, frame_size: int = FRAME_SIZE) -> np.ndarray:
    """Cut mono samples into model frames ``[T, frame_size]``, zero-padding the last one."""
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim != 1:
        raise ValueError(f"pcm must be 1-D mono samples, got shape {pcm.shape}")
    if frame_size <= 0:
        raise ValueError(f"frame_size must be > 0, got {frame_size}")
    n_frames = -(-pcm.size // frame_size)
    out = np.zeros((n_frames, frame_size), dtype=np.float32)
    out.reshape(-1)[: pcm.size] = pcm
    return out


# --------------------------------------------------------------------------------------------
# Live Ogg/Opus
# --------------------------------------------------------------------------------------------

_OGG_HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, flags, granule, serial, seq, crc, n
_OGG_CONTINUED, _OGG_BOS, _OGG_EOS = 0x01, 0x02, 0x04
_MAX_PACKET_BYTES = 8 << 20  # an OpusTags packet with cover art can be large; audio is < 8 KiB
_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}
_OTHER_CODECS = {
    b"\x01vorbis": "Vorbis",
    b"Speex   ": "Speex",
    b"\x7fFLAC": "FLAC",
    b"fishead\x00": "Skeleton",
    b"\x80theora": "Theora",
}


class OggOpusStreamDecoder:
    """Decode one Ogg/Opus stream that arrives in pieces cut at arbitrary byte boundaries.

    ``feed`` returns the float32 mono samples at ``sample_rate`` that the new bytes completed
    (often none: an Ogg page must be complete before its packets are known, and soxr holds back
    a few ms); ``close`` returns the rest. The Ogg framing is parsed here because FFmpeg's
    demuxer pulls from a file and cannot be handed bytes as they come; the packets are decoded
    by FFmpeg's Opus decoder, which applies the OpusHead pre-skip, and the final page's
    granule position trims the encoder's end padding, so the output matches decoding the
    whole file with ``load_audio``. Chained streams (a new stream after an end-of-stream page)
    are decoded one after the other; other multiplexed streams are ignored. Page CRCs are not
    checked: the transport (a WebSocket) already guarantees integrity.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE) -> None:
        _check_rate(sample_rate)
        self.sample_rate = sample_rate
        self._buffer = bytearray()
        self._offset = 0  # stream offset of _buffer[0], for error messages
        self._page_offset = 0  # stream offset of the page being handled
        self._resampler = _Resampler(sample_rate)
        self._closed = False
        self._serial: int | None = None  # the Opus stream being decoded
        self._ended = True  # no Opus stream active (none yet, or the last one hit EOS)
        self._others: list[str] = []  # codecs of ignored streams, for the error message
        self._packet = bytearray()
        self._packet_index = 0
        self._decoder: av.audio.codeccontext.AudioCodecContext | None = None
        self._produced = 0  # samples decoded in the current stream, after pre-skip
        self._pre_skip = 0

    def feed(self, data: bytes) -> np.ndarray:
        """Add the next piece of the stream; return the samples it completed (maybe none)."""
        if self._closed:
            raise AudioDecodeError("OggOpus stream: feed() after close()")
        self._buffer += data
        out: list[tuple[np.ndarray, int]] = []
        while (page := self._next_page()) is not None:
            out.extend(self._on_page(*page))
        return self._emit(out, last=False)

    def close(self) -> np.ndarray:
        """End of input: return the samples still held by the decoder and the resampler.
        A trailing incomplete page (a truncated stream) is dropped."""
        if self._closed:
            return _EMPTY.copy()
        self._closed = True
        out = self._flush_decoder()
        return self._emit(out, last=True)

    # -- Ogg framing ------------------------------------------------------------------------

    def _next_page(self) -> tuple[int, int, int, list[int], memoryview] | None:
        buf = self._buffer
        if buf[:4] != b"OggS"[: min(4, len(buf))] or (len(buf) > 4 and buf[4] != 0):
            raise AudioDecodeError(
                f"OggOpus stream: expected an Ogg page at byte {self._offset}, "
                f"got {bytes(buf[:8])!r} (not an Ogg stream, or a piece is missing)"
            )
        if len(buf) < _OGG_HEADER.size:
            return None
        _, _, flags, granule, serial, _, _, n_segments = _OGG_HEADER.unpack_from(buf)
        body_start = _OGG_HEADER.size + n_segments
        if len(buf) < body_start:
            return None
        lacing = list(buf[_OGG_HEADER.size : body_start])
        end = body_start + sum(lacing)
        if len(buf) < end:
            return None
        body = memoryview(bytes(buf[body_start:end]))
        del buf[:end]
        self._page_offset = self._offset
        self._offset += end
        return flags, granule, serial, lacing, body

    def _on_page(
        self, flags: int, granule: int, serial: int, lacing: list[int], body: memoryview
    ) -> list[tuple[np.ndarray, int]]:
        if flags & _OGG_BOS:
            first = bytes(body[: lacing[0]]) if lacing else b""
            if not first.startswith(b"OpusHead"):
                self._others.append(_codec_name(first))
                return []
            if not self._ended:
                return []  # a second Opus stream multiplexed with ours: ignored
            self._start_stream(serial)
        elif self._serial is None:
            if not self._others:
                raise AudioDecodeError(
                    f"OggOpus stream: the first page (byte {self._page_offset}) does not begin a "
                    "stream; the data must start at the beginning of the Ogg stream"
                )
            raise AudioDecodeError(
                f"OggOpus stream: no Opus stream in the Ogg data (found {', '.join(self._others)})"
            )
        if serial != self._serial or self._ended:
            return []
        if not flags & _OGG_CONTINUED:
            self._packet.clear()  # a packet left open by the previous page was truncated
        decoded: list[tuple[np.ndarray, int]] = []
        pos = 0
        for size in lacing:
            self._packet += body[pos : pos + size]
            pos += size
            if len(self._packet) > _MAX_PACKET_BYTES:
                raise AudioDecodeError(
                    f"OggOpus stream: packet larger than {_MAX_PACKET_BYTES} bytes"
                )
            if size < 255:
                decoded.extend(self._on_packet(bytes(self._packet)))
                self._packet.clear()
        if flags & _OGG_EOS:
            decoded = self._trim_end(decoded + self._flush_decoder(), granule)
            self._ended = True
        else:
            self._produced += sum(x.size for x, _ in decoded)
        return decoded

    def _start_stream(self, serial: int) -> None:
        self._serial = serial
        self._ended = False
        self._packet.clear()
        self._packet_index = 0
        self._decoder = None
        self._produced = 0

    # -- Opus packets -----------------------------------------------------------------------

    def _on_packet(self, packet: bytes) -> list[tuple[np.ndarray, int]]:
        index = self._packet_index
        self._packet_index += 1
        if index == 0:
            self._open_decoder(packet)
            return []
        if index == 1:
            if not packet.startswith(b"OpusTags"):
                raise AudioDecodeError("OggOpus stream: second packet is not OpusTags")
            return []
        assert self._decoder is not None
        try:
            frames = self._decoder.decode(av.Packet(packet))
        except av.error.FFmpegError as e:
            raise AudioDecodeError(
                f"OggOpus stream: Opus packet {index - 2} could not be decoded ({e.strerror or e})"
            ) from e
        return [(_frame_to_mono(f), f.sample_rate) for f in frames]

    def _open_decoder(self, head: bytes) -> None:
        # OpusHead (RFC 7845 §5.1): magic, version, channels, pre-skip, rate, gain, mapping.
        if len(head) < 19 or head[8] >> 4 != 0:
            raise AudioDecodeError(
                f"OggOpus stream: invalid OpusHead ({len(head)} bytes, version {head[8:9]!r})"
            )
        channels = head[9]
        self._pre_skip = struct.unpack_from("<H", head, 10)[0]
        if channels not in _LAYOUTS:
            raise AudioDecodeError(f"OggOpus stream: unsupported channel count {channels}")
        name = "libopus" if "libopus" in av.codecs_available else "opus"
        decoder = av.CodecContext.create(name, "r")
        decoder.extradata = head
        decoder.layout = _LAYOUTS[channels]
        decoder.sample_rate = 48000  # Opus always decodes at 48 kHz in FFmpeg
        try:
            decoder.open()
        except av.error.FFmpegError as e:
            raise AudioDecodeError(f"OggOpus stream: invalid OpusHead ({e.strerror or e})") from e
        self._decoder = decoder

    def _flush_decoder(self) -> list[tuple[np.ndarray, int]]:
        if self._decoder is None or self._ended:
            return []
        try:
            frames = self._decoder.decode(None)
        except av.error.FFmpegError:
            frames = []
        return [(_frame_to_mono(f), f.sample_rate) for f in frames]

    def _trim_end(
        self, decoded: list[tuple[np.ndarray, int]], granule: int
    ) -> list[tuple[np.ndarray, int]]:
        """Keep only the samples the last page's granule position accounts for (RFC 7845 §4.4:
        the encoder pads the last packet; the granule says where the audio really ends)."""
        total = sum(x.size for x, _ in decoded)
        if granule < 0:  # -1: no packet ends on this page, nothing to say
            self._produced += total
            return decoded
        keep = max(0, min(total, granule - self._pre_skip - self._produced))
        self._produced += keep
        kept: list[tuple[np.ndarray, int]] = []
        for x, rate in decoded:
            if keep <= 0:
                break
            kept.append((x[:keep], rate))
            keep -= min(keep, x.size)
        return kept

    # -- output -----------------------------------------------------------------------------

    def _emit(self, decoded: list[tuple[np.ndarray, int]], last: bool) -> np.ndarray:
        parts = [self._resampler(x, rate) for x, rate in decoded]
        if last:
            parts.append(self._resampler.flush())
        if not parts:
            return _EMPTY.copy()
        out = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
        return _clip(out)


def _codec_name(first_packet: bytes) -> str:
    for magic, name in _OTHER_CODECS.items():
        if first_packet.startswith(magic):
            return name
    return f"an unknown codec ({first_packet[:8]!r})"
