"""Corpus transcription on Ray Data: ``dsm-stt transcribe --ray IN... -o OUT``.

Owns ``transcribe_corpus``: plan the outputs (the local command's names, ``output_paths``),
skip inputs whose output already exists (resume), decode the rest on CPU workers (``decode``:
the file's bytes, read with pyarrow's filesystems, so ``s3://`` or ``gs://`` inputs work where
pyarrow has the credentials; PyAV + soxr to 24 kHz float32, ``audio.load_audio``), transcribe
them on model actors (``Transcriber``: one engine per actor, one device each, a batch of files
sharing its slots through ``transcribe_files``, the local command's driver), write each
transcript as the local command renders it, and report progress and the total realtime factor
as results stream back. A file that fails (decode error, or its actor died) is retried
``attempts`` times in a later pass and, if it still fails, reported with its error: never
dropped.

The actors hand ``transcribe_files`` the decoded samples as 24 kHz float32 WAV files in a
temporary folder: it reads exactly those samples (no resampling at 24 kHz, float kept), so
outputs equal the local command's wherever the decoded samples do (always for 24 kHz inputs;
other rates go through soxr whole here and in chunks locally, which can differ in the last
bits). Not here: ``--split`` (pieces of one file across actors) and outputs on remote
filesystems (OUT is a local or shared folder).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..audio import SAMPLE_RATE, AudioDecodeError, load_audio
from ..transcriber import output_paths, scheduler_for, transcribe_files
from ..writers import EXTENSIONS, render

__all__ = ["CorpusReport", "Transcriber", "decode", "plan", "transcribe_corpus"]


@dataclass
class CorpusReport:
    """What a run did: files written, skipped (already done), failed (with their errors)."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def realtime_factor(self) -> float:
        """Seconds of audio transcribed per second of wall time (all actors together)."""
        return self.audio_seconds / self.wall_seconds if self.wall_seconds else 0.0


def plan(sources: Sequence[str], out_dir: Path, fmt: str) -> tuple[list[dict], list[str]]:
    """Rows to run (index, source, output path) and the sources whose output exists."""
    outs = output_paths([_local_name(s) for s in sources], out_dir, EXTENSIONS[fmt])
    rows, done = [], []
    for index, (source, out) in enumerate(zip(sources, outs, strict=True)):
        if out.exists() and out.stat().st_size > 0:
            done.append(source)
        else:
            rows.append({"index": index, "source": source, "out": str(out)})
    return rows, done


def _local_name(source: str) -> str:
    """A URI's path part, for naming its output as the local command names a path's."""
    return source.split("://", 1)[1] if "://" in source else source


def decode(row: dict[str, Any]) -> dict[str, Any]:
    """A CPU worker's task: the file's samples (24 kHz float32 mono), or its decode error."""
    source = row["source"]
    try:
        if "://" in source:
            import pyarrow.fs

            fs, path = pyarrow.fs.FileSystem.from_uri(source)
            with fs.open_input_file(path) as f:
                data: Any = f.read()
        else:
            data = source
        pcm = load_audio(data)
        error = ""
    except (AudioDecodeError, OSError) as exc:
        pcm, error = np.zeros(0, dtype=np.float32), str(exc)
    return row | {"pcm": pcm, "error": error}


class Transcriber:
    """A model actor: one engine, the batch of decoded files it is handed shares its slots."""

    def __init__(self, make_engine: Callable[[], Any], fmt: str) -> None:
        self.engine = make_engine()
        self.scheduler = scheduler_for(self.engine)
        self.prefix = float(self.engine.model.config.stt.audio_silence_prefix_seconds)
        self.fmt = fmt

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = [
            dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)
        ]
        out: dict[str, list] = {"index": [], "source": [], "out": [], "error": [], "seconds": []}

        def report(row: dict, error: str, seconds: float) -> None:
            for key, value in (("index", int(row["index"])), ("source", row["source"])):
                out[key].append(value)
            out["out"].append(row["out"])
            out["error"].append(error)
            out["seconds"].append(seconds)

        todo = [r for r in rows if not r["error"]]
        for r in rows:
            if r["error"]:
                report(r, str(r["error"]), 0.0)
        with tempfile.TemporaryDirectory() as tmp:
            paths = [_float_wav(Path(tmp) / f"{i}.wav", r["pcm"]) for i, r in enumerate(todo)]
            for result in transcribe_files(self.scheduler, paths, self.engine.name, self.prefix):
                row = todo[result.index]
                if result.error is not None:
                    report(row, result.error, 0.0)
                    continue
                target = Path(row["out"])
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(target.name + ".partial")
                partial.write_text(render(result.transcript, self.fmt), encoding="utf-8")
                os.replace(partial, target)  # a killed run never leaves a half output
                report(row, "", result.transcript.duration)
        return out


def _float_wav(path: Path, pcm: np.ndarray) -> Path:
    """``pcm`` as a 24 kHz float32 WAV (format 3, IEEE float): read back bit for bit."""
    data = np.asarray(pcm, dtype="<f4").tobytes()
    with open(path, "wb") as f:
        f.write(b"RIFF" + (36 + len(data)).to_bytes(4, "little") + b"WAVE")
        f.write(b"fmt " + (16).to_bytes(4, "little") + (3).to_bytes(2, "little"))
        f.write((1).to_bytes(2, "little") + SAMPLE_RATE.to_bytes(4, "little"))
        f.write((SAMPLE_RATE * 4).to_bytes(4, "little") + (4).to_bytes(2, "little"))
        f.write((32).to_bytes(2, "little") + b"data" + len(data).to_bytes(4, "little") + data)
    return path


def transcribe_corpus(
    sources: Sequence[str],
    out_dir: Path,
    fmt: str,
    make_engine: Callable[[], Any],
    actors: int = 1,
    slots: int = 8,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    decode_cpus: float = 1.0,
    attempts: int = 2,
    say: Callable[[str], None] | None = None,
) -> CorpusReport:
    """Transcribe ``sources`` into ``out_dir`` on the Ray this process is connected to.

    Resources: each actor takes ``cpus_per_actor`` CPUs (and ``gpus_per_actor`` GPUs); each
    decode task ``decode_cpus``: leave the decoders some CPUs beside the actors, or the
    pipeline waits for CPUs that never free (Ray Data does not preempt its actors)."""
    import ray.data

    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    rows, done = plan(list(sources), out_dir, fmt)
    report = CorpusReport(skipped=done)
    if done:
        say(f"{len(done)} file(s) already transcribed in {out_dir}: skipped")
    start = time.monotonic()
    total = len(rows)
    for attempt in range(1, attempts + 1):
        if not rows:
            break
        if attempt > 1:
            say(f"retrying {len(rows)} failed file(s) (attempt {attempt} of {attempts})")
        failed: dict[str, str] = {}
        retry: list[dict] = []
        dataset = (
            ray.data.from_items(rows, override_num_blocks=len(rows))
            .map(decode, num_cpus=decode_cpus)
            .map_batches(
                Transcriber,
                fn_constructor_args=(make_engine, fmt),
                batch_size=slots,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=cpus_per_actor,
                num_gpus=gpus_per_actor,
            )
        )
        try:
            for result in dataset.iter_rows():
                if result["error"]:
                    failed[result["source"]] = str(result["error"])
                    retry.append({k: result[k] for k in ("index", "source", "out")})
                    continue
                report.written.append(result["out"])
                report.audio_seconds += float(result["seconds"])
                wall = time.monotonic() - start
                say(
                    f"[{len(report.written)}/{total}] {result['source']}: "
                    f"{report.audio_seconds / max(wall, 1e-9):.1f}x realtime so far"
                )
        except Exception as exc:  # the job itself failed (actors lost past their restarts)
            written = set(report.written)
            for row in rows:
                if row["out"] not in written and row["source"] not in failed:
                    failed[row["source"]] = f"job failed: {exc}"
                    retry.append(row)
        rows = retry
        report.failed = failed
    report.wall_seconds = time.monotonic() - start
    for source, error in report.failed.items():
        say(f"failed: {source}: {error}")
    say(
        f"{len(report.written)} written, {len(report.skipped)} skipped, "
        f"{len(report.failed)} failed; {report.audio_seconds:.1f} s of audio in "
        f"{report.wall_seconds:.1f} s: {report.realtime_factor:.1f}x realtime"
    )
    return report
