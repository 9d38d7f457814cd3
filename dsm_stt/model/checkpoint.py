"""Finding and loading Kyutai STT checkpoints, unchanged, as published on the Hugging Face hub.

Owns:
- resolving a model reference: a hub repo id (taken from the standard HF cache when it is
  there, without a request; else downloaded once into it, with huggingface_hub's progress
  bars), an ``hf://owner/repo/file`` path, or a local directory holding the same files; when a
  file is neither cached nor downloadable (``HF_HUB_OFFLINE=1``, no network) one message, at
  once, gives the ``hf download`` command and the cache path (``check_available`` says so
  before anything long starts);
- choosing the configuration: the checkpoint's ``config.json`` when present, otherwise the
  built-in preset of the repo (recognised by id, directory name, or tensor shapes);
- the one table that turns official tensor names into ours (spec §1.5, §1.6), with strict
  checks whose messages name the first offending key and the expected and found shapes;
- building the LM (in the requested dtype) and the Mimi encoder (always float32).

It does not know about slots, devices beyond ``.to(device)``, or the engine.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import (
    PRESETS,
    ConfigError,
    LMConfig,
    MimiConfig,
    ModelConfig,
    parse_config_json,
    parse_mimi_config_json,
)
from .tokenizer import SentencePieceTokenizer, Tokenizer, TokenizerError

CONFIG_NAME = "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, read or matched to the architecture."""


@dataclass
class SttModel:
    """A loaded checkpoint: its config, LM, Mimi encoder and tokenizer."""

    name: str
    config: ModelConfig
    lm: nn.Module
    mimi: nn.Module
    tokenizer: Tokenizer


@dataclass(frozen=True)
class CheckpointFiles:
    """Local paths of one checkpoint's files and the config that goes with them."""

    name: str  # repo id or directory, for messages and ``model`` fields
    config: ModelConfig
    lm_path: Path
    mimi_path: Path
    tokenizer_path: Path


# --------------------------------------------------------------------------------------------
# resolving


_HF_PATH = re.compile(r"^hf://(?P<repo>[^/]+/[^/]+)/(?P<file>.+)$")


class NotCachedError(CheckpointError):
    """A hub file that is not in the local cache and cannot be downloaded now (offline, or the
    hub cannot be reached): the message says how to get it."""

    def __init__(self, message: str, repo_id: str, filename: str) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.filename = filename


# How long the one request that tells whether the hub answers may take. huggingface_hub alone
# retries a file that is not cached for up to a minute; a machine without network answers
# this probe at once (no DNS), so the user hears why within a second instead.
HUB_PROBE_TIMEOUT = 5.0


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloaded repos (``HF_HUB_CACHE``, ``HF_HOME``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set (huggingface_hub's own reading, or the variable now)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return bool(constants.HF_HUB_OFFLINE) or value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def download_command(repo_id: str, filename: str | None = None) -> str:
    return f"hf download {repo_id}" + (f" {filename}" if filename else "")


def _not_cached(repo_id: str, filename: str, why: str, whole_repo: bool) -> NotCachedError:
    command = download_command(repo_id, None if whole_repo else filename)
    cache = hub_cache_dir()
    return NotCachedError(
        f"{repo_id}: {filename!r} is not in the Hugging Face cache ({cache}) and {why}. "
        f"Download it with `{command}` (on a machine with network access, then copy {cache} "
        f"here or point HF_HUB_CACHE at the copy), or pass a local directory holding the "
        f"checkpoint files with --model DIR.",
        repo_id,
        filename,
    )


def _from_cache(repo_id: str, filename: str) -> Path | None:
    """The cached file, None when it is not cached; raises when the cache knows the hub has no
    such file (huggingface_hub records 404s)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    if isinstance(found, str):
        return Path(found)
    if found is not None:
        raise CheckpointError(
            f"{repo_id}: file {filename!r} not found on the Hugging Face hub (cached answer)"
        )
    return None


_REACHED: set[str] = set()  # hub endpoints that answered once in this process


def _hub_reachable(repo_id: str, filename: str, whole_repo: bool) -> None:
    """Raise ``NotCachedError`` at once when nothing can be downloaded: ``HF_HUB_OFFLINE`` is
    set, or one short request gets no answer from the hub."""
    if hub_offline():
        raise _not_cached(repo_id, filename, "HF_HUB_OFFLINE is set", whole_repo)
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = constants.ENDPOINT
    if endpoint in _REACHED:
        return
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=HUB_PROBE_TIMEOUT)
    except HfHubHTTPError:
        pass  # the hub answered (404, 401, ...): the download says what it means
    except Exception as exc:  # no network, DNS, proxy, timeout
        why = f"the hub ({endpoint}) cannot be reached ({type(exc).__name__}: {_first_line(exc)})"
        raise _not_cached(repo_id, filename, why, whole_repo) from exc
    _REACHED.add(endpoint)


def hf_download(
    repo_id: str, filename: str, download: bool = True, whole_repo: bool = False
) -> Path:
    """One file of a hub repo: from the local cache when it is there (no request at all),
    else downloaded (huggingface_hub's progress bars). Raises ``NotCachedError`` at once when it
    is not cached and cannot be downloaded (or, with ``download=False``, whenever it is not
    cached); ``whole_repo`` makes the advice download the whole repo rather than the file."""
    cached = _from_cache(repo_id, filename)
    if cached is not None:
        return cached
    if not download:
        raise _not_cached(repo_id, filename, "this look-up downloads nothing", whole_repo)
    _hub_reachable(repo_id, filename, whole_repo)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo_id, filename))
    except (EntryNotFoundError, RepositoryNotFoundError) as exc:
        raise CheckpointError(
            f"{repo_id}: file {filename!r} not found on the Hugging Face hub ({type(exc).__name__})"
        ) from exc
    except LocalEntryNotFoundError as exc:  # the hub stopped answering midway
        cause: Exception = exc
    except Exception as exc:  # network errors and the like
        cause = exc
    why = f"could not be downloaded ({type(cause).__name__}: {_first_line(cause)})"
    raise _not_cached(repo_id, filename, why, whole_repo) from cause


def resolve_path(ref: str | Path, download: bool = True) -> Path:
    """A file reference: ``hf://owner/repo/file``, ``$VAR``-expanded local path (``download``:
    see ``hf_download``)."""
    ref = str(ref)
    m = _HF_PATH.match(ref)
    if m:
        return hf_download(m["repo"], m["file"], download)
    path = Path(os.path.expandvars(os.path.expanduser(ref)))
    if not path.exists():
        raise CheckpointError(f"file not found: {path}")
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


def _preset_for_directory(path: Path) -> ModelConfig | None:
    """Recognise a known architecture by directory name, then by the LM tensors' shapes."""
    for repo_id in sorted(PRESETS, key=len, reverse=True):
        if path.name == repo_id.split("/")[1] or path.name == repo_id.replace("/", "--"):
            return PRESETS[repo_id]
    lm_file = path / "model.safetensors"
    if not lm_file.exists():
        return None
    shapes = read_safetensors_shapes(lm_file)
    num_layers = len({k.split(".")[2] for k in shapes if k.startswith("transformer.layers.")})
    text_card = shapes.get("text_linear.weight", (0,))[0]
    heads = sum(1 for k in shapes if k.startswith("extra_heads."))
    for cfg in PRESETS.values():
        lm = cfg.lm
        if (lm.num_layers, lm.text_card, lm.extra_heads_num_heads) == (
            num_layers,
            text_card,
            heads,
        ):
            return cfg
    return None


def resolve(model: str | Path, download: bool = True) -> CheckpointFiles:
    """Locate the files of a checkpoint given a local directory or a hub repo id: a repo's
    files come from the Hugging Face cache when they are there, else are downloaded (with
    ``download=False``, ``NotCachedError`` names the first one missing from the cache)."""
    path = Path(os.path.expandvars(os.path.expanduser(str(model))))
    if path.is_dir():
        cfg_file = path / CONFIG_NAME
        if cfg_file.exists():
            cfg = _read_config(cfg_file, _preset_for_directory(path))
        else:
            cfg = _preset_for_directory(path)
            if cfg is None:
                raise CheckpointError(
                    f"{path}: no {CONFIG_NAME} and the architecture is not one of the known "
                    f"presets ({', '.join(PRESETS)}); add a config.json"
                )
        if cfg.mimi_config_name:
            cfg = _with_mimi_config(cfg, path / cfg.mimi_config_name)
        files = {name: path / name for name in (cfg.moshi_name, cfg.mimi_name, cfg.tokenizer_name)}
        for name, file in files.items():
            if not file.exists():
                raise CheckpointError(f"{path}: missing checkpoint file {name!r}")
        return CheckpointFiles(
            str(path), cfg, files[cfg.moshi_name], files[cfg.mimi_name], files[cfg.tokenizer_name]
        )
    if str(model).startswith(("/", ".", "~")) or os.sep in str(model).replace("/", "", 1):
        raise CheckpointError(f"model directory not found: {path}")
    repo_id = str(model)
    if repo_id.count("/") != 1:
        raise CheckpointError(
            f"{repo_id!r} is neither a local directory nor a hub repo id (owner/name)"
        )
    base = PRESETS.get(repo_id)

    def get(filename: str) -> Path:
        return hf_download(repo_id, filename, download, whole_repo=True)

    try:
        cfg = _read_config(get(CONFIG_NAME), base)
    except NotCachedError as exc:
        if base is None:
            raise
        try:  # a known repo whose weights are cached without its config.json works offline
            get(base.moshi_name)
        except NotCachedError:
            raise exc from None
        cfg = base
    except CheckpointError as exc:
        if base is None or "not found on the Hugging Face hub" not in str(exc):
            raise
        cfg = base  # the repo publishes no config.json: use the built-in preset
    if cfg.mimi_config_name:
        cfg = _with_mimi_config(cfg, get(cfg.mimi_config_name))
    return CheckpointFiles(
        repo_id,
        cfg,
        lm_path=get(cfg.moshi_name),
        mimi_path=get(cfg.mimi_name),
        tokenizer_path=get(cfg.tokenizer_name),
    )


def check_available(model: str | Path, is_file: bool = False) -> bool:
    """Fail now, downloading nothing and within a second, when ``model`` (a directory or a repo
    id; with ``is_file``, one file: a path or ``hf://owner/repo/file``) cannot be had: a
    directory missing files, or hub files neither in the cache nor downloadable
    (``HF_HUB_OFFLINE``, no answer from the hub). True when nothing needs downloading. Called
    before the long parts of loading so that the user hears at once what to do."""
    try:
        if is_file or _HF_PATH.match(str(model)):
            resolve_path(model, download=False)
        else:
            resolve(model, download=False)
    except NotCachedError as exc:
        _hub_reachable(exc.repo_id, exc.filename, whole_repo=not _HF_PATH.match(str(model)))
        return False
    return True


def _with_mimi_config(cfg: ModelConfig, path: Path) -> ModelConfig:
    try:
        data = json.loads(path.read_text())
        return cfg.replace(mimi=parse_mimi_config_json(data, cfg.lm.n_q))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot use Mimi config ({exc})") from exc


def _read_config(path: Path, base: ModelConfig | None) -> ModelConfig:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read config.json ({exc})") from exc
    try:
        return parse_config_json(data, base)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# reading tensors


def read_safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, without reading the data."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:
        raise CheckpointError(_bad_file(path, exc)) from exc


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weight file not found: {path}")
    try:
        return load_file(str(path))
    except Exception as exc:
        raise CheckpointError(_bad_file(path, exc)) from exc


def _bad_file(path: Path, exc: BaseException) -> str:
    return (
        f"{path}: not a valid safetensors file (truncated or corrupt download?): {_first_line(exc)}"
    )


# --------------------------------------------------------------------------------------------
# official names -> ours


_CODEBOOK = re.compile(r"^(quantizer\.rvq_(first|rest)\.vq\.layers\.(\d+)\._codebook)\.(.+)$")


def convert_mimi_tensors(tensors: Mapping[str, Tensor], cfg: MimiConfig) -> dict[str, Tensor]:
    """Official Mimi file → our encoder's state dict (decoder dropped, codebooks normalised)."""
    out: dict[str, Tensor] = {}
    sums: dict[str, Tensor] = {}
    usages: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if key.startswith(("decoder.", "decoder_transformer.", "upsample.")):
            continue
        m = _CODEBOOK.match(key)
        if m:
            prefix, which, index, leaf = m.group(1), m.group(2), int(m.group(3)), m.group(4)
            if which == "rest" and index >= cfg.num_codebooks - 1:
                continue
            if leaf == "embedding_sum":
                sums[prefix] = value
            elif leaf == "cluster_usage":
                usages[prefix] = value
            elif leaf != "_initialized":
                out[key] = value
            continue
        out[key] = value.float()
    for prefix, total in sums.items():
        if prefix not in usages:
            raise CheckpointError(f"Mimi weights: {prefix}.cluster_usage is missing")
        usage = usages.pop(prefix).float()
        out[f"{prefix}.embedding"] = total.float() / usage.clamp(min=1e-5)[:, None]
    for prefix in usages:
        raise CheckpointError(f"Mimi weights: {prefix}.embedding_sum is missing")
    return out


_AUDIO_EMB = re.compile(r"^emb\.(\d+)\.")


def convert_lm_tensors(tensors: Mapping[str, Tensor], cfg: LMConfig) -> dict[str, Tensor]:
    """Official LM file → our LM's state dict (RMSNorm gains [1,1,D] or [D] → [D]).

    Audio embeddings beyond ``cfg.n_q`` are dropped: like moshi-server, a config may use only the
    first codebooks of a checkpoint (Unmute runs the 32-codebook 1B with 20).
    """
    out = {}
    for key, value in tensors.items():
        m = _AUDIO_EMB.match(key)
        if m and int(m.group(1)) >= cfg.n_q:
            continue
        if key.endswith(".alpha") and value.dim() == 3 and value.shape[:2] == (1, 1):
            value = value.reshape(-1)
        out[key] = value
    return out


def load_into(module: nn.Module, tensors: Mapping[str, Tensor], what: str) -> None:
    """Strictly load ``tensors`` into ``module``; the first mismatch is named in the error."""
    expected = module.state_dict()
    for key, ref in expected.items():
        if key not in tensors:
            raise CheckpointError(
                f"{what}: missing weight {key!r} (expected shape {list(ref.shape)})"
            )
        if tuple(tensors[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{what}: weight {key!r} has shape "
                f"{list(tensors[key].shape)}, expected {list(ref.shape)}"
            )
    for key in tensors:
        if key not in expected:
            raise CheckpointError(
                f"{what}: unexpected weight {key!r} (not part of this architecture: wrong config?)"
            )
    # load_state_dict copies into the existing parameters, casting to their dtype
    module.load_state_dict(dict(tensors), strict=True)


def _tensors(source: str | Path | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    return source if isinstance(source, Mapping) else read_safetensors(source)


def load_mimi(
    source: str | Path | Mapping[str, Tensor], cfg: MimiConfig, device: torch.device | str = "cpu"
) -> nn.Module:
    """Build the Mimi encoder (float32) from an official Mimi safetensors file or dict."""
    from .mimi import MimiEncoder

    tensors = convert_mimi_tensors(_tensors(source), cfg)
    model = MimiEncoder(cfg)
    load_into(model, tensors, f"Mimi weights ({_describe(source)})")
    return model.to(device).eval()


def load_lm(
    source: str | Path | Mapping[str, Tensor],
    cfg: LMConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Build the DSM LM in ``dtype`` from an official LM safetensors file or dict."""
    from .lm import LM

    tensors = convert_lm_tensors(_tensors(source), cfg)
    with torch.device("meta"):
        model = LM(cfg)
    model = model.to_empty(device=device).to(dtype)
    load_into(model, tensors, f"LM weights ({_describe(source)})")
    return model.eval()


def _describe(source: object) -> str:
    return "tensor dict" if isinstance(source, Mapping) else str(source)


def load_model(
    model: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> SttModel:
    """Resolve and load a whole checkpoint (repo id or directory)."""
    return load_files(resolve(model), dtype, device)


def load_files(
    files: CheckpointFiles, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> SttModel:
    """Load the LM, Mimi and tokenizer of already-located checkpoint files."""
    try:
        tokenizer = SentencePieceTokenizer(files.tokenizer_path)
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from exc
    lm = load_lm(files.lm_path, files.config.lm, dtype, device)
    mimi = load_mimi(files.mimi_path, files.config.mimi, device)
    return SttModel(files.name, files.config, lm, mimi, tokenizer)
