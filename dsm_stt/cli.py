"""The ``dsm-stt`` command: thin functions over the library, one per sub-command.

Owns argument parsing, turning flags into the library's frozen configs once, what the user sees
on stderr and exit codes. Inputs and the model's files are checked before the model loads;
every failure a user can meet (a bad flag, input, model, a server that cannot be reached or
goes away, a missing sound library, Ctrl-C) is one ``dsm-stt: error: ...`` line, not a
traceback. Exit codes: 0 done, 1 some inputs failed (the others are done), 2 nothing could be
done, 130 interrupted. Progress (``progress.Progress``) and the loading lines show on a
terminal; with stderr redirected only errors are written, unless ``--verbose``.
No model, engine or protocol logic lives here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import DEVICES, DTYPE_CHOICES, EXACT, KV_CACHES, QUANTIZE
from .model.config import DEFAULT_MODEL

DEVICE_HELP = "where the model runs (default auto: CUDA, else MPS, else the CPU)"
DTYPE_HELP = (
    "the LM's activations and weights (default auto: the fastest measured for the device and "
    "CPU family, see 'dsm-stt doctor'; bfloat16 on CUDA)"
)
QUANTIZE_HELP = (
    "the LM's projections: auto (default: w8a8 on x86-64 CPUs, where it was measured fastest; "
    "none elsewhere), none (the model's dtype), int8 (int8 weights, per-row scales), w8a8 "
    "(int8 weights and activations on the CPU's integer dot-product units; CPU only; on "
    "CPUs with AMX-INT8, AVX512-VNNI or AVX2 this package's compiled kernel), w4a8 (opt-in: "
    "int4 weights in groups of 64 with int8 activations, on this package's AVX2 kernel; "
    "faster at 1-2 slots, larger logit error: docs/performance.md)"
)
KV_CACHE_HELP = (
    "the LM's attention cache: auto (default: int8 on x86-64 CPUs with the compiled kernels, "
    "else float), float (the model's dtype) or int8 (CPU only: int8 rows with one scale each, "
    "half the memory and bytes of bf16; compiled kernel, needs a C++ compiler)"
)
EXACT_HELP = (
    "the exact float path: float32, no quantization, float KV cache, nothing compiled "
    "(the reference's numbers; slower)"
)

SEED_HELP = "seed of the sampling at --temperature > 0, and of --random-weights"
CUDA_GRAPHS_HELP = (
    "replay each step as captured CUDA graphs (one per power-of-two slot count): less launch "
    "overhead (a stt-1b step at one slot: 4.6 ms against 46.7 on an H200); CUDA and greedy "
    "decoding only (default: on where the engine runs on CUDA with greedy decoding and a float "
    "KV cache; --no-cuda-graphs for eager steps)"
)
URL_HELP = "the server's streaming WebSocket (default ws://127.0.0.1:8080/api/asr-streaming)"
API_KEY_HELP = "sent as the kyutai-api-key header (default: none, for an open server)"
OFF = " (default: off)"
MAX_REPLICAS = (
    "with --ray: autoscale from --replicas up to M replicas on the sessions open (Serve's "
    "autoscaling, aiming at 3/4 of each replica's slots; knobs in docs/scale-out.md)"
)
REPLICAS_PER_GPU = (
    "with --ray on CUDA: replicas that share one GPU, each asking Ray for 1/K of it (each its "
    "own process and event loop, which bounds live sessions long before a GPU does; "
    "docs/scale-out.md); default 1"
)


def _add_engine_flags(p: argparse.ArgumentParser, batch_default: int | None) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub repo id or local checkpoint directory (default {DEFAULT_MODEL}); "
        "with --random-weights, a known repo id or 'tiny'",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="build the architecture with random weights (no download): for "
        "benchmarks and smoke tests, the transcripts are meaningless" + OFF,
    )
    p.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    p.add_argument(
        "--batch-size",
        type=int,
        default=batch_default,
        help=f"number of slots (default {batch_default or 'one per input file, at most 8'})",
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples"
    )
    p.add_argument("--seed", type=int, default=0, help=SEED_HELP + " (default 0)")
    p.add_argument("--quantize", default="auto", choices=QUANTIZE, help=QUANTIZE_HELP)
    p.add_argument(
        "--cuda-graphs", action=argparse.BooleanOptionalAction, default=None, help=CUDA_GRAPHS_HELP
    )
    p.add_argument("--kv-cache", default="auto", choices=KV_CACHES, help=KV_CACHE_HELP)
    p.add_argument("--exact", action="store_true", help=EXACT_HELP + OFF)


def _add_ray_address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=None,
        help="with --ray: the Ray cluster to join ('auto': the one this machine is part of; "
        "default: start a local one)",
    )


def _add_voice_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--quiet",
        action="store_true",
        help="errors only: no progress, no loading lines" + OFF,
    )
    group.add_argument(
        "--verbose",
        action="store_true",
        help="the loading lines and a line per file even when stderr is not a terminal "
        "(default: shown on a terminal only)",
    )


@dataclass(frozen=True)
class _Voice:
    """What the user hears on stderr besides errors (which are always written): the loading
    lines and a line per file when ``chatty``, the status line redrawn in place when ``live``."""

    chatty: bool
    live: bool

    def say(self, line: str) -> None:
        if self.chatty:
            _say(line)


def _voice(args: argparse.Namespace) -> _Voice:
    tty = sys.stderr.isatty()
    if getattr(args, "quiet", False):
        return _Voice(False, False)
    return _Voice(tty or getattr(args, "verbose", False), tty)


def _exact(args: argparse.Namespace) -> dict[str, str]:
    """The precision flags, with --exact's values where it is given (explicit flags that
    contradict it are refused)."""
    values = {name: getattr(args, name) for name in EXACT}
    if not getattr(args, "exact", False):
        return values
    for name, value in values.items():
        if value not in (None, "auto", EXACT[name]):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"--exact runs {flag} {EXACT[name]}; it cannot take {flag} {value}")
    return dict(EXACT)


def _engine(
    args: argparse.Namespace,
    batch_size: int | None = None,
    announce: Callable[[str], None] | None = None,
):
    from .config import EngineConfig
    from .loading import load_engine

    config = EngineConfig(
        batch_size=batch_size or args.batch_size,
        device=args.device,
        temperature=args.temperature,
        seed=args.seed,
        cuda_graphs=bool(args.cuda_graphs),
        **_exact(args),
    )
    if args.cuda_graphs is None:
        config = dataclasses.replace(config, cuda_graphs=_graphs_by_default(config))
    return load_engine(args.model, config, args.random_weights, announce=announce or _say)


def _say(line: str) -> None:
    print(f"dsm-stt: {line}", file=sys.stderr, flush=True)


def _error(message: str) -> None:
    print(f"dsm-stt: error: {message}", file=sys.stderr, flush=True)


def _fail(message: str) -> int:
    _error(message)
    return 2


def _probe_inputs(paths: Sequence[str | Path]) -> list:
    """``audio.probe`` of each input, before any model loads: its ``AudioInfo``, or None
    after its one-line error."""
    from .audio import AudioDecodeError, probe

    infos = []
    for path in paths:
        try:
            infos.append(probe(path))
        except AudioDecodeError as exc:
            _error(str(exc))
            infos.append(None)
    return infos


# ------------------------------------------------------------------------------ transcribe


def cmd_transcribe(args: argparse.Namespace) -> int:
    from .model.checkpoint import CheckpointError
    from .progress import Progress
    from .transcriber import Split, output_paths, scheduler_for, transcribe_files
    from .writers import EXTENSIONS, render

    if args.batch_size is not None and args.batch_size < 1:
        return _fail("--batch-size must be >= 1")
    if args.ray:
        return _transcribe_on_ray(args)
    split = None
    if args.split is None and args.split_overlap is not None:
        return _fail("--split-overlap needs --split")
    if args.split is not None:
        overlap = {} if args.split_overlap is None else {"overlap": args.split_overlap}
        try:
            split = Split(args.split, **overlap)
        except ValueError as exc:
            return _fail(f"--split / --split-overlap: {exc}")
    infos = _probe_inputs(args.audio)  # before the model: a typo is heard at once
    good = [i for i, info in enumerate(infos) if info is not None]
    if not good:
        return 2
    sources = [args.audio[i] for i in good]
    out_paths = None
    if args.output_dir:
        try:
            out_paths = output_paths(sources, Path(args.output_dir), EXTENSIONS[args.format])
        except ValueError as exc:
            return _fail(str(exc))
    # one slot per file (a second slot for one file is memory for nothing), at most 8; with
    # --split the pieces of one file fill the slots
    batch_size = args.batch_size or (8 if split is not None else min(len(sources), 8))
    voice = _voice(args)
    try:
        engine = _engine(args, batch_size, voice.say)
    except (CheckpointError, ValueError) as exc:
        return _fail(str(exc))
    progress = Progress(
        sources, [infos[i].duration for i in good], live=voice.live, lines=voice.chatty
    )
    results = {}
    failed = len(args.audio) - len(good)
    for result in transcribe_files(
        scheduler_for(engine),
        sources,
        engine.name,
        engine.model.config.stt.audio_silence_prefix_seconds,
        split=split,
        on_step=progress.step,
    ):
        if result.error is not None:
            failed += 1
            progress.finish(result.index, error=result.error)
            continue
        progress.finish(result.index, duration=result.transcript.duration)
        text = render(result.transcript, args.format)
        if out_paths is not None:
            path = out_paths[result.index]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        results[result.index] = text
    progress.close()
    if out_paths is None:
        for index in sorted(results):
            text = results[index]
            if args.format == "json":
                text = json.dumps(json.loads(text), ensure_ascii=False)
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 1 if failed else 0


def _transcribe_on_ray(args: argparse.Namespace) -> int:
    """``transcribe --ray``: the corpus on Ray Data (``dsm_stt.scale.corpus``)."""
    import functools

    try:
        import ray

        from .scale.corpus import transcribe_corpus
    except ImportError as exc:
        return _fail(f"--ray needs Ray Data ({exc}): pip install 'dsm-stt[ray]'")
    if not args.output_dir:
        return _fail("--ray writes files: give --output-dir (-o) DIR")
    if args.split is not None:
        return _fail("--split is not supported with --ray (pieces of one file stay local)")
    missing = [a for a in args.audio if "://" not in a and not Path(a).is_file()]
    if missing:
        return _fail(f"no such file: {missing[0]}")
    if not ray.is_initialized():
        ray.init(address=args.address)
    gpus = 1.0 if _cuda_requested(args.device) and ray.cluster_resources().get("GPU") else 0.0
    # the actors' CPUs, and what is left for decoding (at least a quarter CPU per task)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    decode_cpus = min(1.0, max(0.25, cpus - args.replicas))
    slots = args.batch_size or 8
    report = transcribe_corpus(
        args.audio,
        Path(args.output_dir),
        args.format,
        functools.partial(_engine, args, slots),
        actors=args.replicas,
        slots=slots,
        gpus_per_actor=gpus,
        cpus_per_actor=1.0 if cpus - args.replicas >= 0.25 else 0.75,
        decode_cpus=decode_cpus,
        say=_say,
    )
    return 1 if report.failed else 0


# ------------------------------------------------------------------------------------ eval


def cmd_eval(args: argparse.Namespace) -> int:
    import gc

    from . import evaluation
    from .model.checkpoint import CheckpointError
    from .progress import Progress

    if args.batch_size is not None and args.batch_size < 1:
        return _fail("--batch-size must be >= 1")
    try:
        samples = evaluation.find_samples(args.data)
        normalize = evaluation.normalizer(args.normalizer)
        evaluation.score("", "")  # jiwer is there, before anything long
        configs = [args] if args.compare is None else [args, _compare_args(args)]
        for config in configs:
            _exact(config)  # contradictory precision flags, before the first model loads
    except (evaluation.EvalError, ValueError) as exc:
        return _fail(str(exc))
    voice = _voice(args)
    left_out = evaluation.unmatched_audio(args.data) if voice.chatty else []
    if left_out:
        voice.say(f"{len(left_out)} audio file(s) without a transcript left out")
    infos = _probe_inputs([s.audio for s in samples])
    good = [i for i, info in enumerate(infos) if info is not None]
    if not good:
        return 2
    failures = {i: "cannot be decoded (see above)" for i, info in enumerate(infos) if not info}
    batch_size = args.batch_size or min(len(good), 8)
    runs = []
    for label, config in zip(_labels(configs), configs, strict=True):
        try:
            engine = _engine(config, batch_size, voice.say)
        except (CheckpointError, ValueError) as exc:
            return _fail(str(exc))
        progress = Progress(
            [samples[i].audio for i in good],
            [infos[i].duration for i in good],
            live=voice.live,
            lines=False,
            what=label,
        )
        runs.append(evaluation.run(label, engine, samples, good, normalize, progress, failures))
        progress.close()
        del engine  # the next configuration's model is not loaded beside this one
        gc.collect()
    root = Path(args.data) if Path(args.data).is_dir() else Path(args.data).parent
    if args.json:
        print(json.dumps(evaluation.as_dict(runs, args.normalizer), ensure_ascii=False))
    else:
        print(evaluation.report(runs, args.normalizer, root, alignments=args.alignments))
    return 1 if any(run.failed for run in runs) else 0


def _compare_args(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with ``--compare``'s engine flags applied over them."""
    parser = argparse.ArgumentParser(prog="--compare", add_help=False, exit_on_error=False)
    _add_engine_flags(parser, None)
    other = argparse.Namespace(**vars(args))
    try:
        _, extra = parser.parse_known_args(shlex.split(args.compare), namespace=other)
    except (argparse.ArgumentError, ValueError) as exc:
        raise ValueError(f"--compare {args.compare!r}: {exc}") from None
    if extra:
        raise ValueError(
            f"--compare {args.compare!r}: {' '.join(extra)} is not an engine flag (--model, "
            "--device, --dtype, --quantize, --kv-cache, --exact, --batch-size, ...)"
        )
    return other


def _labels(configs: Sequence[argparse.Namespace]) -> list[str]:
    """Each configuration as the engine flags that differ from the defaults (the model is
    named in the report beside the path that ran)."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_engine_flags(parser, None)
    defaults = vars(parser.parse_args([]))
    labels = []
    for config in configs:
        flags = []
        for action in parser._actions:
            value = getattr(config, action.dest)
            if value == defaults[action.dest] or action.dest in ("model", "random_weights"):
                continue
            flag = action.option_strings[0]
            flags.append(flag if value is True else f"{flag} {value}")
        label = " ".join(flags) or "defaults"
        labels.append(label + (" (again)" if label in labels else ""))
    return labels


# ---------------------------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> int:
    from .benchmark import run_benchmark
    from .model.checkpoint import CheckpointError

    if args.batch_size < 1:
        return _fail("--batch-size must be >= 1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        engine = _engine(args)
        result = run_benchmark(engine, args.steps, args.warmup, context_fill=args.context_fill)
    except (CheckpointError, ValueError) as exc:
        return _fail(str(exc))
    print(json.dumps(result.as_dict()) if args.json else result.summary())
    return 0


# ---------------------------------------------------------------------------------- serve


def _server_config(args: argparse.Namespace):
    """Flags over the TOML file over the defaults: a flag given on the command line wins."""

    from .server.config import ServerConfig, read_moshi_server_toml

    config = ServerConfig()
    if args.config:
        config = read_moshi_server_toml(args.config, config)
    engine_flags = {
        "batch_size": args.batch_size,
        "device": args.device,
        "temperature": args.temperature,
        "seed": args.seed,
        "cuda_graphs": args.cuda_graphs,
        **_exact(args),
    }
    engine = dataclasses.replace(
        config.engine, **{k: v for k, v in engine_flags.items() if v is not None}
    )
    if args.batch_size is None and not args.config:
        engine = dataclasses.replace(engine, batch_size=64 if _cuda_requested(engine.device) else 8)
    if args.cuda_graphs is None:
        engine = dataclasses.replace(engine, cuda_graphs=_graphs_by_default(engine))
    changes = {
        "engine": engine,
        "host": args.host,
        "port": args.port,
        "random_weights": args.random_weights,
        "log_level": args.log_level,
    }
    if args.model is not None:
        changes |= {"model": args.model, "model_files": None}
    if args.allowed_origin:
        changes["allowed_origins"] = tuple(o.rstrip("/") for o in args.allowed_origin)
    if args.api_key:  # added to the TOML's authorized_ids, not instead of them
        changes["api_keys"] = tuple(dict.fromkeys((*config.api_keys, *args.api_key)))
    flags = (
        "queue_timeout",
        "idle_timeout",
        "audio_timeout",
        "path",
        "max_upload_mb",
        "max_connections",
        "max_buffered_seconds",
        "read_ahead_mb",
        "max_file_slots",
        "ws_compression",
    )
    for flag in flags:
        if getattr(args, flag) is not None:
            changes[flag] = getattr(args, flag)
    return config.replace(**changes)


def _graphs_by_default(engine) -> bool:
    """Whether an ``EngineConfig`` without an explicit ``--[no-]cuda-graphs`` replays captured
    steps: where it runs on CUDA and decodes greedily over a float KV cache."""
    return engine.temperature == 0 and engine.kv_cache != "int8" and _cuda_requested(engine.device)


def _cuda_requested(device: str) -> bool:
    if device == "cuda":
        return True
    if device != "auto":
        return False
    import torch

    return torch.cuda.is_available()


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from .model.checkpoint import CheckpointError
    from .server.app import load_engine, serve
    from .server.runner import engine_thread

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.ray:
        return _serve_on_ray(args)
    if args.max_replicas is not None or args.address is not None:
        return _fail("--max-replicas and --address are for --ray (serve on Ray Serve)")
    if args.replicas_per_gpu != 1:
        return _fail("--replicas-per-gpu is for --ray (serve on Ray Serve)")
    from .loading import check_model

    try:
        config = _server_config(args)
        _check_port(config.host, config.port)  # before the model, which takes a while to load
        source = config.model if config.model_files is None else config.model_files
        if not config.random_weights:
            check_model(source)  # missing weights: one line now, before the start line
    except (CheckpointError, ValueError) as exc:
        return _fail(str(exc))
    model = config.model if config.model_files is None else config.model_files.lm
    logging.getLogger("dsm_stt").info(
        "dsm-stt %s: serving %s on http://%s:%d (WebSocket %s) once the model is loaded and "
        "warmed up; GET /health answers 200 then",
        _version(),
        model,
        config.host,
        config.port,
        config.path,
    )
    torch_thread = engine_thread()  # loads the engine now and steps it once serving
    try:
        engine = torch_thread.submit(load_engine, config).result()
    except (CheckpointError, ValueError) as exc:
        torch_thread.shutdown()
        return _fail(str(exc))
    except KeyboardInterrupt:
        # the engine thread is still inside torch (or a download): leave without tearing
        # the interpreter down around it
        print("dsm-stt: interrupted while loading the model", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)
    return serve(config, engine, torch_thread)


def _serve_on_ray(args: argparse.Namespace) -> int:
    """``serve --ray``: the same server, replicated by Ray Serve (``dsm_stt.scale``)."""
    try:
        from .scale import serve as ray_serve
    except ImportError as exc:
        return _fail(f"--ray needs Ray Serve ({exc}): pip install 'dsm-stt[ray]'")
    try:
        config = _server_config(args)
        autoscaling = _autoscaling(args, config.engine.batch_size)
        _check_ray_server(config)
    except ValueError as exc:
        return _fail(str(exc))
    replicas = None if autoscaling else args.replicas
    return ray_serve.run(
        config,
        replicas,
        address=args.address,
        autoscaling=autoscaling,
        replicas_per_gpu=args.replicas_per_gpu,
    )


def _check_ray_server(config) -> None:
    """Server settings (a ``ServerConfig``) that a replica behind Ray Serve cannot honour:
    refused, not ignored."""
    if config.ws_compression:
        raise ValueError(
            "--ws-compression does not apply with --ray: Serve's proxy holds the WebSockets "
            "(and accepts compression itself)"
        )


def _autoscaling(args: argparse.Namespace, slots: int) -> dict | None:
    """``--max-replicas M``: Serve's autoscaling config from ``--replicas`` up to M."""
    if args.replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
    if args.replicas_per_gpu < 1:
        raise ValueError(f"--replicas-per-gpu must be at least 1, got {args.replicas_per_gpu}")
    if args.max_replicas is None:
        return None
    if args.max_replicas < args.replicas:
        raise ValueError(
            f"--max-replicas ({args.max_replicas}) must be at least --replicas ({args.replicas})"
        )
    from .scale.serve import autoscaling_config

    return autoscaling_config(args.replicas, args.max_replicas, slots)


def cmd_ray_config(args: argparse.Namespace) -> int:
    try:
        from .scale import serve as ray_serve
    except ImportError as exc:
        return _fail(f"ray-config needs Ray Serve ({exc}): pip install 'dsm-stt[ray]'")
    flags = [a for a in args.serve_args if a != "--"]
    parsed = build_parser().parse_args(["serve", *flags])
    try:
        config = _server_config(parsed)
        autoscaling = _autoscaling(args, config.engine.batch_size)
        _check_ray_server(config)
    except ValueError as exc:
        return _fail(str(exc))
    document = ray_serve.ray_config(
        flags,
        args.replicas,
        None,
        config.host,
        config.port,
        autoscaling=autoscaling,
        replicas_per_gpu=args.replicas_per_gpu,
    )
    print(document, end="")
    return 0


def _check_port(host: str, port: int) -> None:
    """``ValueError`` when ``host:port`` cannot be listened on (taken, or not an address of
    this machine). The server binds it again later; a race with another process is left."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"--host {host}: not an address to listen on ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            why = exc.strerror or str(exc)
            hint = "; another server runs there? pick another --port" if port else ""
            raise ValueError(f"cannot listen on {host}:{port}: {why}{hint}") from None


# --------------------------------------------------------------------------------- stream


def cmd_stream(args: argparse.Namespace) -> int:
    import asyncio

    import numpy as np

    from .audio import AudioDecodeError, load_audio
    from .client import ConnectionLost, ServerError, stream_audio
    from .engine.events import EndWord, Word
    from .engine.turns import EndOfTurn

    if _probe_inputs([args.audio]) == [None]:
        return 2
    try:
        pcm = load_audio(args.audio)
    except AudioDecodeError as exc:
        return _fail(str(exc))
    from .model.config import SAMPLE_RATE

    prefix = np.zeros(round(args.prefix * SAMPLE_RATE), dtype=np.float32)
    pcm = np.concatenate([prefix, pcm])

    async def run() -> None:
        words: list[list] = []
        line = False  # live text: words printed since the last finished turn
        messages = stream_audio(args.url, pcm, api_key=args.api_key, rtf=args.rtf, end_of_turn=True)
        async for msg in messages:
            if isinstance(msg, Word) and msg.text.strip():
                if args.timestamps:
                    words.append([msg.text.strip(), msg.start_time - args.prefix, None])
                else:
                    sys.stdout.write(msg.text.strip() + " ")
                    sys.stdout.flush()
                    line = True
            elif isinstance(msg, EndWord) and words and words[-1][2] is None:
                words[-1][2] = msg.stop_time - args.prefix
            elif isinstance(msg, EndOfTurn) and line and not args.timestamps:
                print()  # a finished turn: one line each
                line = False
        for text, start, end in words:
            end_text = "-" if end is None else f"{max(end, start):8.2f}"
            print(f"{max(start, 0.0):8.2f} {end_text:>8} {text}")
        if line:
            print()

    try:
        asyncio.run(run())
    except (ServerError, ConnectionLost, TimeoutError, OSError) as exc:
        if not args.timestamps:
            print()  # end the live line before the error
        return _fail(str(exc))
    return 0


# ------------------------------------------------------------------------------------ mic


def cmd_mic(args: argparse.Namespace) -> int:
    import asyncio

    from websockets.exceptions import ConnectionClosed

    from .client import (
        ConnectionLost,
        LivePrinter,
        ServerError,
        SttClient,
        import_sounddevice,
        microphone,
    )
    from .server.protocol import Error

    try:
        sounddevice = import_sounddevice()
    except ImportError as exc:
        return _fail(str(exc))
    printer = LivePrinter(sys.stdout)

    async def run() -> None:
        async with await SttClient.connect(
            args.url, api_key=args.api_key, end_of_turn=True
        ) as client:

            async def send() -> None:
                try:
                    async for block in microphone(args.input_device):
                        await client.send_audio(block)
                except ConnectionClosed:
                    raise client.ended() from None

            async def receive() -> None:
                try:
                    async for msg in client:
                        if isinstance(msg, Error):
                            raise ServerError(msg.message)
                        printer.on_message(msg)
                except ConnectionClosed:
                    pass
                raise client.ended()  # the server ended the session, or the network: say so

            tasks = {asyncio.create_task(send()), asyncio.create_task(receive())}
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # the microphone or the connection failed: say why
            finally:
                for task in tasks:
                    task.cancel()

    if sys.stderr.isatty():
        print("listening (Ctrl-C to stop)...", file=sys.stderr)
    try:
        asyncio.run(run())
    except (ServerError, ConnectionLost, OSError) as exc:
        printer.close()
        return _fail(str(exc))
    except getattr(sounddevice, "PortAudioError", ()) as exc:  # no or a busy input device
        printer.close()
        return _fail(f"the microphone cannot be opened: {exc} (see python -m sounddevice)")
    finally:
        printer.close()  # the last line ended, before main's "interrupted" after Ctrl-C
    return 0


# --------------------------------------------------------------------------------- doctor


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import report

    if args.build:
        from .cpu.kernels.build import KernelUnavailable, module

        try:
            module(progress=True)
        except KernelUnavailable as exc:
            print(f"dsm-stt: the CPU kernels cannot be built: {exc}", file=sys.stderr)
    print(report(args.model))
    return 0


# ---------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsm-stt",
        description="Real-time speech-to-text with Kyutai's Delayed Streams Modeling models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "transcribe", help="transcribe audio/video files (word timestamps, text/json/srt/vtt)"
    )
    _add_engine_flags(p, batch_default=None)
    p.add_argument(
        "--format",
        default="text",
        choices=["text", "json", "srt", "vtt"],
        help="output format (default text; json has word timestamps, srt/vtt are subtitles)",
    )
    p.add_argument(
        "-o",
        "--output-dir",
        metavar="DIR",
        help="write one <name>.<ext> per input under DIR, mirroring the inputs' folders below "
        "their common parent (a/x.wav and b/x.mp3 give DIR/a/x.<ext> and DIR/b/x.<ext>; files "
        "of one folder land in DIR itself); two inputs that would share a name are refused "
        "before anything runs (default: print to stdout)",
    )
    p.add_argument(
        "--ray",
        action="store_true",
        help="transcribe on Ray Data: decode on CPU workers, --replicas model actors (one "
        "device each); needs --output-dir; inputs whose output exists are skipped (resume); "
        "needs pip install 'dsm-stt[ray]'" + OFF,
    )
    _add_ray_address(p)
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="with --ray: model actors (default 1)",
    )
    _add_voice_flags(p)
    p.add_argument(
        "--split",
        type=float,
        default=None,
        metavar="SECONDS",
        help="cut each file into pieces of about SECONDS (at quiet frames) that run side by "
        "side in free slots: a long file finishes several times sooner when the batch "
        "has room; words near a cut can differ from one stream's (default: no cut)",
    )
    p.add_argument(
        "--split-overlap",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --split, audio before each cut that the next piece starts with (default 5)",
    )
    p.add_argument("audio", nargs="+", help="audio or video files FFmpeg can read")
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser(
        "eval",
        help="word error rate on your own recordings and transcripts; --compare two configurations",
        description="Transcribe recordings whose transcripts you have and count the word "
        "errors (substitutions, deletions, insertions) per file and in all, with the speed "
        "(N.Nx real time). Needs the 'eval' extra (jiwer, whisper-normalizer).",
    )
    _add_engine_flags(p, batch_default=None)
    p.add_argument(
        "data",
        help="a folder of audio files with same-stem .txt or .stm transcripts (or "
        "LibriSpeech's *.trans.txt), or a manifest: .jsonl/.json (objects with an audio path "
        "and a text: 'audio'/'path'/'audio_filepath' and 'text'/'sentence'), .csv/.tsv with "
        "such columns, or one .stm for the audio beside it",
    )
    p.add_argument(
        "--compare",
        metavar="ARGS",
        help="also run a second configuration on the same files, this command's engine flags "
        "with ARGS applied over them, and print both (e.g. --compare '--exact'; default: one "
        "run)",
    )
    p.add_argument(
        "--normalizer",
        default="english",
        choices=["english", "french", "basic", "none"],
        help="how both texts are normalized before counting: Whisper's English or French "
        "normalizer (case, punctuation, numbers, spellings), basic (case, punctuation and "
        "marks, any language) or none (words as written) (default english)",
    )
    p.add_argument(
        "--alignments",
        action="store_true",
        help="print each file's word alignment (REF, HYP and the S/D/I marks)" + OFF,
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the tables" + OFF
    )
    _add_voice_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "serve",
        help="run the streaming server (moshi-server compatible WebSocket API, file POST, metrics)",
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"hub repo id or local checkpoint directory (default {DEFAULT_MODEL}); "
        "with --random-weights, a known repo id or 'tiny'",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="build the architecture with random weights (no download): for load "
        "and smoke tests, the transcripts are meaningless" + OFF,
    )
    p.add_argument(
        "--config",
        metavar="FILE.toml",
        help="moshi-server configuration file (its ASR module: model files, "
        "batch_size, authorized_ids, ...); flags given here override it (default: none)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every "
        "interface, as moshi-server)",
    )
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument(
        "--path", default=None, help="route of the streaming API (default /api/asr-streaming)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="concurrent sessions (default 64 on CUDA, 8 otherwise)",
    )
    p.add_argument("--device", default=None, choices=DEVICES, help=DEVICE_HELP)
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help=DTYPE_HELP)
    p.add_argument(
        "--temperature", type=float, default=None, help="0 = greedy (default); > 0 samples"
    )
    p.add_argument("--seed", type=int, default=None, help=SEED_HELP + " (default 0)")
    p.add_argument("--quantize", default=None, choices=QUANTIZE, help=QUANTIZE_HELP)
    p.add_argument(
        "--cuda-graphs", action=argparse.BooleanOptionalAction, default=None, help=CUDA_GRAPHS_HELP
    )
    p.add_argument("--kv-cache", default=None, choices=KV_CACHES, help=KV_CACHE_HELP)
    p.add_argument("--exact", action="store_true", help=EXACT_HELP + OFF)
    p.add_argument(
        "--api-key",
        action="append",
        metavar="KEY",
        help="accept this key (kyutai-api-key header or ?auth_id=); repeat for "
        "several; added to a --config file's authorized_ids (default: none, an open server)",
    )
    p.add_argument(
        "--allowed-origin",
        action="append",
        metavar="ORIGIN",
        help="a browser origin (e.g. https://app.example) allowed to open WebSockets; repeat "
        "for several; default: any (clients without an Origin header are always allowed)",
    )
    p.add_argument(
        "--queue-timeout",
        type=float,
        default=None,
        metavar="S",
        help="let a newcomer wait up to S seconds for a free slot (default 0: "
        "'no free channels' at once)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        metavar="S",
        help="close a connection that does not answer pings for S seconds (default 20)",
    )
    p.add_argument(
        "--audio-timeout",
        type=float,
        default=None,
        metavar="S",
        help="close a session that sends no audio for S seconds (default 120)",
    )
    p.add_argument(
        "--max-buffered-seconds",
        type=float,
        default=None,
        metavar="S",
        help="audio a session may queue for the model that is always read from its socket "
        "(default 10)",
    )
    p.add_argument(
        "--read-ahead-mb",
        type=float,
        default=None,
        metavar="MB",
        help="audio (float32, MiB) all sessions together may read beyond their "
        "--max-buffered-seconds, so fast senders' pings are answered; past it the server stops "
        "reading them until the model catches up (default 512; 0: never)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=None,
        metavar="MB",
        help="largest POST body accepted, in MiB (default 1024; 413 beyond)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=None,
        metavar="N",
        help="open connections of any kind before newcomers get 503 (default 1000)",
    )
    p.add_argument(
        "--ws-compression",
        action="store_true",
        default=None,
        help="accept WebSocket per-message compression (permessage-deflate) from clients that "
        "offer it; off by default, as in moshi-server: audio samples barely compress and "
        "inflating them costs the server more than the bytes it saves",
    )
    p.add_argument(
        "--max-file-slots",
        type=int,
        default=None,
        metavar="N",
        help="slots file transcriptions (POST) may hold together; live sessions keep the "
        "rest (default: half the batch, at least 1)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="the least severe log lines written to stderr (default info)",
    )
    p.add_argument(
        "--ray",
        action="store_true",
        help="serve on Ray Serve: --replicas copies of this server (one per GPU, or CPU "
        "replicas) behind one ingress on --host/--port; needs pip install 'dsm-stt[ray]'" + OFF,
    )
    _add_ray_address(p)
    p.add_argument(
        "--replicas", type=int, default=1, metavar="N", help="with --ray: replicas (default 1)"
    )
    p.add_argument("--max-replicas", type=int, default=None, metavar="M", help=MAX_REPLICAS + OFF)
    p.add_argument("--replicas-per-gpu", type=int, default=1, metavar="K", help=REPLICAS_PER_GPU)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "ray-config",
        help="print a Ray Serve config file for `serve deploy` (dsm-stt ray-config --replicas N "
        "-- SERVE FLAGS)",
    )
    p.add_argument("--replicas", type=int, default=1, metavar="N", help="replicas (default 1)")
    p.add_argument("--max-replicas", type=int, default=None, metavar="M", help=MAX_REPLICAS + OFF)
    p.add_argument("--replicas-per-gpu", type=int, default=1, metavar="K", help=REPLICAS_PER_GPU)
    p.add_argument("serve_args", nargs=argparse.REMAINDER, help="flags of dsm-stt serve")
    p.set_defaults(func=cmd_ray_config)

    p = sub.add_parser(
        "stream", help="stream an audio file to a running server, print words as they come"
    )
    p.add_argument("audio", help="audio or video file FFmpeg can read")
    p.add_argument("--url", default="ws://127.0.0.1:8080/api/asr-streaming", help=URL_HELP)
    p.add_argument("--api-key", default=None, help=API_KEY_HELP)
    p.add_argument(
        "--rtf",
        type=float,
        default=1.0,
        help="speed relative to real time (default 1; 1000 = as fast as possible)",
    )
    p.add_argument(
        "--prefix",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds of silence sent first (default 1, which the 2.6B needs); "
        "subtracted from the printed times",
    )
    p.add_argument(
        "--timestamps",
        action="store_true",
        help="print 'start end word' lines at the end instead of live text (default: live text)",
    )
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser(
        "mic",
        help="live transcript of the microphone from a running server (needs sounddevice: "
        "pip install sounddevice)",
    )
    p.add_argument("--url", default="ws://127.0.0.1:8080/api/asr-streaming", help=URL_HELP)
    p.add_argument("--api-key", default=None, help=API_KEY_HELP)
    p.add_argument(
        "--input-device",
        default=None,
        help="sound card, by index or name as 'python -m sounddevice' lists them (default: the "
        "system's default input)",
    )
    p.set_defaults(func=cmd_mic)

    p = sub.add_parser("bench", help="time the batched engine step (Mimi + LM + host)")
    _add_engine_flags(p, batch_default=1)
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default 0: torch's own choice, one per core)",
    )
    p.add_argument(
        "--context-fill",
        type=float,
        default=1.0,
        help="how full the attention caches are when timing starts, 0..1 (default 1: a "
        "session past its first minute; lower values time a session's first minute, which "
        "costs less on CPU)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (default: a summary)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "doctor",
        help="what a bug report needs: device, CPU family, versions, kernels, the auto path",
    )
    p.add_argument(
        "--build",
        action="store_true",
        help="build the CPU kernels now (once per machine; default: built when first needed)",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"the model whose presence in the cache is reported (default {DEFAULT_MODEL})",
    )
    p.set_defaults(func=cmd_doctor)
    version = f"dsm-stt {_version()}"
    for command in (parser, *sub.choices.values()):
        command.add_argument(
            "--version", action="version", version=version, help="print the version and exit"
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(_glue(argv, ("--compare",)))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if sys.stderr.isatty():
            sys.stderr.write("\r\x1b[K")  # over a progress line
        print("dsm-stt: interrupted", file=sys.stderr, flush=True)
        return 130


def _glue(argv: list[str], flags: Sequence[str]) -> list[str]:
    """``--compare --exact`` read as ``--compare=--exact``: argparse takes a value that starts
    with a dash for a flag of its own, and the value of these flags is made of flags."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in flags and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _version() -> str:
    from . import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
