"""A Realtime transcription session's items: which words belong to which commit, when an item
is complete, and the client's clock against the stream's.

Owns ``Items`` (the open item, the committed ones still taking words or waiting for their last
ones, and the events that follow: deltas, ``committed``, ``completed``), ``Timeline`` (the
stream's samples, the silence flushes insert, and the client's samples) and the server event
shape (``server_event``). Pure Python: the session (``realtime.py``) feeds it the engine's
``Word`` / ``EndWord`` / ``Flushed`` values and the stream's step count, and sends the event
dicts it returns.

The rule: a commit closes the open item at a point of the stream (``boundary``, stream
seconds); a word that starts before it is that item's, later ones the next item's. Words come
out in start order, so once one starts after an item's boundary, no more will come for it.
The item is complete at its flush's ``Flushed`` (the scheduler answers it right after the words
of the audio before it), or, committed without a flush, once the stream is its text delay past
the boundary.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any

from ..engine.events import Word


def new_id(prefix: str) -> str:
    """An id in OpenAI's style: ``item_…``, ``event_…``, ``sess_…``."""
    return prefix + secrets.token_urlsafe(15)[:20]


def server_event(kind: str, **fields: object) -> dict[str, object]:
    """A server event: its ``type``, a fresh ``event_id``, its fields."""
    return {"type": kind, "event_id": new_id("event_"), **fields}


class Timeline:
    """The stream's clock (audio and the silence flushes insert) against the client's (audio
    appended). Mirrors the scheduler's padding rule (``Scheduler._pad``): a flush after new
    audio pads to the end of the frame, then ``D + 1`` frames. Positions in samples; the stream
    starts with the checkpoint's silence prefix, which its clock leaves out."""

    def __init__(self, sample_rate: float, frame_size: int, delay: int, prefix: int) -> None:
        self.sample_rate = sample_rate
        self.frame_size = frame_size
        self.delay = delay
        self.prefix = prefix
        self.samples = prefix  # stream samples queued: prefix, audio, padding
        self.client = 0  # client samples appended (at 24 kHz)
        self.padding: list[tuple[int, int]] = []  # (stream position, samples inserted)
        self._unpadded = prefix > 0

    def feed(self, n: int) -> None:
        self.samples += n
        self.client += n
        self._unpadded = self._unpadded or n > 0

    def flush(self) -> None:
        """The session asks the scheduler for a flush: note the silence it inserts."""
        if not self._unpadded:
            return
        pad = -self.samples % self.frame_size + (self.delay + 1) * self.frame_size
        self.padding.append((self.samples, pad))
        self.samples += pad
        self._unpadded = False

    @property
    def stream_end(self) -> float:
        """Stream seconds where the audio queued so far ends (before any padding after it)."""
        inserted_last = self.padding[-1][1] if self.padding and not self._unpadded else 0
        return (self.samples - inserted_last - self.prefix) / self.sample_rate

    @property
    def client_end(self) -> float:
        return self.client / self.sample_rate

    def to_client(self, stream_seconds: float) -> float:
        """Client seconds of a time on the stream's clock (inside a padding: where it began)."""
        position = stream_seconds * self.sample_rate + self.prefix
        inserted = 0.0
        for at, n in self.padding:
            if position <= at:
                break
            inserted += min(n, position - at)
        return max(0.0, (position - self.prefix - inserted) / self.sample_rate)


@dataclass(eq=False)
class Item:
    """One user item: the audio between two commits and its words."""

    id: str
    start: float  # client seconds where its audio begins
    end: float | None = None  # client seconds where it was committed
    boundary: float = math.inf  # stream seconds: words that start before it are this item's
    words: list[list[Any]] = field(default_factory=list)  # [text, start, end] client seconds
    discarded: bool = False  # cleared: its words are dropped
    complete_at: int | None = None  # stream steps after which its words are all out

    @property
    def transcript(self) -> str:
        return " ".join(word[0] for word in self.words)


class Items:
    """The items of one session, on the session's ``timeline``. Every method returns the
    server events it produces, in order."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self.open = Item(new_id("item_"), 0.0)
        self._routing: list[Item] = []  # committed or cleared, maybe still taking words
        self._flushes: dict[int, Item] = {}  # waiting for Flushed(id)
        self._by_steps: list[Item] = []  # waiting for the stream to pass a step
        self._previous_id: str | None = None
        self._last_word_item: Item | None = None

    def commit(
        self,
        boundary: float,
        client_end: float,
        flush_id: int | None = None,
        complete_at: int | None = None,
    ) -> list[dict[str, object]]:
        """Close the open item at ``boundary`` (stream seconds; ``client_end`` on the client's
        clock); it completes at ``Flushed(flush_id)``, or once the stream has ``complete_at``
        steps."""
        item = self.open
        item.boundary, item.end = boundary, client_end
        self._routing.append(item)
        if flush_id is not None:
            self._flushes[flush_id] = item
        else:
            item.complete_at = complete_at
            self._by_steps.append(item)
        self.open = Item(new_id("item_"), client_end)
        return [self._committed(item)]

    def clear(self) -> None:
        """Drop the open item: the words of the audio appended so far are not sent."""
        item = self.open
        item.discarded, item.boundary = True, self.timeline.stream_end
        self._routing.append(item)
        self.open = Item(new_id("item_"), self.timeline.client_end)

    def word(self, word: Word) -> list[dict[str, object]]:
        """A word the model decoded: a delta of the item it belongs to."""
        text = word.text.strip()
        if not text:
            return []
        while self._routing and self._routing[0].boundary <= word.start_time:
            self._routing.pop(0)  # its words are all out (later words start after it)
        item = self._routing[0] if self._routing else self.open
        self._last_word_item = item
        if item.discarded:
            return []
        delta = text if not item.words else " " + text
        # (a word the model stamped before the item's start, e.g. pieces it emitted after a
        # flush without a new WORD token, keeps its stamp's word but starts with the item)
        start = max(self.timeline.to_client(word.start_time), item.start)
        item.words.append([text, start, None])
        kind = "conversation.item.input_audio_transcription.delta"
        return [server_event(kind, item_id=item.id, content_index=0, delta=delta)]

    def end_word(self, stop_time: float) -> None:
        """The last word ended at ``stop_time`` (stream seconds)."""
        item = self._last_word_item
        if item is not None and item.words and item.words[-1][2] is None:
            item.words[-1][2] = self.timeline.to_client(stop_time)

    def flushed(self, flush_id: int) -> list[dict[str, object]]:
        item = self._flushes.pop(flush_id, None)
        return [] if item is None else self._complete(item)

    def stepped(self, steps: int) -> list[dict[str, object]]:
        """The stream has ``steps`` steps: the items waiting for that are complete."""
        out: list[dict[str, object]] = []
        while self._by_steps and self._by_steps[0].complete_at <= steps:  # type: ignore[operator]
            out += self._complete(self._by_steps.pop(0))
        return out

    def close(self) -> list[dict[str, object]]:
        """The stream was transcribed to its end: every item is complete, the open one too if
        it has words."""
        out: list[dict[str, object]] = []
        for item in [*self._by_steps, *self._flushes.values()]:
            out += self._complete(item)
        self._by_steps.clear()
        self._flushes.clear()
        if self.open.words:
            item, self.open = self.open, Item(new_id("item_"), self.timeline.client_end)
            item.end = self.timeline.client_end
            out += [self._committed(item), *self._complete(item)]
        return out

    def _committed(self, item: Item) -> dict[str, object]:
        event = server_event(
            "input_audio_buffer.committed", previous_item_id=self._previous_id, item_id=item.id
        )
        self._previous_id = item.id
        return event

    def _complete(self, item: Item) -> list[dict[str, object]]:
        if item in self._routing:
            self._routing.remove(item)
        if item.discarded:
            return []
        assert item.end is not None
        # a word the model never ended (another came without a WORD token between, or it is
        # the item's last) ends where the next one starts, or where the item does
        ends = [word[1] for word in item.words[1:]] + [item.end]
        words = [
            {
                "word": text,
                "start": round(start, 3),
                "end": round(max(start, later if end is None else end), 3),
            }
            for (text, start, end), later in zip(item.words, ends, strict=True)
        ]
        completed = server_event(
            "conversation.item.input_audio_transcription.completed",
            item_id=item.id,
            content_index=0,
            transcript=item.transcript,
            usage={"type": "duration", "seconds": round(max(0.0, item.end - item.start), 3)},
            words=words,  # an extension: OpenAI's clients ignore it
        )
        return [completed]
