"""Text tokenizers: turning the LM's text-token ids back into text.

Owns the SentencePiece wrapper used with the published checkpoints and a placeholder tokenizer
for random-weight models (benchmarks, smoke tests). Both follow the official rule (spec §1.7):
ids 0..3 are structural (WORD marker, <s>, </s>, PAD) and are dropped before decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

STRUCTURAL_IDS = 4  # ids below this are never text


class Tokenizer(Protocol):
    vocab_size: int

    def decode(self, ids: Sequence[int]) -> str: ...


class TokenizerError(RuntimeError):
    """The tokenizer file cannot be read."""


class SentencePieceTokenizer:
    """SentencePiece model file (``tokenizer_en_fr_audio_8000.model`` …)."""

    def __init__(self, path: str | Path) -> None:
        import sentencepiece

        self.path = Path(path)
        if not self.path.exists():
            raise TokenizerError(f"tokenizer file not found: {self.path}")
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except Exception as exc:  # sentencepiece raises OSError/RuntimeError variants
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({exc})") from exc
        self.vocab_size = self._sp.GetPieceSize()

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([i for i in ids if STRUCTURAL_IDS <= i < self.vocab_size])

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)


_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


class PlaceholderTokenizer:
    """Deterministic stand-in for random-weight models: id → a syllable, every 5th id starts a
    new word. It makes random models produce readable (meaningless) words."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def piece(self, i: int) -> str:
        syllable = _SYLLABLES[i % len(_SYLLABLES)]
        return (" " if i % 5 == 0 else "") + syllable

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.piece(i) for i in ids if i >= STRUCTURAL_IDS).strip()
