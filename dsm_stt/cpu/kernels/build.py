"""Building and loading this package's compiled CPU kernels (the C++ sources next to this file).

Owns the one build of the C++ sources for this machine (``SOURCES``, one per kernel after the
shared ``kernels.cpp``, joined in that order into one extension): its compiler flags (``-march=native``
narrowed to the features ``features.detect()`` reports, so a restricted family gets code for
that family only), its cache key, whether it is built already, the line that announces a build
before it starts, and ``KernelUnavailable`` with the reason in words when it cannot be had
(``DSM_STT_KERNELS=off``, no compiler or ninja, a failed build). Nothing here builds at import
time; the first ``module()`` call does, and only the paths that need the kernels call it.

Built by PyTorch's C++ extension loader and cached under ``~/.cache/torch_extensions``
(``TORCH_EXTENSIONS_DIR`` moves it), one build per source, flags, PyTorch version and CPU.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

from ..features import KERNELS_ENV, CpuFeatures, detect, kernels_enabled

_HERE = Path(__file__).parent
# joined in this order: each may use what the ones before it define
SOURCES = tuple(
    _HERE / name
    for name in (
        "kernels.cpp",  # includes, enums, the attention's views
        "attention.cpp",  # int8 KV attention, its code paths
        "int8_product.cpp",  # the W8A8 products (AMX, AVX512-VNNI, AVX2)
        "lm_layer_step.cpp",  # the LM's fused layer step
        "float_product.cpp",  # float32 streaming products, Mimi's fused layer step
        "codebook.cpp",  # Mimi's codebook searches
    )
)


def _sources() -> list[str]:
    return [path.read_text(encoding="utf-8") for path in SOURCES]


FUNCTIONS = (
    "attend",
    "paths",
    "amx_problem",
    "vnni_problem",
    "avx2_problem",
    "int8_linear",
    "lm_layer_step",
    "vq_encode",
    "float_linear",
    "vq_search",
    "mimi_layer_step",
)
BUILD_SECONDS = 60  # what a first build takes on a 2-core VM (20-50 s measured)

# -mno-* flags that keep -march=native from using what the (possibly restricted) features lack
_NARROWING = {
    "avx512f": ["-mno-avx512f"],
    "avx512_vnni": ["-mno-avx512vnni", "-mno-avxvnni"],
    "amx_int8": ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"],
    "avx2": ["-mno-avx2", "-mno-fma"],
}


class KernelUnavailable(RuntimeError):
    """The compiled kernels cannot be built or loaded on this machine; the message says why."""


def compiler_flags(features: CpuFeatures | None = None) -> list[str]:
    features = detect() if features is None else features
    flags = ["-O3", "-march=native", "-fopenmp"]
    if features.arch == "x86_64" and features.emulated:
        for flag, narrowing in _NARROWING.items():
            if flag not in features.flags:
                flags += narrowing
    return flags


def build_name(features: CpuFeatures | None = None) -> str:
    """The extension's name: one per source, flags, PyTorch version and CPU (``-march=native``
    code may not run on another CPU that shares the cache directory)."""
    features = detect() if features is None else features
    key = "\n".join(
        [
            *_sources(),
            " ".join(compiler_flags(features)),
            torch.__version__,
            features.arch,
            " ".join(sorted(features.flags)),
        ]
    )
    return "dsm_stt_cpu_kernels_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def build_directory() -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(build_name(), verbose=False))


def cached() -> bool:
    """Whether a finished build for this machine is in the extension cache (loading it takes
    a second, no compiler run)."""
    try:
        directory = build_directory()  # (created if missing)
    except OSError:  # a cache folder that cannot be created holds no build
        return False
    return any(directory.glob(f"{build_name()}*.so")) or any(directory.glob("*.pyd"))


def unwritable_cache() -> str | None:
    """Why the extension cache cannot take a build (a read-only folder), or None."""
    try:
        directory = build_directory()
    except OSError as exc:
        return f"the kernels' build folder cannot be created ({exc.strerror}: {exc.filename})"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"the kernels' build folder {directory} is not writable"
    return None


def missing_tools() -> str | None:
    """Why the kernels cannot be built here (off, no ninja, no compiler), or None."""
    if not kernels_enabled():
        return f"the compiled CPU kernels are off ({KERNELS_ENV}=off)"
    try:
        import ninja  # noqa: F401
    except ImportError:
        return "the 'ninja' package is not installed (pip install ninja)"
    from torch.utils import cpp_extension

    compiler = cpp_extension.get_cxx_compiler()
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on the PATH"
    return None


def _announce(progress: bool) -> threading.Event | None:
    """Say that a build starts; with ``progress`` on a terminal, count its seconds."""
    print(
        f"dsm-stt: building CPU kernels for this machine (once, about {BUILD_SECONDS} s)",
        file=sys.stderr,
        flush=True,
    )
    if not (progress and sys.stderr.isatty()):
        return None
    done = threading.Event()
    start = time.monotonic()

    def tick() -> None:
        while not done.wait(1.0):
            print(
                f"\r  compiling... {time.monotonic() - start:.0f} s",
                end="",
                file=sys.stderr,
                flush=True,
            )
        print("\r", end="", file=sys.stderr, flush=True)

    threading.Thread(target=tick, daemon=True).start()
    return done


_built: list = []  # the loaded module, or the KernelUnavailable that says why there is none
_lock = threading.Lock()


def _build(progress: bool):
    # built once per process; a failure is kept, so it is not retried at every call
    with _lock:
        if not _built:
            _built.append(_compile(progress))
        return _built[0]


def _compile(progress: bool):
    problem = missing_tools()
    if problem is not None:
        return KernelUnavailable(problem)
    from torch.utils.cpp_extension import load_inline

    built = cached()
    if not built and (unwritable := unwritable_cache()) is not None:
        return KernelUnavailable(f"{unwritable}; set TORCH_EXTENSIONS_DIR to a writable folder")
    ticking = None if built else _announce(progress)
    start = time.monotonic()
    try:
        module = load_inline(
            build_name(),
            cpp_sources=_sources(),
            functions=list(FUNCTIONS),
            extra_cflags=compiler_flags(),
            extra_ldflags=["-fopenmp"],
        )
    except (RuntimeError, OSError, ImportError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        detail = (errors or lines or [type(exc).__name__])[-1][:400]
        return KernelUnavailable(f"the compiled CPU kernels failed to build: {detail}")
    finally:
        if ticking is not None:
            ticking.set()
    if ticking is not None or progress:
        print(
            f"dsm-stt: CPU kernels ready ({time.monotonic() - start:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    return module


def module(progress: bool = False):
    """The compiled module (built now if need be); ``KernelUnavailable`` says why not."""
    built = _build(progress)
    if isinstance(built, KernelUnavailable):
        raise built
    return built


def problem() -> str | None:
    """None when the kernels are ready (built now if need be), else why not."""
    try:
        module()
    except KernelUnavailable as exc:
        return str(exc)
    return None


def loaded() -> bool:
    """Whether this process has the module already; never starts a build."""
    return bool(_built) and not isinstance(_built[0], KernelUnavailable)


def status() -> str:
    """The kernels' state in words, for ``dsm-stt doctor``; never starts a build."""
    missing = missing_tools()
    if missing is not None:
        return f"unavailable: {missing}"
    if loaded():
        return f"built and loaded ({build_directory()})"
    if cached():
        return f"built, cached in {build_directory()}"
    return (
        "not built yet: built on first use by a path that needs them "
        "(dsm-stt doctor --build builds them now)"
    )


__all__ = ["KernelUnavailable", "cached", "loaded", "module", "problem", "status"]
