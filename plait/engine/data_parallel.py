"""Data parallelism: D independent replicas (each TP x PP over its own processes and GPUs) behind one front end.

The front end has the engine's interface, so the offline API, the server and the benchmarks drive it
unchanged. A new request goes to the replica with the fewest outstanding tokens; each step every replica
submits its plans before any result is awaited, so the replicas compute at the same time.
"""

from __future__ import annotations

import itertools

from plait.config import EngineConfig
from plait.engine.engine import LLMEngine
from plait.executor.executor import check_visible_gpus
from plait.outputs import RequestOutput
from plait.sampling_params import SamplingParams


class DataParallelEngine:
    def __init__(self, cfg: EngineConfig):
        per_replica = cfg.parallel.replica_world_size
        # Every replica's GPUs at once: each replica's executor checks its own, after the ones before it started.
        check_visible_gpus(cfg, cfg.data_parallel_size * per_replica)
        replica_cfg = cfg.replace(data_parallel_size=1)
        self.replicas: list[LLMEngine] = []
        try:
            for d in range(cfg.data_parallel_size):
                self.replicas.append(LLMEngine(replica_cfg, device_offset=d * per_replica, own_process=True))
        except BaseException:  # the replicas already started stop before the error reaches the caller
            self.shutdown()
            raise
        first = self.replicas[0]
        self.cfg, self.tokenizer, self.model_config = cfg, first.tokenizer, first.model_config
        self.model_name, self.sched_config, self.itemsize = first.model_name, first.sched_config, first.itemsize
        self.owner: dict[str, LLMEngine] = {}
        self._ids = itertools.count()

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return self.replicas[0].tokenize(prompt)

    def _check_prompt(self, ids: list[int]) -> None:
        self.replicas[0]._check_prompt(ids)

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.owner:
            raise ValueError(f"request id {request_id!r} is already in use")
        replica = min(self.replicas, key=lambda r: r.outstanding_tokens())
        self.owner[request_id] = replica
        try:
            return replica.add_request(prompt, params, request_id)
        except ValueError:
            del self.owner[request_id]
            raise

    def abort_request(self, request_id: str) -> None:
        replica = self.owner.pop(request_id, None)
        if replica is not None:
            replica.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.owner) or any(r.has_unfinished_requests() for r in self.replicas)

    def step(self) -> list[RequestOutput]:
        for replica in self.replicas:
            replica.submit_step()
        outputs = [out for replica in self.replicas for out in replica.collect_step()]
        for out in outputs:
            if out.finished:
                self.owner.pop(out.request_id, None)
        return outputs

    def request_counts(self) -> tuple[int, int]:
        counts = [r.request_counts() for r in self.replicas]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def kv_cache_usage(self) -> float:
        """The mean over replicas: each holds its own cache of the same size."""
        return sum(r.kv_cache_usage() for r in self.replicas) / len(self.replicas)

    def prefix_cache_tokens(self) -> tuple[int, int]:
        counts = [r.prefix_cache_tokens() for r in self.replicas]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def shutdown(self) -> None:
        for replica in self.replicas:
            replica.shutdown()


def make_engine(cfg: EngineConfig) -> LLMEngine | DataParallelEngine:
    return DataParallelEngine(cfg) if cfg.data_parallel_size > 1 else LLMEngine(cfg)
