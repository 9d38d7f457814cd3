"""Third-party file clients, unmodified, against ``dsm-stt serve``, several at once.

* ``--dsm-repo DIR``: a checkout of kyutai-labs/delayed-streams-modeling; its
  ``scripts/stt_from_file_rust_server.py`` runs with ``--rtf 1000`` (as fast as the server takes
  the audio). It needs ``msgpack``, ``numpy``, ``sphn`` and ``websockets``.
* ``--unmute-repo DIR``: a checkout of kyutai-labs/unmute; its
  ``unmute/scripts/stt_from_file_example.py`` runs with the checkout on ``PYTHONPATH`` and
  ``KYUTAI_STT_URL`` pointing at the server. The script paces itself at real time (it has no
  speed option), so it takes as long as its file. It imports the ``unmute`` package, whose
  dependencies (``fastrtc`` pinned with its ``gradio``, ``sphn``, ``pydantic``...) conflict
  with this project's: give it its own interpreter with ``--unmute-python``.

``--clients N`` copies of each script run at the same time, each on its own generated WAV file
(0.5 s of silence, ``--seconds`` of speech-like sound, 1 s of silence, 24 kHz). Every client's
words (text and start time, to the centisecond the scripts print) must equal those of a solo
run of this project's own client (``dsm_stt.client.stream_audio``) sending the same audio as
that script before its end-of-stream Marker. A client fails if it exits non-zero, is
disconnected, times out or prints other words. Nothing is downloaded: both repositories are
local checkouts, and a missing package is named before the server starts.

The server is ``dsm-stt serve`` on the tests' talkative tiny checkpoint (its words follow the
audio: ``tests/server_support.py``) with ``--exact --api-key public_token`` (the key both
scripts send), or ``--serve "ARGS"``. Prints a JSON summary; exit status 1 on any failure,
2 when something needed is missing. (On a server slower than real time a client at full speed
can time itself out: its own keepalive pings wait behind the audio the server has not read yet;
see docs/reliability.md.)

    python bench/third_party.py --dsm-repo ../delayed-streams-modeling \\
        --unmute-repo ../unmute --unmute-python ../unmute/.venv/bin/python --clients 3
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

KYUTAI_SCRIPT = Path("scripts/stt_from_file_rust_server.py")
UNMUTE_SCRIPT = Path("unmute/scripts/stt_from_file_example.py")
DEFAULT_KEY = "public_token"  # what both scripts send in ``kyutai-api-key``
DEFAULT_PATH = "/api/asr-streaming"  # both scripts append this path to their server URL
UNMUTE_HINT = (
    "; Unmute's pinned dependencies conflict with this project's, so an interpreter of its own"
    " (--unmute-python) is the usual way"
)
DISCONNECT = re.compile(
    r"ConnectionClosed|ConnectionReset|IncompleteRead|keepalive ping timeout|no close frame"
    r"|BrokenPipe|InvalidStatus|InvalidMessage"
)

Words = list[tuple[str, float]]


@dataclass(frozen=True)
class Client:
    """One run of a third-party script on one WAV file."""

    kind: str  # "kyutai" or "unmute"
    index: int
    repo: Path
    python: str
    wav: Path

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.index}"

    @property
    def script(self) -> Path:
        return self.repo / (KYUTAI_SCRIPT if self.kind == "kyutai" else UNMUTE_SCRIPT)

    @property
    def silence_before(self) -> float:
        """Seconds of silence the script sends before the file."""
        return 1.0 if self.kind == "kyutai" else 0.0

    @property
    def silence_after(self) -> float:
        """Seconds of silence the script sends after the file, before its Marker."""
        return 5.0 if self.kind == "kyutai" else 0.0

    def command(self, base_url: str, api_key: str | None) -> list[str]:
        if self.kind == "kyutai":
            cmd = [self.python, str(self.script), str(self.wav), "--url", base_url]
            cmd += ["--rtf", "1000"]
            return cmd + (["--api-key", api_key] if api_key else [])
        return [self.python, str(self.script), str(self.wav)]

    def env(self, base_url: str) -> dict[str, str]:
        env = dict(os.environ)
        if self.kind == "unmute":
            env["KYUTAI_STT_URL"] = base_url
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(self.repo), env.get("PYTHONPATH")) if p
            )
        return env

    def parse(self, stdout: str) -> Words:
        return parse_kyutai(stdout) if self.kind == "kyutai" else parse_unmute(stdout)


# --------------------------------------------------------------------------------------------
# what the scripts print


_KYUTAI_ROW = re.compile(r"^\s*(-?\d+\.\d+) -\s*(-?\d+\.\d+)(?:  (.*))?$")
_UNMUTE_ROW = re.compile(r"^type='Word' text=(.+) start_time=(\S+)$")


def parse_kyutai(stdout: str) -> Words:
    """Kyutai's file client: the words as they come on one line, two line breaks, then one
    ``start - stop  text`` row per word (times with two decimals)."""
    _, _, table = stdout.partition("\n\n")
    words = []
    for line in table.splitlines():
        m = _KYUTAI_ROW.match(line)
        if m:
            words.append(((m.group(3) or "").strip(), float(m.group(1))))
    return words


def parse_unmute(stdout: str) -> Words:
    """Unmute's file example: one ``type='Word' text='...' start_time=...`` line per word
    (pydantic's ``str`` of its message), other lines ignored."""
    words = []
    for line in stdout.splitlines():
        m = _UNMUTE_ROW.match(line.strip())
        if m:
            words.append((str(ast.literal_eval(m.group(1))).strip(), round(float(m.group(2)), 2)))
    return words


def compare(got: Words, expected: Words) -> dict:
    """Equal or not, and where the first difference is."""
    out: dict = {"words": len(got), "expected_words": len(expected), "equal": got == expected}
    if got != expected:
        i = next(
            (k for k, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
            min(len(got), len(expected)),
        )
        out["first_difference"] = {
            "index": i,
            "got": list(got[i]) if i < len(got) else None,
            "expected": list(expected[i]) if i < len(expected) else None,
        }
    return out


def verdict(result: dict) -> list[str]:
    """The reasons a client's run failed (empty: it passed)."""
    problems = []
    if result.get("timed_out"):
        problems.append("timed out")
    if result["exit_code"] != 0:
        problems.append(f"exit code {result['exit_code']}")
    if result["disconnected"]:
        problems.append("disconnected")
    if result.get("solo_error"):
        problems.append(f"the solo run of our own client failed: {result['solo_error']}")
    elif result["expected_words"] == 0:
        problems.append("the solo run heard no words: nothing to compare")
    if not result["equal"]:
        problems.append(f"{result['words']} words printed, {result['expected_words']} expected")
    return problems


# --------------------------------------------------------------------------------------------
# checks before anything starts


_IMPORT_CHECK = r"""
import ast, importlib, sys
names = []
for node in ast.parse(open(sys.argv[1], encoding="utf-8").read()).body:
    if isinstance(node, ast.Import):
        names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names.append(node.module)
for name in names:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        print("MISSING", exc.name or name)
        sys.exit(3)
    except Exception as exc:
        print("FAILED", name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        sys.exit(4)
"""


def check_client(client: Client) -> str | None:
    """None if ``client.python`` can import what the script imports, else a message."""
    if not client.script.is_file():
        return f"{client.kind}: {client.script} not found (is {client.repo} a checkout?)"
    proc = subprocess.run(
        [client.python, "-c", _IMPORT_CHECK, str(client.script)],
        capture_output=True,
        text=True,
        env=client.env("ws://127.0.0.1:9"),
        cwd=client.repo,
        timeout=300,
    )
    if proc.returncode == 0:
        return None
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    if last.startswith("MISSING "):
        module = last.split()[1]
        return (
            f"{client.kind}: {client.script.name} needs the missing package providing "
            f"'{module}' in {client.python} (install it there, e.g. pip install "
            f"{module.split('.')[0]})" + (UNMUTE_HINT if client.kind == "unmute" else "")
        )
    detail = last or (proc.stderr.strip().splitlines() or ["?"])[-1]
    return f"{client.kind}: importing what {client.script.name} needs failed in {client.python}: {detail}"


def checkout_commit(repo: Path) -> str | None:
    proc = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


# --------------------------------------------------------------------------------------------
# the runs


async def solo_words(url: str, pcm: np.ndarray, api_key: str | None) -> Words:
    from dsm_stt.client import stream_audio
    from dsm_stt.server.protocol import Word

    return [
        (m.text.strip(), round(m.start_time, 2))
        async for m in stream_audio(url, pcm, api_key=api_key, rtf=1000.0)
        if isinstance(m, Word)
    ]


async def run_client(client: Client, base_url: str, api_key: str | None, timeout: float) -> dict:
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *client.command(base_url, api_key),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=client.env(base_url),
        cwd=client.repo,
    )
    timed_out = False
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        timed_out = True
        proc.kill()
        out, err = await proc.communicate()
    stdout = out.decode("utf-8", "replace")
    stderr = err.decode("utf-8", "replace")
    tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:]
    return {
        "client": client.name,
        "exit_code": proc.returncode,
        "timed_out": timed_out,
        "disconnected": bool(DISCONNECT.search(stderr)),
        "seconds": round(time.monotonic() - start, 1),
        "words_printed": client.parse(stdout),
        "stderr_last_line": tail[0][:300] if tail else None,
    }


def wait_for_free_slots(server: object, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        used = server.used_slots()  # type: ignore[attr-defined]
        if used == 0 or time.monotonic() > deadline:
            return used
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsm-repo", type=Path, help="a delayed-streams-modeling checkout")
    parser.add_argument("--unmute-repo", type=Path, help="an unmute checkout")
    parser.add_argument("--dsm-python", default=sys.executable, help="runs Kyutai's script")
    parser.add_argument("--unmute-python", default=sys.executable, help="runs Unmute's script")
    parser.add_argument("--clients", type=int, default=3, help="copies of each script at once")
    parser.add_argument("--seconds", type=float, default=30.0, help="speech per WAV file")
    parser.add_argument("--serve", help="dsm-stt serve arguments (default: talkative tiny)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per client, seconds")
    args = parser.parse_args(argv)
    if args.dsm_repo is None and args.unmute_repo is None:
        parser.error("give --dsm-repo and/or --unmute-repo")
    if args.clients < 1 or args.seconds <= 0:
        parser.error("--clients must be >= 1 and --seconds > 0")
    with tempfile.TemporaryDirectory(prefix="third_party_") as folder:
        return bench(args, Path(folder))


def bench(args: argparse.Namespace, folder: Path) -> int:
    """The checks, the WAV files, the server, the solo runs, the clients, the summary."""
    kinds = [
        (kind, repo.resolve(), python)
        for kind, repo, python in (
            ("kyutai", args.dsm_repo, args.dsm_python),
            ("unmute", args.unmute_repo, args.unmute_python),
        )
        if repo is not None
    ]
    clients = [
        Client(kind, k, repo, python, folder / f"{kind}-{k}.wav")
        for kind, repo, python in kinds
        for k in range(args.clients)
    ]
    problems = {p for c in {c.kind: c for c in clients}.values() if (p := check_client(c))}
    if problems:
        for problem in sorted(problems):
            print(problem, file=sys.stderr)
        return 2

    from server_support import (
        ServerProcess,
        silence,
        speechlike,
        write_talkative_checkpoint,
        write_wav,
    )

    from dsm_stt.audio import load_audio

    for n, client in enumerate(clients):
        pcm = np.concatenate([silence(0.5), speechlike(args.seconds, seed=20 + n), silence(1.0)])
        write_wav(client.wav, pcm)
    if args.serve is None:
        checkpoint = write_talkative_checkpoint(folder / "ckpt")
        serve = ["--model", str(checkpoint), "--exact", "--api-key", DEFAULT_KEY]
        serve += ["--batch-size", str(max(2, len(clients)))]
        serve_label = "talkative tiny checkpoint " + shlex.join(serve[2:])
    else:
        serve = shlex.split(args.serve)
        serve_label = args.serve
    server = ServerProcess(serve, folder / "server.log")
    try:
        if not server.url.endswith(DEFAULT_PATH):
            raise SystemExit(f"--serve: the scripts only use the path {DEFAULT_PATH}")
        base_url = server.url[: -len(DEFAULT_PATH)]
        expected: dict[str, Words] = {}
        solo_errors: dict[str, str] = {}
        for client in clients:  # one at a time: nothing else on the server
            pcm = load_audio(client.wav)
            before, after = silence(client.silence_before), silence(client.silence_after)
            signal = np.concatenate([before, pcm, after])
            try:
                expected[client.name] = asyncio.run(solo_words(server.url, signal, server.api_key))
            except Exception as exc:  # reported: the third-party clients still run
                solo_errors[client.name] = f"{type(exc).__name__}: {exc}"[:300]
                expected[client.name] = []
        wait_for_free_slots(server)

        async def all_clients() -> list[dict]:
            runs = (run_client(c, base_url, server.api_key, args.timeout) for c in clients)
            return await asyncio.gather(*runs)

        start = time.monotonic()
        runs = asyncio.run(all_clients())
        wall = time.monotonic() - start
        used_after = wait_for_free_slots(server)
        log_tail = server.log()[-1500:]
    finally:
        server_exit = server.stop()

    results = []
    for run in runs:
        words = run.pop("words_printed")
        result = run | compare(words, expected[run["client"]])
        if run["client"] in solo_errors:
            result["solo_error"] = solo_errors[run["client"]]
        result["problems"] = verdict(result)
        if not result["problems"]:
            result.pop("stderr_last_line")
        results.append(result)
    failed = [r["client"] for r in results if r["problems"]]
    if used_after:
        failed.append(f"{used_after} slots still used after every client ended")
    if server_exit != 0:
        failed.append(f"the server exited with {server_exit} on SIGTERM")
    audio_seconds = round(args.seconds + 1.5, 1)
    summary = {
        "serve": serve_label,
        "scripts": {
            kind: {"script": str(KYUTAI_SCRIPT if kind == "kyutai" else UNMUTE_SCRIPT)}
            | {"commit": checkout_commit(repo)}
            for kind, repo, _ in kinds
        },
        "clients_per_script": args.clients,
        "audio_seconds_per_client": audio_seconds,
        "wall_seconds_all_at_once": round(wall, 1),
        "results": results,
        "used_slots_after": used_after,
        "server_exit_code": server_exit,
        "failures": failed,
        "ok": not failed,
    }
    if failed:
        summary["server_log_tail"] = log_tail
    print(json.dumps(summary, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
