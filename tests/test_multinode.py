"""More than one machine, played by several launchers on this one: `plait generate --nnodes 2 --node-rank 0/1`
(CPU, gloo, real processes) must give the tokens of a single-process run, and a node that is wrong or dies must
fail the others quickly, naming it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import char_tokenizer, make_checkpoint, rank_pids

from plait import LLM, SamplingParams
from plait.executor.executor import RankFailure, free_port
from plait.executor.nodes import HEARTBEAT_S, SILENCE_S
from plait.executor.rendezvous import torchrun_placement

PROMPT_IDS = [5, 17, 42, 99, 7]
MAX_TOKENS = 12


def text_of(ids: list[int]) -> str:
    return "".join(chr(0x100 + i) for i in ids)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("multinode")
    make_checkpoint(path, "llama")
    char_tokenizer(path)
    return str(path)


def launch(folder: str, node_rank: int, port: int, *extra: str) -> subprocess.Popen:
    """A node's launcher in a session of its own, so that killing the session is losing the machine."""
    cmd = [sys.executable, "-m", "plait.cli", "generate", folder, "--device", "cpu", "--dtype", "float32",
           "--max-model-len", "64", "--nnodes", "2", "--node-rank", str(node_rank), "--master-addr", "127.0.0.1",
           "--master-port", str(port), "--max-tokens", str(MAX_TOKENS), "--prompt", text_of(PROMPT_IDS), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                            env={**os.environ, "PYTHONIOENCODING": "utf-8"}, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 50) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, out, err


@pytest.mark.parametrize("layout", ["--tp", "--pp"])
def test_two_nodes_give_the_tokens_of_one_process(folder, layout):
    """TP=2 or PP=2 (one stage of the two layers per node) over two nodes."""
    ref = LLM(folder, device="cpu", dtype="float32", max_model_len=64)
    try:
        expected = ref.generate([PROMPT_IDS], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    finally:
        ref.shutdown()
    expected_ids = expected[0].outputs[0].token_ids
    assert len(expected_ids) >= 4  # enough tokens to tell runs apart

    port = free_port()
    follower = launch(folder, 1, port, layout, "2")
    driver = launch(folder, 0, port, layout, "2")
    code0, out0, err0 = finish(driver)
    code1, _, err1 = finish(follower)
    assert code0 == 0, err0
    assert code1 == 0, err1
    assert out0.strip() == text_of(expected_ids)
    assert "node 1 of 2: ranks 1..1 follow node 0" in err1


def test_a_node_started_with_another_world_is_refused_on_both(folder):
    port = free_port()
    follower = launch(folder, 1, port, "--tp", "4", "--dist-timeout", "20")
    driver = launch(folder, 0, port, "--tp", "2", "--dist-timeout", "20")
    code0, _, err0 = finish(driver)
    code1, _, err1 = finish(follower)
    message = "node 1 (.*) was started with nnodes 2, tp 4 x pp 1 x sp 1 = 4 ranks; node 0 with nnodes 2, tp 2 x pp 1"
    assert code0 == 2 and code1 == 2, (err0, err1)
    for err in (err0, err1):
        assert "plait: error: " in err and "Traceback" not in err
        assert re.search(message, err), err


def test_a_node_that_dies_fails_the_driver_naming_its_rank(folder):
    port = free_port()
    follower = launch(folder, 1, port, "--tp", "2")
    llm = LLM(folder, device="cpu", dtype="float32", max_model_len=256, tensor_parallel_size=2, nnodes=2,
              master_port=port)
    try:
        engine = llm.engine
        engine.add_request(PROMPT_IDS, SamplingParams(max_tokens=240, ignore_eos=True))
        engine.step()
        os.killpg(follower.pid, signal.SIGKILL)  # the machine is gone: its launcher and its rank, so no one reports
        start = time.monotonic()
        with pytest.raises(RankFailure, match="rank 1 on node 1 is lost: node 1 sent no heartbeat"):
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - start < SILENCE_S + 10
    finally:
        llm.shutdown()
        follower.wait()


def test_a_driver_that_dies_ends_the_follower_with_one_line(folder):
    """Node 0's machine is lost mid-run: node 1 stops its ranks and exits 1 within a heartbeat or so, saying why in
    one line (no C++ trace of the store's failed read)."""
    port = free_port()
    long = ("--max-model-len", "512", "--max-tokens", "450")
    follower = launch(folder, 1, port, "--tp", "2", *long)
    driver = launch(folder, 0, port, "--tp", "2", *long)
    try:
        deadline = time.monotonic() + 40
        while not rank_pids(follower.pid):  # admitted: its rank is loading or generating with the driver's
            assert time.monotonic() < deadline and follower.poll() is None, finish(follower)
            time.sleep(0.1)
        time.sleep(2)
        assert driver.poll() is None, "the driver finished before it could be killed"
        os.killpg(driver.pid, signal.SIGKILL)
        start = time.monotonic()
        code, _, err = finish(follower, timeout=30)
        assert time.monotonic() - start < HEARTBEAT_S + 5
    finally:
        for proc in (driver, follower):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 1, err
    assert err.splitlines()[1:] == [f"plait: node 1 lost node 0's rendezvous at 127.0.0.1:{port}: the driver exited or failed"], err


def test_a_node_that_never_joins_times_out_naming_it(folder):
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"node\(s\) \[1\] did not join the rendezvous at 127.0.0.1:\d+ within dist_timeout 1 s"):
        LLM(folder, device="cpu", dtype="float32", tensor_parallel_size=2, nnodes=2, master_port=free_port(),
            dist_timeout=1)
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("changes, match", [
    (dict(tensor_parallel_size=3, nnodes=2, master_port=1234), r"world of 3 ranks .* does not divide over nnodes 2"),
    (dict(tensor_parallel_size=2, nnodes=2, node_rank=2, master_port=1234), r"node_rank must be in \[0, 1\] for nnodes 2, got 2"),
    (dict(tensor_parallel_size=2, nnodes=2), "nnodes 2 needs --master-port"),
    (dict(tensor_parallel_size=2, nnodes=2, master_port=1234, data_parallel_size=2), "data_parallel_size .* not supported"),
    (dict(tensor_parallel_size=4, nnodes=2, master_port=1234, all_reduce_backend="symm_mem"), "group of 4 spans nodes"),
])
def test_placement_errors_name_the_values(changes, match):
    from plait.config import EngineConfig

    with pytest.raises(ValueError, match=match):
        EngineConfig(**changes)


def test_torchrun_variables_place_the_node():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "29500"}
    assert torchrun_placement(env) == {"nnodes": 2, "node_rank": 1, "master_addr": "10.0.0.1", "master_port": 29500}
    assert torchrun_placement({}) == {}
    with pytest.raises(ValueError, match="--nproc-per-node 1 .*LOCAL_WORLD_SIZE 8"):
        torchrun_placement({**env, "LOCAL_WORLD_SIZE": "8"})
