"""`plait serve` that cannot start or loses its engine process: a real server subprocess on loopback each, on
CPU; it exits with a clear line, never a traceback or a hang (a rank that dies: test_server.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket

import aiohttp
import pytest

from conftest import rank_pids
from server_process import ServerProcess

pytestmark = pytest.mark.slow


def test_a_port_in_use_is_refused_before_the_model_loads(tmp_path):
    """Another server holds the port: `plait serve` exits 2 naming it, before it even looks for the model (a model
    that does not exist would otherwise be the error)."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        srv = ServerProcess(tmp_path / "taken.log", "--model", str(tmp_path / "no-such-model"), port=port)
        try:
            code = srv.proc.wait(60)
        finally:
            srv.stop()
    log = srv.log_path.read_text()
    assert code == 2, log
    assert f"plait: error: --port {port} is already in use on 127.0.0.1: stop what listens there or pick another --port" in log
    assert "no-such-model" not in log and "Traceback" not in log


def test_engine_process_dies(tmp_path):
    """The engine's own process is killed: the request in flight gets the error, and the server exits 1 saying so."""
    srv = ServerProcess(tmp_path / "engine.log")
    try:
        srv.wait_healthy()
        (engine,) = rank_pids(srv.proc.pid)

        async def run():
            async with aiohttp.ClientSession() as s:
                body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
                async with s.post(f"{srv.url}/v1/completions", json=body) as stream:
                    await stream.content.readline()
                    os.kill(engine, signal.SIGKILL)
                    return (await stream.read()).decode()

        rest = asyncio.run(asyncio.wait_for(run(), 60))
        code = srv.proc.wait(30)
    finally:
        srv.stop()
    events = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {")]
    failed = "the engine has failed (EngineProcessDied: the engine process exited with code -9"
    assert failed in events[-1]["error"]["message"] and rest.rstrip().endswith("data: [DONE]")
    assert code == 1 and "plait: the engine process exited with code -9" in srv.log_tail(), srv.log_tail()
