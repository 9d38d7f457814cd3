from __future__ import annotations

from pathlib import Path

import pytest

from dsm_stt.model.synthetic import train_tokenizer
from dsm_stt.model.tokenizer import PlaceholderTokenizer, SentencePieceTokenizer, TokenizerError


@pytest.fixture(scope="module")
def spm(tmp_path_factory: pytest.TempPathFactory) -> SentencePieceTokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(path, 80)
    return SentencePieceTokenizer(path)


def test_structural_ids_are_dropped_like_the_official_code(spm: SentencePieceTokenizer) -> None:
    assert spm.vocab_size == 80
    ids = spm.encode("bado kefi")
    assert ids and min(ids) >= 4
    assert spm.decode(ids) == "bado kefi"
    # 0 = WORD marker, 1/2 = <s></s>, 3 = PAD: never text, wherever they appear
    assert spm.decode([0, *ids[:1], 3, 1, *ids[1:], 2]) == "bado kefi"
    assert spm.decode([0, 1, 2, 3]) == ""
    assert spm.decode([]) == ""


def test_bad_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        SentencePieceTokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"garbage")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        SentencePieceTokenizer(bad)


def test_placeholder_tokenizer_is_deterministic_words() -> None:
    tok = PlaceholderTokenizer(8000)
    text = tok.decode([0, 5, 6, 7, 3, 10, 11])
    assert text == tok.decode([5, 6, 7, 10, 11])
    assert len(text.split()) == 2  # ids 5 and 10 start words
    assert tok.decode([0, 1, 2, 3]) == ""
