"""`plait serve --dp 2` end to end on the tiny checkpoint (CPU, gloo, real processes): one front end over two
replicas, whose load and finished requests /metrics reports as one server's."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import aiohttp
from conftest import char_tokenizer, make_checkpoint
from server_process import ServerProcess

MAX_TOKENS = 80  # long enough that a 50 ms poll sees two running and one waiting, even on a loaded machine


def metric(url: str, name: str) -> float:
    """Sum of every series of `name` (every finish reason of a counter)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M))


def test_dp2_server_sums_the_replicas_metrics(tmp_path):
    """One sequence per replica and three long requests: two run (one on each replica) and one waits, which only
    a sum over both replicas shows; once they finish, the success counter is the number of requests sent."""
    make_checkpoint(tmp_path, "llama")
    char_tokenizer(tmp_path)
    srv = ServerProcess(tmp_path / "dp2.log", "--model", str(tmp_path), "--dp", "2", "--max-num-seqs", "1",
                        "--max-model-len", "256")
    body = {"prompt": "\u0105\u0111\u012a", "max_tokens": MAX_TOKENS, "ignore_eos": True}
    try:
        srv.wait_healthy()

        async def run():
            async with aiohttp.ClientSession() as s:
                async def complete():
                    async with s.post(f"{srv.url}/v1/completions", json=body) as resp:
                        return resp.status, await resp.json()

                tasks = [asyncio.ensure_future(complete()) for _ in range(3)]
                seen = set()
                while not all(t.done() for t in tasks):
                    seen.add((metric(srv.url, "plait:num_requests_running"),
                              metric(srv.url, "plait:num_requests_waiting")))
                    await asyncio.sleep(0.05)
                return [t.result() for t in tasks], seen

        answers, seen = asyncio.run(asyncio.wait_for(run(), 120))
        assert all(status == 200 for status, _ in answers), answers
        assert (2.0, 1.0) in seen, (seen, srv.log_tail())
        assert metric(srv.url, "plait:request_success_total") == 3
        assert metric(srv.url, "plait:generation_tokens_total") == 3 * MAX_TOKENS
        assert metric(srv.url, "plait:prompt_tokens_total") == 3 * 3
        assert metric(srv.url, "plait:num_requests_running") == 0
        assert metric(srv.url, "plait:num_requests_waiting") == 0
    finally:
        srv.stop()
