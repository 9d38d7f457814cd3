"""Per-stream word assembly: the model's text tokens → Word / EndWord events with timestamps.

Owns the state machine of spec §4.2 step 6 (as in moshi-server's ``asr.rs``) and the end-of-stream
flush. It sees one token per model step and nothing else: no audio, no tensors, no slots. Piece
ids are turned into text by the ``decode`` callable it is given (the SentencePiece wrapper).

Token conventions (spec §2.1): id 0 (WORD) marks the step where a new word starts, id 3 (PAD)
means "no word here"; both delimit words. Every other id, including 1 and 2, is a piece of the
current word, exactly like the reference server.
"""

from __future__ import annotations

from collections.abc import Callable

from dsm_stt.engine.events import EndWord, Word, WordEvent

WORD_TOKEN = 0
PAD_TOKEN = 3


class WordAssembler:
    """Turns one stream's text tokens into Word / EndWord events.

    ``delay_tokens`` is the model's text delay D in steps (``asr_delay_in_tokens``: 6 for the 1B,
    32 for the 2.6B). A WORD token produced at 0-based step s is stamped (s + 1 − D) / frame_rate
    seconds, minus ``time_offset`` (e.g. a silence prefix the caller prepended and wants removed).
    """

    def __init__(
        self,
        delay_tokens: int,
        decode: Callable[[list[int]], str],
        frame_rate: float = 12.5,
        time_offset: float = 0.0,
    ) -> None:
        if isinstance(delay_tokens, bool) or not isinstance(delay_tokens, int) or delay_tokens < 0:
            raise ValueError(f"delay_tokens must be an integer >= 0, got {delay_tokens!r}")
        if not frame_rate > 0:
            raise ValueError(f"frame_rate must be > 0, got {frame_rate!r}")
        self.delay_tokens = delay_tokens
        self.frame_rate = float(frame_rate)
        self.time_offset = float(time_offset)
        self._decode = decode
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next token is the stream's step 0 again."""
        self.step_idx = 0  # steps seen so far
        self._pieces: list[int] = []  # pieces of the word being built
        self._unended = False  # a Word was emitted and its EndWord has not been
        self._last_stop_time = 0.0  # unshifted seconds of the last WORD token

    @property
    def pending_pieces(self) -> tuple[int, ...]:
        """Pieces of the word being built (not yet emitted)."""
        return tuple(self._pieces)

    def push(self, token: int) -> list[WordEvent]:
        """Account for the token predicted at this step; return the events it completes."""
        if token < 0:
            raise ValueError(f"text token ids are >= 0, got {token}")
        self.step_idx += 1
        if self.step_idx < self.delay_tokens:
            # The model has not yet seen D frames: its early tokens are fed back but not words.
            return []
        events: list[WordEvent] = []
        if token in (WORD_TOKEN, PAD_TOKEN):
            if self._pieces:
                events.append(self._emit_word())
        else:
            self._pieces.append(int(token))
        if token == WORD_TOKEN:
            stop_time = (self.step_idx - self.delay_tokens) / self.frame_rate
            if self._unended:
                events.append(EndWord(stop_time - self.time_offset))
                self._unended = False
            self._last_stop_time = stop_time
        return events

    def finish(self, end_time: float | None = None) -> list[WordEvent]:
        """Flush at the end of the stream: emit the pending word and the last EndWord.

        Without another WORD token the last word would never be ended (spec §4.3). The stream is
        over, so the last word ends no later than now: its stop time is the time a WORD token at
        the current step would have had, (steps − D) / frame_rate. ``end_time`` (seconds on the
        same clock as the events, i.e. after ``time_offset``) caps it, so a caller that knows
        where the audio ended can keep the padding it appended out of the last word; it never
        goes below the word's start. The assembler is left ready to continue (later tokens
        start a fresh word).
        """
        events: list[WordEvent] = []
        if self._pieces:
            events.append(self._emit_word())
        if self._unended:
            stop_time = max(self.step_idx - self.delay_tokens, 0) / self.frame_rate
            stop_time -= self.time_offset
            if end_time is not None:
                stop_time = min(stop_time, end_time)
            stop_time = max(stop_time, self._last_stop_time - self.time_offset)
            events.append(EndWord(stop_time))
            self._unended = False
        return events

    def _emit_word(self) -> Word:
        tokens = tuple(self._pieces)
        self._pieces.clear()
        self._unended = True
        return Word(self._decode(list(tokens)), self._last_stop_time - self.time_offset, tokens)
