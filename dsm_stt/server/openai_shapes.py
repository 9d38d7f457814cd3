"""OpenAI's transcription API, in and out: the request's fields, the answers' bodies, errors.

Owns what ``openai_files.py`` says in OpenAI's terms, as pure values: ``OpenAIError`` (the
``{"error": {message, type, param, code}}`` body and its status), ``ModelNames`` (which
``model`` names the loaded checkpoint answers to: its id, the last part of its path, and
OpenAI's transcription models in ``OPENAI_MODELS``, all mapped onto it) and its model
object, ``TranscriptionRequest`` (the form's fields, checked once; fields the model cannot
use are accepted and named in the ``X-DSM-STT-Ignored`` header), ``Words`` (Word/EndWord
events into timed words), and the answers: ``json``, ``text``, ``srt``, ``vtt``
(``writers.py``), ``verbose_json`` (``segments`` from ``segments.py``, cut at long pauses
and at the ends of turn the route's turn detector found, ``words``, ``usage``) and the
streamed events. It does no I/O: receiving the upload and running the
transcription are the route's.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from starlette.datastructures import FormData, UploadFile
from starlette.responses import JSONResponse, Response

from ..engine.events import EndWord, Word
from ..segments import segment_words
from ..writers import TimedWord, Transcript, render

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("word", "segment")
# OpenAI's transcription models: a request naming one gets the loaded checkpoint, so code
# written for OpenAI runs unchanged (``gpt-4o-transcribe-diarize`` is not among them: its
# speakers cannot be had)
OPENAI_MODELS = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-transcribe")
IGNORED_HEADER = "X-DSM-STT-Ignored"
# fields the form may carry that are read here; any other is accepted and reported ignored
_FIELDS = {"file", "model", "response_format", "stream", "timestamp_granularities"}
# what the model cannot use, and says so: it hears the language; it takes no text prompt; its
# sampling temperature is the server's; it reports no log-probabilities; a file streams whole
_UNUSED = ("language", "prompt", "temperature", "include", "chunking_strategy")
_STARTED = int(time.time())  # a model's ``created``: when this server came up


# --------------------------------------------------------------------------------------------
# errors


class OpenAIError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def body(self) -> dict[str, Any]:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"message": self.message, "type": kind, "param": self.param, "code": self.code}

    def response(self, headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": self.body}, self.status, headers=headers)


# --------------------------------------------------------------------------------------------
# the request


@dataclass(frozen=True)
class ModelNames:
    """The loaded checkpoint as the API names it: ``id`` (its hub id, ``owner/name``; a local
    checkpoint shows its directory's name only, not the server's paths), and every name a
    request may use for it: the id, the name it was loaded by, the last part of that
    name, and OpenAI's models."""

    id: str
    accepted: frozenset[str]

    @classmethod
    def of(cls, name: str) -> ModelNames:
        """From the engine's name: a hub id, a directory, or (from a moshi-server TOML) a
        weights file, local or ``hf://owner/name/file``."""
        if name.startswith("hf://"):
            ident = "/".join(name.removeprefix("hf://").split("/")[:2])
        else:
            path = PurePath(name.rstrip("/\\"))
            local = path.is_absolute() or name.startswith((".", "~")) or path.suffix != ""
            folder = path.parent if path.suffix else path  # a weights file: its directory
            ident = (folder.name or name) if local else name
        last = ident.rsplit("/", 1)[-1]
        return cls(ident, frozenset({name, ident, last, *OPENAI_MODELS}))

    def resolve(self, name: str) -> str | None:
        """The loaded model's id if ``name`` names it, else None."""
        return self.id if name in self.accepted else None


@dataclass(frozen=True)
class TranscriptionRequest:
    """The form's fields, checked once (the file itself is in the form)."""

    model: str  # the loaded model's id
    response_format: str = "json"
    granularities: frozenset[str] = frozenset({"segment"})
    stream: bool = False
    language: str | None = None
    ignored: tuple[str, ...] = ()  # fields given that have no effect, for the response header

    @classmethod
    def parse(cls, form: FormData, models: ModelNames) -> TranscriptionRequest:
        """Raises ``OpenAIError`` (400) naming the first bad field."""
        fields = {_field_name(key) for key in form}
        upload = form.get("file")
        if upload is None:
            raise OpenAIError(400, "missing the audio: a 'file' part", param="file")
        if not isinstance(upload, UploadFile):
            raise OpenAIError(400, "'file' must be a file upload (with a filename)", param="file")
        model = _text(form, "model")
        if model is None:
            raise OpenAIError(400, "missing 'model'", param="model")
        resolved = models.resolve(model)
        if resolved is None:
            raise OpenAIError(
                400,
                f"model {model!r} is not loaded; this server runs {models.id!r} "
                f"(also reachable as {', '.join(OPENAI_MODELS)})",
                param="model",
                code="model_not_found",
            )
        response_format = _text(form, "response_format") or "json"
        if response_format not in RESPONSE_FORMATS:
            raise OpenAIError(
                400,
                f"response_format {response_format!r} is not supported; choose one of "
                f"{', '.join(RESPONSE_FORMATS)}",
                param="response_format",
            )
        granularities = {
            str(v)
            for key in ("timestamp_granularities[]", "timestamp_granularities")
            for v in form.getlist(key)
        }
        if granularities - set(GRANULARITIES):
            raise OpenAIError(
                400,
                f"timestamp_granularities must be among {', '.join(GRANULARITIES)}, got "
                f"{', '.join(sorted(granularities))}",
                param="timestamp_granularities",
            )
        stream = _flag(_text(form, "stream"))
        temperature = _text(form, "temperature")
        if temperature is not None:
            try:
                float(temperature)
            except ValueError:
                raise OpenAIError(
                    400, f"temperature must be a number, got {temperature!r}", param="temperature"
                ) from None
        ignored = [name for name in _UNUSED if name in fields]
        ignored += sorted(fields - _FIELDS - set(_UNUSED))
        if stream and response_format != "json":
            ignored.append("response_format")  # a stream is events, whatever the format
        if granularities and (stream or response_format != "verbose_json"):
            ignored.append("timestamp_granularities")  # only verbose_json has timestamps
        return cls(
            model=resolved,
            response_format=response_format,
            granularities=frozenset(granularities or {"segment"}),
            stream=stream,
            language=_text(form, "language") or None,
            ignored=tuple(ignored),
        )

    @property
    def headers(self) -> dict[str, str]:
        return {IGNORED_HEADER: ", ".join(self.ignored)} if self.ignored else {}


def _field_name(key: str) -> str:
    return key.removesuffix("[]")


def _text(form: FormData, key: str) -> str | None:
    value = form.get(key)
    if value is None:
        value = form.get(key + "[]")
    if isinstance(value, UploadFile):
        raise OpenAIError(400, f"{key!r} must be a form field, not a file", param=key)
    return value


def _flag(value: str | None) -> bool:
    if value is None or value.strip().lower() in ("", "false", "0"):
        return False
    if value.strip().lower() in ("true", "1"):
        return True
    raise OpenAIError(400, f"stream must be true or false, got {value!r}", param="stream")


# --------------------------------------------------------------------------------------------
# answers


@dataclass(frozen=True)
class Result:
    """What a finished transcription reports."""

    words: list[TimedWord]
    duration: float  # seconds of audio in the file
    audio_tokens: int  # model steps the stream ran (12.5 a second of audio)
    text_tokens: int  # text pieces of its words
    turn_ends: tuple[float, ...] = ()  # where the model's VAD ended the speaker's turns

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words)


@dataclass
class Words:
    """Word/EndWord events → timed words, as ``dsm-stt transcribe`` reports them: text
    stripped, empty words (and their EndWord) dropped, times to the millisecond."""

    words: list[list[Any]] = field(default_factory=list)  # [text, start, end]
    text_tokens: int = 0
    _skip_end: bool = False

    def add(self, event: Word | EndWord) -> str | None:
        """Take one event; the text of a new word, if it is one."""
        if isinstance(event, Word):
            text = event.text.strip()
            self._skip_end = not text
            if text:
                self.words.append([text, max(event.start_time, 0.0), None])
                self.text_tokens += len(event.tokens)
                return text
        elif not self._skip_end and self.words and self.words[-1][2] is None:
            self.words[-1][2] = max(event.stop_time, self.words[-1][1])
        else:
            self._skip_end = False
        return None

    def timed(self) -> list[TimedWord]:
        return [
            TimedWord(t, round(s, 3), None if e is None else round(e, 3)) for t, s, e in self.words
        ]


def answer(request: TranscriptionRequest, result: Result, temperature: float) -> Response:
    """The finished transcription in the requested format; ``temperature``: the engine's."""
    headers = request.headers
    fmt = request.response_format
    if fmt in ("text", "srt", "vtt"):
        transcript = Transcript(result.text, result.words, result.duration, request.model)
        media = "text/vtt" if fmt == "vtt" else "text/plain"
        return Response(render(transcript, fmt), media_type=media, headers=headers)
    usage = {"type": "duration", "seconds": result.duration}
    if fmt == "json":
        return JSONResponse({"text": result.text, "usage": usage}, headers=headers)
    body: dict[str, Any] = {
        "task": "transcribe",
        "language": request.language or "unknown",
        "duration": result.duration,
        "text": result.text,
    }
    if "segment" in request.granularities:
        body["segments"] = segments(result, temperature)
    if "word" in request.granularities:
        body["words"] = words(result)
    body["usage"] = usage
    return JSONResponse(body, headers=headers)


def words(result: Result) -> list[dict[str, Any]]:
    """OpenAI's word objects; the last word, which may have no end, lasts to the audio's end."""
    timed = result.words
    out = []
    for i, w in enumerate(timed):
        end = w.end
        if end is None:
            end = timed[i + 1].start if i + 1 < len(timed) else max(w.start, result.duration)
        out.append({"word": w.text, "start": w.start, "end": round(end, 3)})
    return out


def segments(result: Result, temperature: float) -> list[dict[str, Any]]:
    """OpenAI's segment objects. The fields a DSM model has no value for say so:
    ``tokens`` empty (the ids are the tokenizer's, meaningless to a client),
    ``avg_logprob`` 0 (not computed), ``no_speech_prob`` 0 (a segment holds words);
    ``seek`` is the segment's start in Whisper's 10 ms frames and ``compression_ratio``
    Whisper's measure of the text."""
    out = []
    cut = segment_words(result.words, result.duration, result.turn_ends)
    for i, seg in enumerate(cut):
        text = seg.text
        out.append(
            {
                "id": i,
                "seek": round(seg.start * 100),
                "start": seg.start,
                "end": round(seg.end, 3),
                "text": text,
                "tokens": [],
                "temperature": temperature,
                "avg_logprob": 0.0,
                "compression_ratio": _compression_ratio(text),
                "no_speech_prob": 0.0,
            }
        )
    return out


def _compression_ratio(text: str) -> float:
    """Whisper's repetition measure: the text's bytes over their zlib-compressed size."""
    data = text.encode("utf-8")
    return round(len(data) / len(zlib.compress(data)), 3) if data else 0.0


def model_object(models: ModelNames) -> dict[str, Any]:
    """OpenAI's model object for the loaded checkpoint (``created``: the server's start)."""
    owner = models.id.split("/")[0] if "/" in models.id else "dsm-stt"
    return {"id": models.id, "object": "model", "created": _STARTED, "owned_by": owner}


def sse(event: Mapping[str, Any]) -> bytes:
    """One server-sent event: a ``data:`` line of JSON (OpenAI names no ``event:``)."""
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


def delta_event(text: str, first: bool) -> dict[str, Any]:
    """A new word; joined, the deltas are the text (a space before every word but the first)."""
    return {"type": "transcript.text.delta", "delta": text if first else " " + text}


def done_event(result: Result) -> dict[str, Any]:
    """The end of the stream, with the token usage OpenAI's streaming models report: the
    input tokens are the model's audio steps (12.5 a second), the output its words' text
    pieces."""
    usage = {
        "type": "tokens",
        "input_tokens": result.audio_tokens,
        "output_tokens": result.text_tokens,
        "total_tokens": result.audio_tokens + result.text_tokens,
        "input_token_details": {"audio_tokens": result.audio_tokens, "text_tokens": 0},
    }
    return {"type": "transcript.text.done", "text": result.text, "usage": usage}


def error_event(error: OpenAIError) -> dict[str, Any]:
    """A failure midway through a stream (the SDKs raise it)."""
    return {"type": "error", "error": error.body}
