"""From a model name to a running engine, in one place: checkpoint → model → plan → engine.

Owns ``load_engine`` (a hub repo id or directory, a checkpoint given file by file as
moshi-server's TOML does, or an architecture with random weights) and ``build_engine`` (an
already loaded model): the checkpoint's files checked first (a missing or undownloadable
model is one message at once, before anything long), ``auto`` resolved by ``cpu.plan.choose``,
the model placed on its device and dtype, the plan installed (``cpu.install``), the engine
built, and short lines for the user: what is loaded, the chosen path and why, how long it took.
The CLI and the server call these and nothing below them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from .config import EngineConfig
from .cpu.install import install
from .cpu.plan import Plan, choose
from .engine.engine import Engine
from .model.checkpoint import SttModel
from .model.config import ModelConfig

log = logging.getLogger("dsm_stt")


@dataclass(frozen=True)
class ModelFiles:
    """A checkpoint given file by file, as moshi-server's TOML does.

    The references are kept as written (``hf://owner/repo/file`` or a path, ``$VAR`` already
    expanded) and resolved when the model is loaded.
    """

    config: ModelConfig
    lm: str
    mimi: str
    tokenizer: str


def plan_for(config: EngineConfig) -> Plan:
    """``config`` with ``auto`` resolved (kernels built now where the plan runs them)."""
    refuse_unrunnable(config)
    return choose(config)


def refuse_unrunnable(config: EngineConfig) -> None:
    """Raise ``ValueError`` for what cannot run on this machine whatever the model (checked in
    microseconds, before any file is looked for): a missing CUDA device, CUDA graphs off CUDA."""
    device = config.torch_device()
    if config.cuda_graphs and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device; this one runs on {device.type}")


def load_engine(
    model: str | ModelFiles,
    config: EngineConfig,
    random_weights: bool = False,
    announce: Any = None,
) -> Engine:
    """Load ``model`` (repo id or directory, ``ModelFiles``; with ``random_weights`` any
    known architecture name) and build its engine as ``config`` says. What cannot be had or
    cannot run is refused first, in this order: the checkpoint's files (``check_available``:
    within a second, without downloading; a missing CUDA device even before), then the device,
    dtype and kernels; only then the (long) download and load. ``announce`` (default: the ``dsm_stt`` logger at info) hears what
    is being loaded, the path chosen, and how long it took."""
    say = announce or log.info
    start = time.perf_counter()
    name = str(model.lm) if isinstance(model, ModelFiles) else str(model)
    refuse_unrunnable(config)
    cached = True if random_weights else check_model(model)
    plan = plan_for(config)
    device = config.torch_device()
    dtype = plan.dtype
    if random_weights:
        say(f"building {name} with random weights on {device}")
    elif cached:
        say(f"loading {name} on {device}")
    else:
        from .model.checkpoint import hub_cache_dir

        say(f"downloading {name} into {hub_cache_dir()} (once), then loading it on {device}")
    if isinstance(model, ModelFiles):
        stt = _load_files(model, dtype, device, config.seed, random_weights)
    elif random_weights:
        from .model.synthetic import random_model

        stt = random_model(model, dtype=dtype, device=device, seed=config.seed)
    else:
        from .model.checkpoint import load_model

        stt = load_model(model, dtype=dtype, device=device)
    engine = build_engine(stt, config, plan, say)
    say(f"{name} loaded in {time.perf_counter() - start:.1f} s")
    return engine


def check_model(model: str | ModelFiles) -> bool:
    """Raise ``CheckpointError`` at once when ``model``'s files cannot be had (missing from a
    directory, or neither in the Hugging Face cache nor downloadable); True when nothing needs
    downloading."""
    from .model.checkpoint import check_available

    if isinstance(model, ModelFiles):
        refs = (model.lm, model.mimi, model.tokenizer)
        return all([check_available(ref, is_file=True) for ref in refs])
    return check_available(model)


def build_engine(
    model: SttModel, config: EngineConfig, plan: Plan | None = None, announce: Any = None
) -> Engine:
    """The engine for an already loaded ``model``: ``plan`` (default: ``plan_for(config)``)
    installed, CUDA graphs captured when asked for. ``announce`` (default: the ``dsm_stt``
    logger at info) gets the one line that names the path."""
    plan = plan_for(config) if plan is None else plan
    device = config.torch_device()
    lm = model.lm.to(device=device, dtype=plan.dtype).eval()
    mimi = model.mimi.to(device=device).float().eval()
    cache_type = install(lm, mimi, plan)
    (announce or log.info)(f"engine: {plan.describe()}")
    return Engine(model, config, plan, cache_type)


def _load_files(
    files: ModelFiles, dtype: Any, device: Any, seed: int, random_weights: bool
) -> SttModel:
    # a checkpoint given file by file (``hf://`` references are downloaded)
    if random_weights:
        from .model.synthetic import random_model_for

        return random_model_for(files.config, files.lm, dtype, device, seed)
    from .model.checkpoint import CheckpointFiles, load_files, resolve_path

    located = CheckpointFiles(
        files.lm,
        files.config,
        resolve_path(files.lm),
        resolve_path(files.mimi),
        resolve_path(files.tokenizer),
    )
    return load_files(located, dtype, device)
