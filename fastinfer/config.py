"""One frozen, picklable configuration object.

Every field ``x_y`` is also the flag ``--x-y`` and the environment variable ``FASTINFER_X_Y``;
flags override the environment, which overrides the defaults.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fastinfer.errors import FastInferError

DEFAULT_MODEL_NAME = "efficientnet_lite0"


class ConfigError(FastInferError):
    """A configuration value is missing or malformed."""

    code = "config_error"


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastinfer")


@dataclass(frozen=True)
class Config:
    """Everything ``fastinfer serve`` needs to know. Build it with :meth:`from_sources`."""

    models: tuple[str, ...] = field(
        default=(), metadata={"help": "NAME=PATH of each model to serve (ONNX file); none: the default model"}
    )
    devices: str = field(default="cpu:1", metadata={"help": "cpu:N runs N workers that split the cores"})
    host: str = field(default="127.0.0.1", metadata={"help": "address of the inference listeners"})
    http_port: int = field(default=8080, metadata={"help": "HTTP inference port (0: any free port)"})
    management_port: int = field(default=8081, metadata={"help": "management port, bound to 127.0.0.1"})
    binary_port: int = field(default=8090, metadata={"help": "binary-protocol port"})
    binary_socket: str = field(default="", metadata={"help": "also serve the binary protocol on this Unix socket"})
    cache_dir: str = field(default_factory=_default_cache_dir, metadata={"help": "compiled-model cache"})
    shm_slot_bytes: int = field(default=16 << 20, metadata={"help": "bytes of one shared-memory slot"})
    shm_slots_per_worker: int = field(
        default=32, metadata={"help": "shared-memory slots per worker (a batch takes one, an image one more)"}
    )
    batch_max_size: int = field(default=8, metadata={"help": "most requests one batch holds"})
    batch_max_delay_s: float = field(
        default=0.0, metadata={"help": "longest a partial batch waits for more when a worker is free (0: none)"}
    )
    queue_max_size: int = field(default=256, metadata={"help": "requests waiting per model before 503"})
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
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error"})
    model_store: str = field(default="", metadata={"help": "directory of model files that management may register"})
    header_timeout_s: float = field(
        default=15.0, metadata={"help": "time a connection gets to send a request's headers, or idle between requests"}
    )
    body_timeout_s: float = field(default=30.0, metadata={"help": "time a request gets to send its body (408 past it)"})
    max_connections: int = field(default=1024, metadata={"help": "open connections per HTTP port; past it: 503"})
    inference_token: str = field(
        default="", repr=False, metadata={"help": "bearer token the inference port requires (empty: none)"}
    )
    management_token: str = field(
        default="", repr=False, metadata={"help": "bearer token the management port requires (empty: none)"}
    )

    @classmethod
    def from_sources(
        cls, flags: Mapping[str, object] | None = None, environ: Mapping[str, str] | None = None
    ) -> Config:
        """Defaults, overridden by ``FASTINFER_*`` variables, overridden by flags that were given."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
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
        if self.max_connections < 1:
            raise ConfigError("max_connections must be at least 1")
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise ConfigError("header_timeout_s and body_timeout_s must be positive")

    def model_paths(self) -> dict[str, str]:
        """Model name -> path; the default model (path "") when none is given."""
        if not self.models:
            return {DEFAULT_MODEL_NAME: ""}
        return dict(spec.split("=", 1) for spec in self.models)

    def worker_count(self) -> int:
        kind, _, count = self.devices.partition(":")
        if kind != "cpu" or not count.isdigit() or int(count) < 1:
            raise ConfigError(f"--devices expects cpu:N with N >= 1, got {self.devices!r}")
        return int(count)

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
        if kind.startswith("tuple"):
            return tuple(item for item in raw.replace(",", " ").split() if item)
        return raw
    except ValueError as error:
        raise ConfigError(f"FASTINFER_{f.name.upper()}={raw!r} is not a valid {kind}") from error
