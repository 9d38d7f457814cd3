"""``dsm-stt doctor``: what a bug report needs, in one text.

Owns ``report``: versions (dsm-stt, Python, PyTorch and the libraries that decode, serve and
load), the device, the CPU's features and family, the C++ compiler and the kernels' state
(built, cached, or why not), the path ``auto`` picks on this machine and what it was measured
at, and the Hugging Face cache with the checkpoints in it. It never builds the kernels (``dsm-stt
doctor --build`` does, before the report) and never downloads anything.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata

import torch

from . import __version__
from .config import EngineConfig
from .cpu.features import FAMILY_ENV, KERNELS_ENV, detect
from .cpu.kernels import build
from .cpu.plan import choose, kernels_problem

_PACKAGES = (
    "numpy",
    "safetensors",
    "sentencepiece",
    "huggingface_hub",
    "av",
    "soxr",
    "starlette",
    "uvicorn",
    "msgpack",
    "websockets",
    "ninja",
)


def report(model: str) -> str:
    lines = [f"dsm-stt {__version__}"]
    lines.append(f"python {platform.python_version()} on {platform.system()} {platform.machine()}")
    lines.append(
        f"torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()}"
        f", {torch.get_num_threads()} threads)"
    )
    lines.append("packages: " + ", ".join(f"{name} {_version(name)}" for name in _PACKAGES))
    lines += _devices()
    features = detect()
    lines.append(f"CPU: {features.model or 'unknown model'}")
    lines.append(f"CPU family: {features.describe()} ({features.family.description})")
    lines.append(f"C++ compiler: {_compiler()}")
    lines.append(f"CPU kernels: {build.status()}")
    for name in (KERNELS_ENV, FAMILY_ENV):
        if os.environ.get(name):
            lines.append(f"{name}={os.environ[name]}")
    lines += _auto()
    lines += _hub_cache(model)
    return "\n".join(lines)


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> list[str]:
    cuda = "not available"
    if torch.cuda.is_available():
        cuda = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        cuda += f" (CUDA {torch.version.cuda})"
    mps = "available" if torch.backends.mps.is_available() else "not available"
    return [f"CUDA: {cuda}; MPS: {mps}"]


def _compiler() -> str:
    from torch.utils import cpp_extension

    compiler = cpp_extension.get_cxx_compiler()
    path = shutil.which(compiler)
    if path is None:
        return f"{compiler} not found on the PATH"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        first = (out.stdout or out.stderr).splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        first = "version unknown"
    return f"{path} ({first})"


def _auto() -> list[str]:
    """The plan ``auto`` picks for one slot and for eight, and why, without building anything."""
    lines, reasons = [], []
    for batch in (1, 8):
        try:
            plan = choose(EngineConfig(batch_size=batch), kernels_problem=_no_build)
        except ValueError as exc:
            lines.append(f"auto at {batch} slot(s): refused: {exc}")
            continue
        lines.append(f"auto at {batch} slot(s): {plan.describe(reason=False)}")
        if plan.reason not in reasons:
            reasons.append(plan.reason)
    lines += [f"  why: {reason}" for reason in reasons]
    return lines


def _no_build(product: str | None = None) -> str | None:
    # what ``choose`` would hear, without compiling: a build already in the cache is loaded
    # and asked; otherwise only a missing tool counts
    if build.loaded() or build.cached():
        return kernels_problem(product)
    return build.missing_tools()


def _hub_cache(model: str) -> list[str]:
    try:
        from huggingface_hub import constants, scan_cache_dir
    except ImportError:
        return ["Hugging Face cache: huggingface_hub is not installed"]
    lines = [f"Hugging Face cache: {constants.HF_HUB_CACHE}"]
    try:
        repos = sorted(scan_cache_dir().repos, key=lambda r: r.repo_id)
    except Exception as exc:  # no cache directory yet, or an unreadable one
        lines.append(f"  (nothing cached: {str(exc).splitlines()[0]})")
        repos = []
    if not repos and len(lines) == 1:
        lines.append("  (no checkpoints)")
    for repo in repos:
        lines.append(f"  {repo.repo_type} {repo.repo_id}: {repo.size_on_disk_str}")
    cached = any(repo.repo_id == model for repo in repos)
    where = "in the cache" if cached else "not in the cache (downloaded on first use)"
    lines.append(f"model {model}: {where}")
    return lines
