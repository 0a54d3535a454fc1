"""What every route reads: the engine loop, the HTTP-side tokenizer, the metrics, and the checks that turn a bad
request into an APIError before anything reaches the engine."""

from __future__ import annotations

from dataclasses import dataclass

from plait.server.config import ServerConfig
from plait.server.engine_loop import EngineLoop
from plait.server.errors import APIError
from plait.server.metrics import ServerMetrics
from plait.server.tokenizer import ServerTokenizer


@dataclass
class ServerState:
    loop: EngineLoop
    tokenizer: ServerTokenizer
    metrics: ServerMetrics
    config: ServerConfig
    model_name: str  # what clients send as `model`
    draining: bool = False  # set by SIGTERM: /v1 answers 503 from then on
    in_flight: int = 0  # /v1 requests between arrival and their last byte; a drain waits for 0

    @property
    def max_model_len(self) -> int:
        return self.loop.info.max_model_len

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model `{model}` does not exist; this server serves `{self.model_name}`", "model")

    def check_prompt(self, ids: list[int]) -> list[int]:
        """Empty, too long (>= max_model_len) or out-of-vocabulary prompts are refused here, with the engine's words."""
        try:
            self.loop.info.check_prompt(ids)
        except ValueError as e:
            raise APIError(400, str(e), "prompt") from None
        return ids

    def admit(self, num_requests: int) -> None:
        """Shed load before queueing: 503 when more than --max-waiting requests would wait."""
        limit = self.config.max_waiting
        if limit is not None and self.loop.would_wait(num_requests) > limit:
            raise APIError(503, f"the server is overloaded: more than {limit} requests would wait; retry later")
