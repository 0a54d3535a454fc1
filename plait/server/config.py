"""ServerConfig: the flags `plait serve` adds to the engine's, with vLLM's names where vLLM has them."""

from __future__ import annotations

from dataclasses import dataclass

from plait.config import _help


@dataclass(frozen=True)
class ServerConfig:
    host: str = _help("Address to listen on.", default="127.0.0.1")
    port: int = _help("Port to listen on.", default=8000)
    api_key: str | None = _help("If set, /v1 requests must send `Authorization: Bearer KEY`.", default=None)
    served_model_name: str | None = _help("The model name clients use (default: the model's own name).", default=None)
    max_waiting: int | None = _help("Answer 503 when more requests than this would wait (default: no limit).", default=None)
    drain_timeout: float = _help("On SIGTERM, seconds to let running requests finish before exiting.", default=30.0)
    uvicorn_log_level: str = _help("uvicorn's log level: critical, error, warning, info, debug.", default="info")
    disable_uvicorn_access_log: bool = _help("Do not log every HTTP request.", default=False)
    frontend_multiprocessing: bool = _help(
        "Run the engine's step loop in a process of its own, not a thread of the HTTP process (vLLM's default; "
        "--no-frontend-multiprocessing or vLLM's --disable-frontend-multiprocessing for the thread). On one H200 "
        "it served 1.02x and 1.07x the thread's tokens/s at saturation (docs/serving.md).", default=True)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_waiting is not None and self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
        levels = ("critical", "error", "warning", "info", "debug", "trace")
        if self.uvicorn_log_level not in levels:
            raise ValueError(f"uvicorn_log_level must be one of {', '.join(levels)}; got {self.uvicorn_log_level!r}")
