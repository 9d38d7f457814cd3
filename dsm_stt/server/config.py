"""Server settings: ``ServerConfig``, and the import of moshi-server's TOML configuration.

Owns every knob of the server that is not about the model itself (address, route, keys,
timeouts, limits) and ``read_moshi_server_toml``, which turns a ``moshi-server worker --config``
file into a ``ServerConfig`` unchanged (spec §5.9): ``authorized_ids``, the ``BatchedAsr``
module's ``path``, ``batch_size``, file references (``hf://owner/repo/file`` or paths with
``$VAR`` references), ``asr_delay_in_tokens`` / ``conditioning_delay``, ``temperature``,
``dtype_override`` and the ``[modules.X.model]`` architecture. Keys that only matter to the
Rust server (``log_dir``, ``instance_name``, ``log_frequency_s``,
``conditioning_learnt_padding``…) are accepted and ignored. Files are *not* resolved (nor
downloaded) here: that happens when the model is loaded.

What the checkpoint says (architecture, delays) lives in ``model/config.py``; how the engine
runs (device, dtype, slots) in ``dsm_stt/config.py``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import EngineConfig
from ..loading import ModelFiles
from ..model.config import (
    DEFAULT_MODEL,
    PRESETS,
    ConfigError,
    ModelConfig,
    parse_moshi_server_model,
)
from .protocol import MAX_MESSAGE_BYTES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DEFAULT_PATH = "/api/asr-streaming"

# moshi-server's dtype_override values → our dtype names.
_DTYPES = {
    "f32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "f16": "float16",
    "float16": "float16",
}
_ASR_TYPES = ("BatchedAsr", "Asr")


class ServerConfigError(ConfigError):
    """A server setting or a moshi-server TOML file is invalid; the message names the key."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``dsm-stt serve`` needs besides the weights.

    ``model`` is a hub repo id or a directory (with ``random_weights``: any known architecture);
    ``model_files``, when set (from a TOML file), takes precedence over ``model``.
    Timeouts are in seconds; ``0`` disables ``queue_timeout`` (newcomers get "no free channels"
    at once when every slot is taken).
    """

    model: str = DEFAULT_MODEL
    model_files: ModelFiles | None = None
    random_weights: bool = False
    # a server computes each slot's next LM position ahead, so a frame's messages leave as
    # soon as the frame is in (``Engine.begin_step``; same tokens)
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(lookahead=True))
    host: str = "127.0.0.1"
    port: int = 8080
    path: str = DEFAULT_PATH
    api_keys: tuple[str, ...] = ()  # none = open server
    # browser origins (``Origin`` header, e.g. "https://app.example") allowed to open
    # WebSockets; empty = any. Clients that send no Origin (scripts, servers) are not browsers
    allowed_origins: tuple[str, ...] = ()
    queue_timeout: float = 0.0  # how long a WebSocket newcomer waits for a free slot
    post_queue_timeout: float = 100.0  # the same for POST (moshi-server: 1000 × 100 ms)
    ping_interval: float = 10.0  # WebSocket ping after this long
    idle_timeout: float = 20.0  # close when a ping is not answered within this long
    audio_timeout: float = 120.0  # close when no binary message came for this long
    warmup_steps: int = 3
    max_buffered_seconds: float = 10.0  # audio queued per session that is always read
    # audio the sessions together may read beyond max_buffered_seconds each (float32: 96 kB a
    # second of audio), before they stop reading: a fast sender's pings stay answered
    read_ahead_mb: float = 512.0
    max_outbound_messages: int = 20_000  # unsent messages per session before it is dropped
    # Markers and Flushes a session may have waiting for their answer: one more is a flood,
    # closed with an Error naming the limit (1008), so one step's echoes stay far below
    # max_outbound_messages for a client that reads them
    max_pending_markers: int = 256
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_upload_mb: float = 1024.0  # POST bodies over this get 413
    max_connections: int = 1000  # open connections (any kind) before newcomers get 503
    # accept WebSocket permessage-deflate where a client offers it (Python's websockets does
    # by default). Off, as in moshi-server: float samples barely compress, and inflating
    # every Audio frame was the event loop's largest cost
    ws_compression: bool = False
    # slots file transcriptions (both POST routes) may hold together; None: half the batch
    # (at least 1), so live sessions always find the rest (``file_slots.FileSlots``)
    max_file_slots: int | None = None
    header_timeout: float = 10.0  # a connection's request head (or upgrade) must be in by then
    body_timeout: float = 30.0  # the longest gap in a request body
    shutdown_timeout: float = 30.0  # graceful drain on SIGTERM/SIGINT
    static_dir: str | None = None
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ServerConfigError(f"path must start with '/', got {self.path!r}")
        if not 0 <= self.port <= 65535:
            raise ServerConfigError(f"port must be in 0..65535, got {self.port}")
        for name in (
            "queue_timeout",
            "post_queue_timeout",
            "ping_interval",
            "idle_timeout",
            "audio_timeout",
            "max_buffered_seconds",
            "read_ahead_mb",
            "shutdown_timeout",
            "max_upload_mb",
            "header_timeout",
            "body_timeout",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ServerConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.audio_timeout == 0 or self.max_buffered_seconds == 0:
            raise ServerConfigError("audio_timeout and max_buffered_seconds must be > 0")
        if self.warmup_steps < 0:
            raise ServerConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        limits = (
            "max_outbound_messages",
            "max_message_bytes",
            "max_pending_markers",
            "max_connections",
        )
        for name in limits:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ServerConfigError(
                    f"{name} must be an integer >= 1, got {getattr(self, name)!r}"
                )
        if self.max_file_slots is not None and (
            isinstance(self.max_file_slots, bool)
            or not isinstance(self.max_file_slots, int)
            or self.max_file_slots < 1
        ):
            raise ServerConfigError(
                f"max_file_slots must be an integer >= 1, got {self.max_file_slots!r}"
            )
        if not isinstance(self.ws_compression, bool):
            raise ServerConfigError(
                f"ws_compression must be true or false, got {self.ws_compression!r}"
            )
        if any(not isinstance(k, str) or not k for k in self.api_keys):
            raise ServerConfigError("api keys must be non-empty strings")

    @property
    def max_upload_bytes(self) -> int:
        return round(self.max_upload_mb * 2**20)

    def replace(self, **changes: Any) -> ServerConfig:
        return dataclasses.replace(self, **changes)

    @property
    def model_name(self) -> str:
        """What ``/api/modules_info`` reports as the LM."""
        return self.model_files.lm if self.model_files is not None else self.model


# --------------------------------------------------------------------------------------------
# moshi-server TOML


def _expand(value: str) -> str:
    """moshi-server's rule: ``hf://`` references stay as they are; other strings get their
    ``$VAR`` references expanded (``$HOME/models/…``)."""
    return value if value.startswith("hf://") else os.path.expandvars(value)


def _typed(table: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and kind is not bool:
        raise ServerConfigError(f"{where}{key} must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise ServerConfigError(f"{where}{key} must be {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _base_model(model: Mapping[str, Any]) -> ModelConfig:
    """The published architecture a TOML model section describes (for the facts the TOML does
    not carry: Mimi, the audio delay, the silence prefix), else the defaults."""
    tr = model.get("transformer") if isinstance(model.get("transformer"), Mapping) else {}
    heads = model.get("extra_heads") or {}
    for cfg in PRESETS.values():
        if (
            cfg.lm.text_card == model.get("text_out_vocab_size")
            and cfg.lm.num_layers == tr.get("num_layers")
            and cfg.lm.extra_heads_num_heads == (heads.get("num_heads", 0) if heads else 0)
        ):
            return cfg
    return ModelConfig()


def _asr_module(data: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    modules = data.get("modules")
    if not isinstance(modules, Mapping) or not modules:
        raise ServerConfigError("moshi-server config: no [modules.<name>] table")
    asr = {
        n: m for n, m in modules.items() if isinstance(m, Mapping) and m.get("type") in _ASR_TYPES
    }
    if not asr:
        types = ", ".join(
            f"{n} ({m.get('type')!r})" for n, m in modules.items() if isinstance(m, Mapping)
        )
        raise ServerConfigError(
            f"moshi-server config: no ASR module; this server runs a module of type "
            f"{' or '.join(_ASR_TYPES)}, found: {types or 'none'}"
        )
    if len(asr) > 1:
        raise ServerConfigError(
            f"moshi-server config: {len(asr)} ASR modules ({', '.join(asr)}); "
            f"this server runs exactly one model"
        )
    return next(iter(asr.items()))


def read_moshi_server_toml(
    path: str | os.PathLike[str], base: ServerConfig | None = None
) -> ServerConfig:
    """Read a ``moshi-server worker --config`` file into a ``ServerConfig`` (spec §5.9).

    Settings the TOML does not mention keep their value from ``base``.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ServerConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ServerConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return parse_moshi_server_config(data, base)
    except ConfigError as exc:
        raise ServerConfigError(f"{path}: {exc}") from exc


def parse_moshi_server_config(
    data: Mapping[str, Any], base: ServerConfig | None = None
) -> ServerConfig:
    """The parsed TOML document of a moshi-server config → ``ServerConfig``."""
    base = base or ServerConfig()
    changes: dict[str, Any] = {}

    ids = data.get("authorized_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            raise ServerConfigError("authorized_ids must be an array of non-empty strings")
        changes["api_keys"] = tuple(ids)
    static_dir = _typed(data, "static_dir", str, "")
    if static_dir is not None:
        changes["static_dir"] = _expand(static_dir)

    name, module = _asr_module(data)
    where = f"modules.{name}."
    route = _typed(module, "path", str, where)
    if route is not None:
        changes["path"] = route

    engine_changes: dict[str, Any] = {}
    batch_size = _typed(module, "batch_size", int, where)
    if batch_size is not None:
        engine_changes["batch_size"] = batch_size
    temperature = _typed(module, "temperature", (int, float), where)
    if temperature is not None:
        engine_changes["temperature"] = float(temperature)
    dtype = _typed(module, "dtype_override", str, where)
    if dtype is not None:
        if dtype not in _DTYPES:
            raise ServerConfigError(
                f"{where}dtype_override must be one of {', '.join(_DTYPES)}, got {dtype!r}"
            )
        engine_changes["dtype"] = _DTYPES[dtype]
    if engine_changes:
        try:
            changes["engine"] = dataclasses.replace(base.engine, **engine_changes)
        except ValueError as exc:
            raise ServerConfigError(f"{where}: {exc}") from exc

    delay = _typed(module, "asr_delay_in_tokens", int, where)
    cond_delay = _typed(module, "conditioning_delay", (int, float), where)
    if cond_delay is not None:  # moshi-server: overrides the delay with floor(cd * 12.5) + 1
        delay = math.floor(float(cond_delay) * 12.5) + 1

    model = module.get("model")
    files = {
        key: _typed(module, key, str, where)
        for key in ("lm_model_file", "audio_tokenizer_file", "text_tokenizer_file")
    }
    if model is not None:
        if not isinstance(model, Mapping):
            raise ServerConfigError(f"{where}model must be a table")
        missing = [key for key, value in files.items() if value is None]
        if missing:
            raise ServerConfigError(f"{where}: missing {', '.join(missing)}")
        cfg = parse_moshi_server_model(model, _base_model(model), delay)
        changes["model_files"] = ModelFiles(
            cfg,
            lm=_expand(files["lm_model_file"]),
            mimi=_expand(files["audio_tokenizer_file"]),
            tokenizer=_expand(files["text_tokenizer_file"]),
        )
    elif any(value is not None for value in files.values()):
        raise ServerConfigError(f"{where}: the weight files need a [{where}model] table")
    return base.replace(**changes)
