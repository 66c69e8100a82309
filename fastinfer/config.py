"""One frozen, picklable configuration object.

Every field ``x_y`` is also the key ``x_y`` of the TOML config file, the flag ``--x-y`` and the
environment variable ``FASTINFER_X_Y``. Precedence: defaults < config file < environment < flags.
The config file is ``--config`` (or ``$FASTINFER_CONFIG``), else ``/etc/fastinfer/config.toml``
when it exists; ``config`` itself is a loader option, not a field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastinfer.errors import FastInferError

DEFAULT_MODEL_NAME = "efficientnet_lite0"
DEFAULT_CONFIG_PATH = "/etc/fastinfer/config.toml"
CONFIG_ENV = "FASTINFER_CONFIG"


class ConfigError(FastInferError):
    """A configuration value is missing or malformed."""

    code = "config_error"


# The settings a model may have of its own (``--model-limits``), as Triton's per-model config has.
MODEL_LIMIT_KEYS: dict[str, type] = {
    "batch_max_size": int,
    "batch_max_delay_s": float,
    "queue_max_size": int,
    "queue_max_delay_s": float,
}


@dataclass(frozen=True)
class ModelLimits:
    """How one model's requests are batched and queued: the server-wide values, except those the
    model sets itself in ``model_limits``."""

    batch_max_size: int
    batch_max_delay_s: float
    queue_max_size: int
    queue_max_delay_s: float


def parse_model_limits(specs: tuple[str, ...]) -> dict[str, dict[str, int | float]]:
    """``("resnet:batch_max_size=4", ...)`` -> ``{"resnet": {"batch_max_size": 4}}``, checked."""
    overrides: dict[str, dict[str, int | float]] = {}
    for spec in specs:
        name, _, setting = spec.partition(":")
        key, sep, raw = setting.partition("=")
        if not name or not sep:
            raise ConfigError(f"--model-limits expects NAME:KEY=VALUE, got {spec!r}")
        kind = MODEL_LIMIT_KEYS.get(key)
        if kind is None:
            raise ConfigError(f"--model-limits {spec!r}: {key!r} is not one of {', '.join(MODEL_LIMIT_KEYS)}")
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(f"--model-limits {spec!r}: {raw!r} is not a valid {kind.__name__}") from None
        if not _within_limit(key, value):
            raise ConfigError(f"--model-limits {spec!r}: {key} must be {_LIMIT_RANGES[key]}")
        overrides.setdefault(name, {})[key] = value
    return overrides


_LIMIT_RANGES = {
    "batch_max_size": "at least 1",
    "batch_max_delay_s": "a finite number, 0 or more",
    "queue_max_size": "at least 1",
    "queue_max_delay_s": "a finite number above 0",
}


def _within_limit(key: str, value: float) -> bool:
    if key == "batch_max_delay_s":
        return math.isfinite(value) and value >= 0
    if key == "queue_max_delay_s":
        return math.isfinite(value) and value > 0
    return value >= 1


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastinfer")


@dataclass(frozen=True)
class Config:
    """Everything ``fastinfer serve`` needs to know. Build it with :meth:`from_sources`."""

    models: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "NAME=PATH of each model: an ONNX or .fia file, or a folder of them; none: the default model"
        },
    )
    devices: str = field(
        default="cpu:1",
        metadata={"help": "cpu:N runs N workers that split the cores; cuda:0,cuda:1 runs one worker per GPU"},
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address of the inference listeners"})
    http_port: int = field(default=8080, metadata={"help": "HTTP inference port (0: any free port)"})
    management_port: int = field(default=8081, metadata={"help": "management port, bound to 127.0.0.1"})
    binary_port: int = field(default=8090, metadata={"help": "binary-protocol port"})
    grpc_port: int = field(default=8085, metadata={"help": "KServe v2 gRPC port (0: off, -1: any free port)"})
    allow_client_shm: bool = field(
        default=False,
        metadata={"help": "let local clients register shared-memory regions for tensors (Triton's extension)"},
    )
    binary_socket: str = field(default="", metadata={"help": "also serve the binary protocol on this Unix socket"})
    cache_dir: str = field(
        default_factory=_default_cache_dir,
        metadata={"help": "compiled-model cache", "default_text": "$XDG_CACHE_HOME/fastinfer, else ~/.cache/fastinfer"},
    )
    shm_slot_bytes: int = field(default=16 << 20, metadata={"help": "bytes of one shared-memory slot"})
    shm_slots_per_worker: int = field(
        default=32, metadata={"help": "shared-memory slots per worker (a batch takes one, an image one more)"}
    )
    batch_max_size: int = field(default=8, metadata={"help": "most requests one batch holds"})
    batch_max_delay_s: float = field(
        default=0.0, metadata={"help": "longest a partial batch waits for more when a worker is free (0: none)"}
    )
    batch_max_runs: int = field(
        default=4,
        metadata={"help": "a model compiled for fixed batch sizes: most runs of its largest size one batch holds"},
    )
    gpu_batch_max_size: int = field(
        default=64, metadata={"help": "batch_max_size of GPU workers (a GPU's throughput grows with the batch)"}
    )
    gpu_batch_max_delay_s: float = field(
        default=0.002, metadata={"help": "batch_max_delay_s of GPU workers: a short wait lets batches fill"}
    )
    queue_max_size: int = field(default=256, metadata={"help": "requests waiting per model before 503"})
    queue_max_delay_s: float = field(
        default=5.0,
        metadata={"help": "a request that would wait longer for its batch (at the measured rate) gets 503 at once"},
    )
    model_limits: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "a model's own batch and queue limits, as NAME:KEY=VALUE (one setting each; KEY: "
            + ", ".join(MODEL_LIMIT_KEYS)
            + ")"
        },
    )
    max_body_bytes: int = field(default=16 << 20, metadata={"help": "largest request body accepted"})
    max_image_pixels: int = field(default=40_000_000, metadata={"help": "decompression-bomb limit"})
    worker_start_timeout_s: float = field(default=600.0, metadata={"help": "compile + load + warm-up limit"})
    request_timeout_s: float = field(
        default=60.0, metadata={"help": "default deadline of a request (X-Deadline-Ms / deadline_ms override it)"}
    )
    worker_heartbeat_s: float = field(default=1.0, metadata={"help": "worker heartbeat period"})
    batch_timeout_s: float = field(default=120.0, metadata={"help": "a worker holding a batch longer is hung"})
    restart_max_count: int = field(default=5, metadata={"help": "restarts within restart_window_s before giving up"})
    restart_window_s: float = field(default=60.0, metadata={"help": "window of restart_max_count"})
    shutdown_timeout_s: float = field(default=10.0, metadata={"help": "time in-flight requests get to finish"})
    shutdown_delay_s: float = field(
        default=0.0,
        metadata={"help": "on SIGTERM, time readiness fails while requests are still served (load balancers lag)"},
    )
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error"})
    model_store: str = field(
        default="", metadata={"help": "directory of model files management may register; no --models: serve its .fia"}
    )
    header_timeout_s: float = field(
        default=15.0, metadata={"help": "time a connection gets to send a request's headers, or idle between requests"}
    )
    body_timeout_s: float = field(default=30.0, metadata={"help": "time a request gets to send its body (408 past it)"})
    max_connections: int = field(
        default=1024, metadata={"help": "open connections per port (HTTP and binary); past it: 503"}
    )
    inference_token: str = field(
        default="",
        repr=False,
        metadata={"help": "token the inference ports (HTTP bearer, binary HELLO) require (empty: none)"},
    )
    management_token: str = field(
        default="", repr=False, metadata={"help": "bearer token the management port requires (empty: none)"}
    )

    @classmethod
    def load(
        cls,
        flags: Mapping[str, object] | None = None,
        config_file: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Config:
        """Read the config file (see :func:`config_file_path`), then apply :meth:`from_sources`."""
        environ = os.environ if environ is None else environ
        path = config_file_path(config_file, environ)
        file_values = read_config_file(path) if path is not None else None
        return cls.from_sources(flags, environ, file_values)

    @classmethod
    def from_sources(
        cls,
        flags: Mapping[str, object] | None = None,
        environ: Mapping[str, str] | None = None,
        file_values: Mapping[str, object] | None = None,
    ) -> Config:
        """Defaults, overridden by ``file_values`` (see :func:`read_config_file`), by ``FASTINFER_*``
        variables, then by flags that were given."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = dict(file_values or {})
        for f in dataclasses.fields(cls):
            raw = environ.get(f"FASTINFER_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _parse(f, raw)
        for name, value in (flags or {}).items():
            if value is not None:
                values[name] = tuple(value) if isinstance(value, list) else value
        config = cls(**values)  # type: ignore[arg-type]
        config.validate()
        return config

    def validate(self) -> None:
        for spec in self.models:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"--models expects NAME=PATH, got {spec!r}")
        self.worker_count()
        if self.max_body_bytes > self.shm_slot_bytes:
            raise ConfigError("max_body_bytes cannot exceed shm_slot_bytes: a body must fit one slot")
        if min(self.batch_max_size, self.gpu_batch_max_size, self.batch_max_runs) < 1:
            raise ConfigError("batch_max_size, gpu_batch_max_size and batch_max_runs must be at least 1")
        if self.max_connections < 1:
            raise ConfigError("max_connections must be at least 1")
        if self.shutdown_delay_s < 0 or self.shutdown_timeout_s < 0:
            raise ConfigError("shutdown_delay_s and shutdown_timeout_s cannot be negative")
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0 or self.queue_max_delay_s <= 0:
            raise ConfigError("header_timeout_s, body_timeout_s and queue_max_delay_s must be positive")
        parse_model_limits(self.model_limits)

    def model_paths(self) -> dict[str, str]:
        """Model name -> path; the default model (path "") when none is given."""
        if not self.models and self.model_store:
            from fastinfer.archive.store import store_models

            found = store_models(self.model_store)  # every archive in the store, versions side by side
            if found:
                return found
        if not self.models:
            return {DEFAULT_MODEL_NAME: ""}
        from fastinfer.archive.store import folder_models

        paths: dict[str, str] = {}
        for name, path in (spec.split("=", 1) for spec in self.models):
            # a folder (KServe's /mnt/models) holds the model file(s) that name stands for
            paths.update(folder_models(name, path) if os.path.isdir(path) else {name: path})
        return paths

    def worker_count(self) -> int:
        return len(self.device_list())

    def device_list(self) -> list[str]:
        """One device per worker: ``cpu`` N times for ``cpu:N``; ``cuda:I`` for each GPU named.

        CPU and GPU workers do not mix: a generation's batcher has one set of batch limits.
        """
        items = [item.strip() for item in self.devices.split(",") if item.strip()]
        kind, _, count = self.devices.partition(":")
        if kind == "cpu" and count.isdigit() and int(count) >= 1:
            return ["cpu"] * int(count)
        if items and all(i.startswith("cuda:") and i[5:].isdigit() for i in items) and len(set(items)) == len(items):
            return [f"cuda:{int(i[5:])}" for i in items]
        raise ConfigError(
            f"--devices expects cpu:N with N >= 1, or GPUs such as cuda:0 or cuda:0,cuda:1, got {self.devices!r}"
        )

    @property
    def on_gpus(self) -> bool:
        return self.device_list()[0] != "cpu"

    def batch_limits(self) -> tuple[int, float]:
        """``(batch_max_size, batch_max_delay_s)`` for this config's workers: GPUs prefer large batches."""
        if self.on_gpus:
            return self.gpu_batch_max_size, self.gpu_batch_max_delay_s
        return self.batch_max_size, self.batch_max_delay_s

    def limits_for(self, model: str) -> ModelLimits:
        """``model``'s batch and queue limits: its own settings over the server-wide ones."""
        batch_max_size, batch_max_delay_s = self.batch_limits()
        server_wide = ModelLimits(batch_max_size, batch_max_delay_s, self.queue_max_size, self.queue_max_delay_s)
        own: dict[str, Any] = parse_model_limits(self.model_limits).get(model, {})
        return dataclasses.replace(server_wide, **own)

    def model_batch_limits(self) -> dict[str, int]:
        """The models whose batches may hold more or fewer rows than ``batch_limits()`` says: the
        workers lay out those models' batches by the same numbers as the batcher."""
        overrides = parse_model_limits(self.model_limits)
        return {name: int(own["batch_max_size"]) for name, own in overrides.items() if "batch_max_size" in own}

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir)


def _parse(f: dataclasses.Field, raw: str) -> object:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            return _BOOLS[raw.strip().lower()]
        if kind.startswith("tuple"):
            return tuple(item for item in raw.replace(",", " ").split() if item)
        return raw
    except (ValueError, KeyError) as error:
        raise ConfigError(f"FASTINFER_{f.name.upper()}={raw!r} is not a valid {kind}") from error


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def config_file_path(config_file: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The config file to read: ``config_file`` (the ``--config`` flag), else ``$FASTINFER_CONFIG``,
    else :data:`DEFAULT_CONFIG_PATH` if it exists, else None. An empty value means no file."""
    environ = os.environ if environ is None else environ
    for named in (config_file, environ.get(CONFIG_ENV)):
        if named is not None:
            return named or None
    return DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None


def read_config_file(path: str | os.PathLike[str]) -> dict[str, object]:
    """The values a TOML config file sets, checked: keys are Config fields, values of their type."""
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"cannot read config file {os.fspath(path)}: {error.strerror or error}") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {os.fspath(path)} is not valid TOML: {error}") from error
    fields = {f.name: f for f in dataclasses.fields(Config)}
    values: dict[str, object] = {}
    for key, value in document.items():
        if key not in fields:
            raise ConfigError(f"config file {os.fspath(path)}: unknown key {key!r}")
        values[key] = _checked(fields[key], value, os.fspath(path))
    return values


def _kind(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _checked(f: dataclasses.Field, value: object, path: str) -> object:
    kind = _kind(f)
    if kind.startswith("tuple"):
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        expected = "a list of strings"
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        expected = "an integer"
    elif kind == "bool":
        if isinstance(value, bool):
            return value
        expected = "true or false"
    elif kind == "float":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        expected = "a number"
    else:
        if isinstance(value, str):
            return value
        expected = "a string"
    raise ConfigError(f"config file {path}: {f.name} must be {expected}, got {value!r}")


CONFIG_HEADER = """\
# fastinfer configuration (TOML). Every key is also a flag of `fastinfer serve` (http_port is
# --http-port) and an environment variable (FASTINFER_HTTP_PORT). Precedence: defaults < this
# file < FASTINFER_* variables < flags. `fastinfer config --print` shows the effective values.
# `systemctl reload fastinfer` (SIGHUP) applies changes to models and devices without failing a
# request; other changes need `systemctl restart fastinfer`.
"""

TEMPLATE_HEADER = """\
# Every key is commented out, showing its default: uncomment the ones to change.
"""

# The template shows these values instead of defaults that depend on who runs it.
TEMPLATE_VALUES: dict[str, object] = {"cache_dir": "/var/cache/fastinfer"}
_SOCKET_NOTE = "with fastinfer-{}.socket enabled, systemd owns the port and its ListenStream= applies instead"
TEMPLATE_NOTES = {
    "models": 'e.g. ["resnet50=/var/lib/fastinfer/models/resnet50.onnx"]',
    "model_limits": 'e.g. ["resnet50:batch_max_size=4", "resnet50:queue_max_delay_s=0.5"]',
    "http_port": _SOCKET_NOTE.format("http"),
    "management_port": _SOCKET_NOTE.format("management"),
    "binary_port": _SOCKET_NOTE.format("binary"),
    "cache_dir": "fastinfer.service sets FASTINFER_CACHE_DIR=/var/cache/fastinfer, which wins over this file",
    "inference_token": "better set FASTINFER_INFERENCE_TOKEN than write a secret here",
    "management_token": "better set FASTINFER_MANAGEMENT_TOKEN than write a secret here",
}


def config_toml(config: Config, *, template: bool = False) -> str:
    """``config`` as TOML: each key after a comment with its help text and default.

    With ``template`` every key is commented out (the file sets nothing: the defaults apply) and
    the values shown are the defaults: this is ``scripts/config.toml``, the installed template.
    Otherwise the values are ``config``'s, and tokens that are set are not shown.
    """
    lines = [CONFIG_HEADER + (TEMPLATE_HEADER if template else "")]
    for f in dataclasses.fields(config):
        default = _default_of(f)
        default_text = f.metadata.get("default_text") or _toml_value(default)
        lines.append(f"# {f.metadata.get('help', f.name)} (default: {default_text})")
        value = getattr(config, f.name)
        if template:
            if f.name in TEMPLATE_NOTES:
                lines.append(f"# ({TEMPLATE_NOTES[f.name]})")
            lines.append(f"# {f.name} = {_toml_value(TEMPLATE_VALUES.get(f.name, default))}")
        elif not f.repr and value:
            lines.append(f"# {f.name} is set, not shown")
        else:
            lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _default_of(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING
    return f.default_factory()


def _toml_value(value: object) -> str:
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf" if value < 0 else "nan")
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a TOML basic string
