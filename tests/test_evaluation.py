"""Word error rate on one's own audio: the samples found, the normalizers, the exact counts, the
report, and ``dsm-stt eval`` end to end on the tiny model with transcripts made to hold known
errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from server_support import speechlike, write_wav

from dsm_stt.cli import main
from dsm_stt.evaluation import (
    EvalError,
    Run,
    Sample,
    find_samples,
    normalizer,
    parse_stm,
    report,
    score,
    score_run,
    unmatched_audio,
)

pytest.importorskip("jiwer")
pytest.importorskip("whisper_normalizer")


# --------------------------------------------------------------------------------------------
# scoring


@pytest.mark.parametrize(
    ("reference", "hypothesis", "counts"),
    [
        # (hits, substitutions, deletions, insertions)
        ("the cat sat on the mat", "the cat sat on the mat", (6, 0, 0, 0)),
        ("the cat sat on the mat", "the bat sat the mat too", (4, 1, 1, 1)),
        ("a b c d", "", (0, 0, 4, 0)),
        ("", "x y", (0, 0, 0, 2)),
        ("one two three", "one two three four five", (3, 0, 0, 2)),
        ("one two three four", "two three", (2, 0, 2, 0)),
        ("one two three", "uno dos tres", (0, 3, 0, 0)),
    ],
)
def test_score_counts_exactly(reference: str, hypothesis: str, counts: tuple) -> None:
    s = score(reference, hypothesis)
    assert (s.hits, s.substitutions, s.deletions, s.insertions) == counts
    assert s.reference_words == len(reference.split())
    assert s.wer == (s.errors / s.reference_words if reference else None)


def test_normalizers() -> None:
    english = normalizer("english")
    s = score("Mr. Smith paid twenty-five dollars.", "mister smith paid $25", english)
    assert s.errors == 0 and s.reference == "mister smith paid $25"
    s = score(
        "Vingt-cinq euros, s'il vous plaît !", "25 euros s il vous plaît", normalizer("french")
    )
    assert s.errors == 0 and s.reference == "25 euros s il vous plaît"
    assert normalizer("basic")("Ça, C'est l'ÉTÉ!").split() == ["ça", "c", "est", "l", "été"]
    # none: the words as written, only the spacing evened out
    s = score("Hello,  World", "hello world", normalizer("none"))
    assert (s.substitutions, s.reference) == (2, "Hello, World")
    with pytest.raises(EvalError, match="unknown normalizer"):
        normalizer("klingon")


def test_corpus_wer_is_errors_over_words_not_a_mean() -> None:
    samples = [Sample(Path("a.wav"), "one two three four"), Sample(Path("b.wav"), "five")]
    results = [(0, "one two three four", 2.0, None), (1, "six", 1.0, None)]
    run = score_run("defaults", "cpu", samples, results, normalizer("none"), wall_seconds=1.5)
    total = run.total()
    assert (total.substitutions, total.reference_words) == (1, 5)
    assert total.wer == pytest.approx(0.2)  # the mean of the files' rates would be 0.5
    assert run.audio_seconds == 3.0 and run.failed == 0
    text = report([run], "none", Path())
    assert "WER  20.0% (1 sub, 0 del, 0 ins of 5 words), 2.0x real time" in text
    assert "b.wav" in text and "100.0%" in text
    # a file that could not be transcribed is a failure, not a perfect score
    failed = score_run("x", "cpu", samples, results[:1], normalizer("none"), 1.0)
    assert failed.failed == 1 and failed.total().reference_words == 4
    assert "b.wav" in report([failed], "none", Path()) and "failed" in report([failed], "none")


# --------------------------------------------------------------------------------------------
# finding the samples


def test_stm_segments() -> None:
    text = (
        ";; a comment\n"
        "talk 1 alice 3.5 5.0 <o,f0,female> and then\n"
        "talk 1 alice 0.0 3.5 <o,f0,female> first words\n"
        "talk 1 inter_segment_gap 5.0 6.0 <o,,unknown>\n"
        "talk 1 bob 6.0 7.0 ignore_time_segment_in_scoring\n"
        "talk 1 bob 7.0 9.0 last\n"
    )
    assert parse_stm(text) == [
        ("talk", 3.5, "and then"),
        ("talk", 0.0, "first words"),
        ("talk", 7.0, "last"),
    ]
    with pytest.raises(EvalError, match=r"x\.stm:2: an STM line is"):
        parse_stm(";;\nshort line\n", "x.stm")


def _touch_audio(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_wav(path, np.zeros(2400, np.float32))


def test_folder_layouts(tmp_path: Path) -> None:
    _touch_audio(tmp_path / "a.wav")
    (tmp_path / "a.txt").write_text("Hello\nthere  world\n", encoding="utf-8")
    _touch_audio(tmp_path / "sub" / "b.flac")
    (tmp_path / "sub" / "b.stm").write_text(
        "b 1 s 2.0 3.0 <o> second\nb 1 s 0.0 2.0 <o> first\n", encoding="utf-8"
    )
    _touch_audio(tmp_path / "libri" / "84-121-0000.wav")
    _touch_audio(tmp_path / "libri" / "84-121-0001.wav")
    (tmp_path / "libri" / "84-121.trans.txt").write_text(
        "84-121-0000 GO DO YOU HEAR\n84-121-0001 BUT IN LESS THAN FIVE MINUTES\n"
    )
    _touch_audio(tmp_path / "lonely.wav")  # no transcript: left out
    samples = find_samples(tmp_path)
    assert [(s.audio.relative_to(tmp_path).as_posix(), s.reference) for s in samples] == [
        ("a.wav", "Hello there world"),
        ("libri/84-121-0000.wav", "GO DO YOU HEAR"),
        ("libri/84-121-0001.wav", "BUT IN LESS THAN FIVE MINUTES"),
        ("sub/b.flac", "first second"),
    ]
    assert unmatched_audio(tmp_path) == [tmp_path / "lonely.wav"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EvalError, match="no audio with a transcript found"):
        find_samples(empty)
    with pytest.raises(EvalError, match="no such file or folder"):
        find_samples(tmp_path / "nope")


def test_manifests(tmp_path: Path) -> None:
    _touch_audio(tmp_path / "clips" / "one.mp3")
    _touch_audio(tmp_path / "two.wav")
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(
        '{"audio_filepath": "two.wav", "text": "two words", "duration": 0.1}\n\n'
        '{"path": "one.mp3", "sentence": "one"}\n'
    )
    assert [(s.audio, s.reference) for s in find_samples(jsonl)] == [
        (tmp_path / "two.wav", "two words"),
        (tmp_path / "clips" / "one.mp3", "one"),  # Common Voice keeps its clips in clips/
    ]
    tsv = tmp_path / "cv.tsv"
    tsv.write_text("client_id\tpath\tsentence\nx\tone.mp3\tSalut à tous\n", encoding="utf-8")
    assert find_samples(tsv) == [Sample(tmp_path / "clips" / "one.mp3", "Salut à tous")]
    csv = tmp_path / "m.csv"
    csv.write_text('file,transcript\ntwo.wav,"two, words"\n')
    assert find_samples(csv) == [Sample(tmp_path / "two.wav", "two, words")]
    stm = tmp_path / "all.stm"
    stm.write_text("two 1 s 0 1 <o> two words\n")
    assert find_samples(stm) == [Sample(tmp_path / "two.wav", "two words")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio": "two.wav"}\n')
    with pytest.raises(EvalError, match=r"bad\.jsonl:1: no text field"):
        find_samples(bad)
    with pytest.raises(EvalError, match="not a folder or a manifest"):
        find_samples(tmp_path / "two.wav")


# --------------------------------------------------------------------------------------------
# dsm-stt eval on the tiny model


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("eval")
    for seed, name in enumerate(("a", "b", "c"), 1):
        write_wav(folder / f"{name}.wav", speechlike(2.0, seed=seed))
    return folder


def _hypotheses(checkpoint: Path, folder: Path, capsys: pytest.CaptureFixture) -> list[str]:
    args = ["transcribe", "--model", str(checkpoint), "--exact", "--quiet", "--format", "json"]
    assert main([*args, *(str(folder / f"{n}.wav") for n in "abc")]) == 0
    return [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()]


def test_eval_end_to_end_counts_the_errors_put_in(
    tiny_checkpoint: Path, recordings: Path, capsys: pytest.CaptureFixture
) -> None:
    hyps = [h.split() for h in _hypotheses(tiny_checkpoint, recordings, capsys)]
    assert all(len(h) >= 2 for h in hyps), hyps
    a, b, c = hyps
    # a: the transcript itself; b: one word changed and two added (1 sub, 2 del); c: its first
    # word left out of the reference (1 ins). Each count is the only minimum: exact.
    (recordings / "a.txt").write_text(" ".join(a))
    (recordings / "b.stm").write_text(f"b 1 s 0.0 2.0 <o> qqq {' '.join(b[1:])} xxx yyy\n")
    (recordings / "c.txt").write_text(" ".join(c[1:]))
    args = ["eval", str(recordings), "--model", str(tiny_checkpoint), "--exact"]
    assert main([*args, "--normalizer", "none", "--json", "--compare", "--batch-size 1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in out["runs"]] == ["--exact", "--batch-size 1 --exact"]
    for run in out["runs"]:
        counts = [(f["substitutions"], f["deletions"], f["insertions"]) for f in run["files"]]
        assert counts == [(0, 0, 0), (1, 2, 0), (0, 0, 1)]
        assert [f["hypothesis"].split() for f in run["files"]] == hyps
        words = len(a) + len(b) + 2 + len(c) - 1
        assert run["reference_words"] == words and run["wer"] == pytest.approx(4 / words)
        assert run["audio_seconds"] == pytest.approx(6.0, abs=0.01)
        assert run["real_time"] > 0 and run["failed"] == 0
    # the tables: every file of both runs, then one line per run
    assert main([*args, "--normalizer", "none", "--compare", "--batch-size 1"]) == 0
    text = capsys.readouterr().out
    assert text.count("b.wav") == 2
    summary = text.splitlines()[-2:]
    assert all(
        f"WER {100 * 4 / words:5.1f}% (1 sub, 2 del, 1 ins of {words} words)" in line
        for line in summary
    ), summary
    assert all("x real time" in line for line in summary)


def test_eval_refuses_before_loading(
    recordings: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "m.jsonl"
    missing.write_text('{"audio": "gone.wav", "text": "hello"}\n')
    model = ["--model", str(tmp_path / "no-model")]  # would fail later, if it were reached
    assert main(["eval", str(missing), *model]) == 2
    assert capsys.readouterr().err.strip().endswith("gone.wav: no such file")
    assert main(["eval", str(recordings), "--compare", "--nope", *model]) == 2
    assert "--nope is not an engine flag" in capsys.readouterr().err
    assert main(["eval", str(recordings), "--compare", "--exact --quantize int8", *model]) == 2
    assert "--exact runs --quantize none" in capsys.readouterr().err
    run = Run("x", "cpu")
    assert run.total().wer is None and run.audio_seconds == 0
