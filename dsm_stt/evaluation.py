"""Word error rate on one's own recordings: which configuration to run, chosen with numbers.

Owns what ``dsm-stt eval`` does besides transcribing:

- finding the samples (``find_samples``): a folder of audio files, each with a transcript of
  the same stem beside it (``talk.wav`` + ``talk.txt``, or ``talk.stm``), LibriSpeech's
  ``*.trans.txt`` files (``ID text`` lines for ``ID.flac``), or a manifest: JSON lines or a
  CSV/TSV table with a column for the audio path (``audio``, ``audio_filepath``, ``path``,
  ``file``...) and one for the text (``text``, ``transcript``, ``sentence``...), paths relative
  to the manifest;
- normalizing both sides before counting (``normalizer``): Whisper's English or French text
  normalizers from the maintained ``whisper-normalizer`` package (case, punctuation, numbers,
  spellings), a basic one for any language, or none;
- scoring (``score``): the word-level alignment of ``jiwer`` (minimum edit distance), its
  substitutions, deletions, insertions and hits per file, and the corpus WER of a run (the sum
  of the errors over the sum of the reference words, not a mean of per-file rates);
- one run (``run``): a configuration's engine over the samples, its wall time, its scores;
- the report (``report`` for people, ``as_dict`` for ``--json``): per file and per run, with
  the run's speed as ``N.Nx real time``; two runs (``--compare``) one above the other.

``jiwer`` and ``whisper-normalizer`` are the optional ``eval`` extra; without them this module
imports, and ``normalizer`` / ``score`` raise ``EvalError`` saying what to install. The
transcription itself is ``transcriber.transcribe_files``, as for ``dsm-stt transcribe``.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .progress import Progress, clock, speed

if TYPE_CHECKING:
    from .engine.engine import Engine

# What ``find_samples`` takes for audio in a folder (anything FFmpeg reads works in a manifest).
AUDIO_EXTENSIONS = frozenset(
    [
        ".wav",
        ".flac",
        ".mp3",
        ".ogg",
        ".opus",
        ".m4a",
        ".aac",
        ".wma",
        ".aif",
        ".aiff",
        ".webm",
        ".mp4",
        ".mkv",
        ".mov",
        ".sph",
    ]
)
PATH_KEYS = ("audio", "audio_filepath", "audio_path", "path", "file", "file_name", "filename")
TEXT_KEYS = ("text", "transcript", "transcription", "sentence", "reference", "normalized_text")
NORMALIZERS = ("english", "french", "basic", "none")
INSTALL = (
    "pip install jiwer whisper-normalizer (or, in a source checkout of dsm-stt, "
    "pip install '.[eval]')"
)


class EvalError(ValueError):
    """Data or tools that make an evaluation impossible; the message says what to do."""


@dataclass(frozen=True)
class Sample:
    """One recording and what was said in it."""

    audio: Path
    reference: str


# --------------------------------------------------------------------------------------------
# finding the samples


def find_samples(source: str | os.PathLike) -> list[Sample]:
    """The samples of a folder (audio + same-stem ``.txt`` / ``.stm``, or LibriSpeech's
    ``*.trans.txt``) or of a manifest (``.jsonl``, ``.json``, ``.csv``, ``.tsv``), in path
    order for a folder and file order for a manifest. Audio without a transcript in a folder
    is left out (``unmatched_audio`` lists it)."""
    path = Path(source)
    if not path.exists():
        raise EvalError(f"{path}: no such file or folder")
    if path.is_dir():
        samples = _folder(path)
    elif path.suffix.lower() in (".jsonl", ".json"):
        samples = _jsonl(path)
    elif path.suffix.lower() in (".csv", ".tsv"):
        samples = _table(path)
    elif path.suffix.lower() == ".stm":
        samples = _stm_manifest(path)
    else:
        raise EvalError(
            f"{path}: not a folder or a manifest (.jsonl, .csv, .tsv, .stm); a folder holds "
            "audio files with same-stem .txt or .stm transcripts"
        )
    if not samples:
        raise EvalError(f"{path}: no audio with a transcript found ({_layout_hint()})")
    return samples


def unmatched_audio(folder: str | os.PathLike) -> list[Path]:
    """Audio files of ``folder`` that ``find_samples`` leaves out: no transcript beside them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    kept = {s.audio for s in _folder(folder)}
    return [p for p in _audio_files(folder) if p not in kept]


def _layout_hint() -> str:
    return (
        "expected audio files with same-stem .txt or .stm transcripts, LibriSpeech "
        "*.trans.txt files, or a manifest with an audio path and a text per line"
    )


def _audio_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()
    )


def _folder(folder: Path) -> list[Sample]:
    samples: dict[Path, Sample] = {}
    for trans in sorted(folder.rglob("*.trans.txt")):  # LibriSpeech: "ID TEXT" per line
        by_stem = {
            p.stem: p for p in trans.parent.iterdir() if p.suffix.lower() in AUDIO_EXTENSIONS
        }
        for line in _read_text(trans).splitlines():
            key, _, text = line.strip().partition(" ")
            if key in by_stem:
                samples[by_stem[key]] = Sample(by_stem[key], text.strip())
    for audio in _audio_files(folder):
        if audio in samples:
            continue
        txt, stm = audio.with_suffix(".txt"), audio.with_suffix(".stm")
        if txt.is_file():
            samples[audio] = Sample(audio, " ".join(_read_text(txt).split()))
        elif stm.is_file():
            samples[audio] = Sample(audio, _stm_text(_read_text(stm), stm))
    return [samples[p] for p in sorted(samples)]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EvalError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise EvalError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def parse_stm(text: str, where: Path | str = "<stm>") -> list[tuple[str, float, str]]:
    """The scored segments of an STM file (NIST's segment time marks) as ``(file, begin,
    words)``: ``;;`` comments, ``ignore_time_segment_in_scoring`` and ``inter_segment_gap``
    segments left out, a ``<label>`` field skipped."""
    segments = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(";;"):
            continue
        fields = line.split()
        if len(fields) < 5:
            raise EvalError(
                f"{where}:{number}: an STM line is 'file channel speaker begin end [<label>] "
                f"words', got {line!r}"
            )
        name, _, speaker, begin = fields[:4]
        words = fields[5:]
        if words and words[0].startswith("<") and words[0].endswith(">"):
            words = words[1:]
        if speaker == "inter_segment_gap" or words == ["ignore_time_segment_in_scoring"]:
            continue
        try:
            start = float(begin)
        except ValueError:
            raise EvalError(f"{where}:{number}: begin time {begin!r} is not a number") from None
        segments.append((name, start, " ".join(words)))
    return segments


def _stm_text(text: str, where: Path) -> str:
    segments = sorted(parse_stm(text, where), key=lambda s: s[1])
    return " ".join(words for _, _, words in segments if words)


def _stm_manifest(path: Path) -> list[Sample]:
    """One STM for many recordings: each segment's file field names audio beside the STM."""
    by_file: dict[str, list[tuple[float, str]]] = {}
    for name, start, words in parse_stm(_read_text(path), path):
        by_file.setdefault(name, []).append((start, words))
    audio = {p.stem: p for p in _audio_files(path.parent)}
    samples = []
    for name, segments in by_file.items():
        if name not in audio:
            raise EvalError(f"{path}: no audio file named {name}.* beside it")
        text = " ".join(w for _, w in sorted(segments) if w)
        samples.append(Sample(audio[name], text))
    return samples


def _pick(row: Mapping[str, Any], keys: Sequence[str], what: str, where: str) -> str:
    lowered = {str(k).strip().lower(): v for k, v in row.items()}
    for key in keys:
        if key in lowered and lowered[key] is not None:
            return str(lowered[key])
    raise EvalError(f"{where}: no {what} field (one of {', '.join(keys)}); found {sorted(row)}")


def _manifest_audio(manifest: Path, value: str) -> Path:
    audio = Path(os.path.expanduser(value))
    if not audio.is_absolute():
        for base in (manifest.parent, manifest.parent / "clips"):  # Common Voice: clips/
            if (base / audio).exists():
                return base / audio
        audio = manifest.parent / audio
    return audio


def _jsonl(path: Path) -> list[Sample]:
    text = _read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON list of objects
        try:
            rows = json.loads(stripped)
        except ValueError as exc:
            raise EvalError(f"{path}: not valid JSON ({exc})") from exc
        numbered = [(i + 1, r) for i, r in enumerate(rows)]
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except ValueError as exc:
                raise EvalError(f"{path}:{number}: not a JSON object ({exc})") from exc
    samples = []
    for number, row in numbered:
        where = f"{path}:{number}"
        if not isinstance(row, dict):
            raise EvalError(f"{where}: expected a JSON object with an audio path and a text")
        audio = _pick(row, PATH_KEYS, "audio path", where)
        samples.append(Sample(_manifest_audio(path, audio), _pick(row, TEXT_KEYS, "text", where)))
    return samples


def _table(path: Path) -> list[Sample]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows = csv.DictReader(_read_text(path).splitlines(), delimiter=delimiter)
    samples = []
    for number, row in enumerate(rows, 2):
        where = f"{path}:{number}"
        audio = _pick(row, PATH_KEYS, "audio path", where)
        samples.append(Sample(_manifest_audio(path, audio), _pick(row, TEXT_KEYS, "text", where)))
    return samples


# --------------------------------------------------------------------------------------------
# normalizing and scoring


def normalizer(name: str) -> Callable[[str], str]:
    """The text normalizer ``name`` (one of ``NORMALIZERS``), applied to both sides."""
    if name not in NORMALIZERS:
        raise EvalError(f"unknown normalizer {name!r} (one of {', '.join(NORMALIZERS)})")
    if name == "none":
        return lambda text: " ".join(text.split())
    try:
        if name == "english":
            from whisper_normalizer.english import EnglishTextNormalizer

            return EnglishTextNormalizer()
        if name == "french":
            from whisper_normalizer.international import FrenchTextNormalizer

            return FrenchTextNormalizer()
        from whisper_normalizer.basic import BasicTextNormalizer

        return BasicTextNormalizer()
    except ImportError as exc:
        raise EvalError(f"the {name} normalizer needs whisper-normalizer: {INSTALL}") from exc


@dataclass(frozen=True)
class Score:
    """The word errors of one hypothesis against its reference (both normalized)."""

    reference: str
    hypothesis: str
    hits: int
    substitutions: int
    deletions: int
    insertions: int

    @property
    def reference_words(self) -> int:
        return self.hits + self.substitutions + self.deletions

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float | None:
        """Errors per reference word (None without reference words)."""
        return self.errors / self.reference_words if self.reference_words else None


def score(reference: str, hypothesis: str, normalize: Callable[[str], str] | None = None) -> Score:
    """Align ``hypothesis`` with ``reference`` word by word (after ``normalize``) and count."""
    try:
        import jiwer
    except ImportError as exc:
        raise EvalError(f"scoring needs jiwer: {INSTALL}") from exc
    ref = " ".join((normalize(reference) if normalize else reference).split())
    hyp = " ".join((normalize(hypothesis) if normalize else hypothesis).split())
    out = jiwer.process_words(ref, hyp)
    return Score(ref, hyp, out.hits, out.substitutions, out.deletions, out.insertions)


def alignment(item: Score) -> str:
    """jiwer's three-line picture of the alignment (REF, HYP, and S/D/I marks)."""
    import jiwer

    out = jiwer.process_words(item.reference, item.hypothesis)
    lines = jiwer.visualize_alignment(out, show_measures=False).splitlines()
    return "\n".join(line for line in lines if line.strip() and not line.startswith("==="))


@dataclass(frozen=True)
class FileScore:
    sample: Sample
    text: str = ""  # the transcript as the model wrote it
    score: Score | None = None  # None when the file could not be transcribed
    duration: float = 0.0  # seconds of audio
    error: str | None = None


@dataclass(frozen=True)
class Run:
    """One configuration over every sample."""

    label: str  # how the user asked for it ("this run", "--compare '--exact'")
    engine: str  # the path that ran (``Plan.describe``)
    files: list[FileScore] = field(default_factory=list)
    wall_seconds: float = 0.0  # transcription only, the model's load excluded

    def total(self) -> Score:
        scores = [f.score for f in self.files if f.score is not None]
        return Score(
            "",
            "",
            sum(s.hits for s in scores),
            sum(s.substitutions for s in scores),
            sum(s.deletions for s in scores),
            sum(s.insertions for s in scores),
        )

    @property
    def audio_seconds(self) -> float:
        return sum(f.duration for f in self.files if f.score is not None)

    @property
    def failed(self) -> int:
        return sum(f.score is None for f in self.files)


def score_run(
    label: str,
    engine: str,
    samples: Sequence[Sample],
    results: Iterable[tuple[int, str | None, float, str | None]],
    normalize: Callable[[str], str],
    wall_seconds: float,
) -> Run:
    """A ``Run`` from transcription results ``(sample index, text, seconds of audio, error)``;
    a sample without a result counts as failed."""
    got: dict[int, FileScore] = {}
    for index, text, duration, error in results:
        sample = samples[index]
        if error is not None or text is None:
            got[index] = FileScore(sample, duration=duration, error=error or "no transcript")
        else:
            got[index] = FileScore(sample, text, score(sample.reference, text, normalize), duration)
    files = [got.get(i, FileScore(s, error="not transcribed")) for i, s in enumerate(samples)]
    return Run(label, engine, files, wall_seconds)


def run(
    label: str,
    engine: Engine,
    samples: Sequence[Sample],
    indices: Sequence[int],
    normalize: Callable[[str], str],
    progress: Progress | None = None,
    failures: Mapping[int, str] | None = None,
) -> Run:
    """Transcribe ``samples[i]`` for each of ``indices`` with ``engine`` (all its slots busy,
    as ``dsm-stt transcribe``) and score them; ``failures`` are the samples known not to
    decode (by index: why). The wall time counts the transcription only."""
    from .transcriber import scheduler_for, transcribe_files

    results: list[tuple[int, str | None, float, str | None]] = [
        (i, None, 0.0, why) for i, why in (failures or {}).items()
    ]
    start = time.perf_counter()
    for r in transcribe_files(
        scheduler_for(engine),
        [samples[i].audio for i in indices],
        engine.name,
        engine.model.config.stt.audio_silence_prefix_seconds,
        on_step=None if progress is None else progress.step,
    ):
        duration = 0.0 if r.transcript is None else r.transcript.duration
        if progress is not None:
            progress.finish(r.index, duration=duration if r.error is None else None, error=r.error)
        text = None if r.transcript is None else r.transcript.text
        results.append((indices[r.index], text, duration, r.error))
    wall = time.perf_counter() - start
    describe = f"{engine.name} on {engine.plan.describe(reason=False)}"
    return score_run(label, describe, samples, results, normalize, wall)


# --------------------------------------------------------------------------------------------
# reporting


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _name(sample: Sample, root: Path | None) -> str:
    if root is not None:
        try:
            return str(sample.audio.relative_to(root))
        except ValueError:
            pass
    return str(sample.audio)


def report(
    runs: Sequence[Run], normalizer_name: str, root: Path | None = None, alignments: bool = False
) -> str:
    """The per-file table of every run, then one summary line per run."""
    if not runs:
        return ""
    names = [_name(f.sample, root) for f in runs[0].files]
    width = max(12, *(len(n) for n in names)) if names else 12
    lines = []
    for run in runs:
        lines.append(f"{run.label}: {run.engine}")
        lines.append(
            f"  {'file':<{width}} {'words':>6} {'sub':>5} {'del':>5} {'ins':>5} {'WER':>7}"
        )
        for name, f in zip(names, run.files, strict=True):
            if f.score is None:
                lines.append(f"  {name:<{width}} failed: {f.error}")
                continue
            s = f.score
            lines.append(
                f"  {name:<{width}} {s.reference_words:>6} {s.substitutions:>5} "
                f"{s.deletions:>5} {s.insertions:>5} {_rate(s.wer):>7}"
            )
            if alignments:
                lines.extend("    " + line for line in alignment(s).splitlines())
        lines.append("")
    audio = runs[0].audio_seconds
    lines.append(
        f"{len(runs[0].files)} files, {clock(audio)} of audio, normalizer {normalizer_name}; "
        "WER = (substitutions + deletions + insertions) / reference words"
    )
    label_width = max(len(r.label) for r in runs)
    for run in runs:
        t = run.total()
        failed = f", {run.failed} failed" if run.failed else ""
        lines.append(
            f"  {run.label:<{label_width}}  WER {_rate(t.wer):>6} ({t.substitutions} sub, "
            f"{t.deletions} del, {t.insertions} ins of {t.reference_words} words), "
            f"{speed(run.audio_seconds, run.wall_seconds)}{failed}"
        )
    return "\n".join(lines)


def as_dict(runs: Sequence[Run], normalizer_name: str) -> dict[str, Any]:
    """Everything ``report`` shows, for ``--json``."""

    def counts(s: Score) -> dict[str, Any]:
        return {
            "reference_words": s.reference_words,
            "substitutions": s.substitutions,
            "deletions": s.deletions,
            "insertions": s.insertions,
            "wer": s.wer,
        }

    out: dict[str, Any] = {"normalizer": normalizer_name, "runs": []}
    for run in runs:
        files = []
        for f in run.files:
            item: dict[str, Any] = {"audio": str(f.sample.audio), "duration": f.duration}
            if f.score is None:
                item["error"] = f.error
            else:
                item |= counts(f.score) | {
                    "text": f.text,
                    "reference": f.score.reference,
                    "hypothesis": f.score.hypothesis,
                }
            files.append(item)
        ratio = run.audio_seconds / run.wall_seconds if run.wall_seconds > 0 else None
        out["runs"].append(
            {"label": run.label, "engine": run.engine}
            | counts(run.total())
            | {
                "audio_seconds": round(run.audio_seconds, 3),
                "wall_seconds": round(run.wall_seconds, 3),
                "real_time": ratio,
                "failed": run.failed,
                "files": files,
            }
        )
    return out
