"""`plait serve` end to end: one real server subprocess on loopback (the embedded SmolLM2 on CPU) for the module,
driven by the official openai client and by raw HTTP. The SIGTERM drain test runs last and ends the server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request

import aiohttp
import openai
import pytest

from conftest import rank_pids
from server_process import ServerProcess

pytestmark = pytest.mark.slow

KEY = "test-key"
MODEL = "SmolLM2-135M-Instruct"
MAX_SEQS, MAX_WAITING = 32, 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module, with the engine in a process of its own (the default): the HTTP side shares
    nothing with the engine but the pipe; the thread (--disable-frontend-multiprocessing) has a test of its own."""
    srv = ServerProcess(tmp_path_factory.mktemp("serve") / "server.log", "--api-key", KEY,
                        "--max-num-seqs", str(MAX_SEQS), "--max-waiting", str(MAX_WAITING), "--drain-timeout", "60")
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def call(server, path: str, body: dict | None = None, key: str | None = KEY, data: bytes | None = None):
    """(status, parsed JSON or text) of one request; POST when there is a body."""
    if body is not None:
        data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(server.url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def metric(server, name: str, labels: str = "") -> float:
    """Sum of every series of `name` whose labels contain `labels`."""
    _, text = call(server, "/metrics")
    pattern = rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$"
    return sum(float(v) for lbl, v in re.findall(pattern, text, re.M) if labels in lbl)


def wait_idle(server, timeout: float = 30.0) -> None:
    """Until nothing runs or waits and the KV cache is empty: what an aborted request must leave behind."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (metric(server, "plait:num_requests_running") == 0 and metric(server, "plait:num_requests_waiting") == 0
                and metric(server, "plait:kv_cache_usage_perc") == 0):
            return
        time.sleep(0.1)
    raise AssertionError(f"the server did not go idle: {call(server, '/metrics')[1]}")


def num_tokens(server, prompt: str) -> int:
    return call(server, "/tokenize", {"prompt": prompt})[1]["count"]


def test_models_health_tokenize(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert call(server, "/health", key=None)[0] == 200
    status, tok = call(server, "/tokenize", {"prompt": "Hello world"})
    assert status == 200 and tok["count"] == len(tok["tokens"]) == 2
    assert call(server, "/detokenize", {"tokens": tok["tokens"]})[1] == {"prompt": "Hello world"}
    status, chat = call(server, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]})
    assert status == 200 and chat["count"] > 5


def test_completion_streamed_and_not(server, client):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert "Paris" in r.choices[0].text
    assert r.usage.prompt_tokens == num_tokens(server, prompt)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage == r.usage


def test_chat_streamed_and_not(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert "Paris" in r.choices[0].message.content and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage == r.usage


def test_n_choices_with_a_seed(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", n=3, max_tokens=6, temperature=1.0, seed=7,
                  extra_body={"ignore_eos": True})
    r = client.completions.create(**kwargs)
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(r.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert r.usage.completion_tokens == 18 and len(set(texts)) > 1  # seed + i per choice: different, repeatable
    streamed = ["", "", ""]
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == texts


def test_several_prompts_in_one_call(server, client):
    prompts = ["The capital of France is", "One, two,"]
    kwargs = dict(model=MODEL, prompt=prompts, n=2, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    r = client.completions.create(**kwargs)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]  # prompt * n + choice
    assert r.usage.prompt_tokens == sum(num_tokens(server, p) for p in prompts) and r.usage.completion_tokens == 16
    streamed = ["", "", "", ""]
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == [c.text for c in sorted(r.choices, key=lambda c: c.index)]


def test_stop_strings(client):
    kwargs = dict(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=16, temperature=0, stop=[" 6"])
    r = client.completions.create(**kwargs)
    assert r.choices[0].text == " 4, 5," and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == " 6"
    # Streamed, the " " that may start " 6" is held back until the stop decides, so nothing is sent and taken back.
    streamed = [c.choices[0] for c in client.completions.create(**kwargs, stream=True)]
    assert "".join(c.text for c in streamed) == " 4, 5," and streamed[-1].finish_reason == "stop"


def test_completion_logprobs(client):
    kwargs = dict(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=3,
                  extra_body={"ignore_eos": True})
    lp = client.completions.create(**kwargs).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and chosen == pytest.approx(max(top.values()))  # greedy takes the top token
    streamed = [c.choices[0].logprobs for c in client.completions.create(**kwargs, stream=True)]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset  # counted from the completion's start


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)


def test_32_concurrent_streams(server):
    prompts = [f"Story number {i}: once" for i in range(32)]
    generated_before = metric(server, "plait:generation_tokens_total")

    async def one(ac: openai.AsyncOpenAI, prompt: str):
        text, usage = "", None
        async for chunk in await ac.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0.8,
                                                       stream=True, stream_options={"include_usage": True},
                                                       extra_body={"ignore_eos": True}):
            text += "".join(c.text for c in chunk.choices)
            usage = chunk.usage or usage
        return text, usage

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as ac:
            return await asyncio.gather(*(one(ac, p) for p in prompts))

    results = asyncio.run(run())
    for prompt, (text, usage) in zip(prompts, results):
        assert text and usage.completion_tokens == 8 and usage.prompt_tokens == num_tokens(server, prompt)
    assert metric(server, "plait:generation_tokens_total") - generated_before == 32 * 8
    wait_idle(server)


def test_disconnect_frees_blocks(server):
    """A client that leaves mid-stream, or stops waiting for a plain answer, is aborted and its blocks freed."""
    aborted_before = metric(server, "plait:request_success_total", 'finished_reason="abort"')
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True}

    async def leave_mid_stream():
        async with aiohttp.ClientSession(headers=headers) as s:
            async with s.post(f"{server.url}/v1/completions", json={**body, "stream": True}) as resp:
                for _ in range(3):
                    await resp.content.readline()
                assert metric(server, "plait:num_requests_running") == 1
                assert metric(server, "plait:kv_cache_usage_perc") > 0

    async def stop_waiting():
        async with aiohttp.ClientSession(headers=headers) as s:
            with pytest.raises(asyncio.TimeoutError):
                await s.post(f"{server.url}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=1.5))

    for leave in (leave_mid_stream, stop_waiting):
        asyncio.run(leave())
        wait_idle(server, timeout=15)
    assert metric(server, "plait:request_success_total", 'finished_reason="abort"') - aborted_before == 2


BAD_INPUTS = {
    "malformed JSON": ("/v1/completions", b'{"prompt": "x",', KEY, 400),
    "invalid parameter": ("/v1/completions", {"prompt": "x", "temperature": -1}, KEY, 400),
    "unknown field": ("/v1/completions", {"prompt": "x", "temprature": 0.5}, KEY, 400),
    "wrong type": ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, KEY, 400),
    "empty prompt": ("/v1/completions", {"prompt": ""}, KEY, 400),
    "token outside the vocabulary": ("/v1/completions", {"prompt": [10**7]}, KEY, 400),
    "prompt beyond max_model_len": ("/v1/completions", {"prompt": [1] * 8192}, KEY, 400),
    "no messages": ("/v1/chat/completions", {"messages": []}, KEY, 400),
    "top_logprobs without logprobs": ("/v1/chat/completions",
                                      {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, KEY, 400),
    "unknown model": ("/v1/completions", {"prompt": "x", "model": "gpt-5"}, KEY, 404),
    "wrong API key": ("/v1/completions", {"prompt": "x"}, "wrong", 401),
    "no API key": ("/v1/models", None, None, 401),
    "unknown route": ("/v1/embeddings", {"input": "x"}, KEY, 404),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_an_openai_error(server, case):
    path, body, key, expected = BAD_INPUTS[case]
    status, answer = call(server, path, body if isinstance(body, dict) else None, key,
                          body if isinstance(body, bytes) else None)
    assert status == expected, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    assert "Traceback" not in answer["error"]["message"]
    assert call(server, "/v1/models")[0] == 200  # still serving


def test_openai_client_raises_its_error_classes(client):
    with pytest.raises(openai.BadRequestError, match="temperature must be >= 0"):
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-5", prompt="x")


def test_over_max_waiting_answers_503(server):
    """With every slot busy and --max-waiting requests queued, one more is refused; the queue still finishes."""
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True, "stream": True}

    async def hold(s: aiohttp.ClientSession, started: asyncio.Event):
        async with s.post(f"{server.url}/v1/completions", json=body) as resp:
            assert resp.status == 200
            await started.wait()  # keep the stream open until the check is done

    async def run():
        async with aiohttp.ClientSession(headers=headers) as s:
            done = asyncio.Event()
            holders = [asyncio.create_task(hold(s, done)) for _ in range(MAX_SEQS + MAX_WAITING)]
            deadline = time.monotonic() + 60
            while not (metric(server, "plait:num_requests_running") == MAX_SEQS
                       and metric(server, "plait:num_requests_waiting") == MAX_WAITING):
                assert time.monotonic() < deadline, call(server, "/metrics")[1]
                await asyncio.sleep(0.1)
            async with s.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}) as resp:
                status, answer = resp.status, await resp.json()
            done.set()
            await asyncio.gather(*holders)
            return status, answer

    status, answer = asyncio.run(run())
    assert status == 503 and "overloaded" in answer["error"]["message"]
    wait_idle(server)
    assert call(server, "/v1/completions", {"prompt": "x", "max_tokens": 1})[0] == 200


def test_metrics_names(server):
    _, text = call(server, "/metrics")
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds",
                 "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "prefix_cache_queries_total", "prefix_cache_hits_total"):
        assert f"# TYPE plait:{name.removesuffix('_total')}" in text, name
    assert metric(server, "plait:time_to_first_token_seconds_count") > 0
    finished = metric(server, "plait:request_success_total") - metric(server, "plait:request_success_total", "abort")
    assert metric(server, "plait:e2e_request_latency_seconds_count") == finished > 0  # aborts have no E2E latency
    assert metric(server, "plait:prompt_tokens_total") > 0
    prompt = "The quick brown fox jumps over the lazy dog. " * 8  # several full KV blocks
    hits = metric(server, "plait:prefix_cache_hits_total")
    for _ in range(2):  # the second time its full blocks are cached
        assert call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1})[0] == 200
    deadline = time.monotonic() + 10
    while metric(server, "plait:prefix_cache_hits_total") < hits + 16 and time.monotonic() < deadline:
        time.sleep(0.1)  # the engine thread publishes its counts after the step
    assert metric(server, "plait:prefix_cache_hits_total") >= hits + 16
    assert metric(server, "plait:prefix_cache_queries_total") >= metric(server, "plait:prefix_cache_hits_total")


def test_tp2_server_then_a_rank_dies(client, tmp_path):
    """A TP=2 server (two gloo rank processes) gives the TP=1 answer. When a rank dies, the requests in flight get
    the engine's error (a 500; an error event, then [DONE], in a stream), and the server stops by itself: exit 1,
    the rank named, within seconds (as vLLM's: a supervisor restarts it)."""
    kwargs = dict(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    tp2 = ServerProcess(tmp_path / "tp2.log", "--tp", "2")
    try:
        tp2.wait_healthy()
        answer = openai.OpenAI(base_url=f"{tp2.url}/v1", api_key="none", max_retries=0).completions.create(**kwargs)
        assert answer.choices[0].text == client.completions.create(**kwargs).choices[0].text
        (engine,) = rank_pids(tp2.proc.pid)  # the engine's process, which spawned the ranks
        ranks = rank_pids(engine)
        assert len(ranks) == 2
        long = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}

        async def run():
            async with aiohttp.ClientSession() as s:
                plain = asyncio.ensure_future(s.post(f"{tp2.url}/v1/completions", json=long))
                async with s.post(f"{tp2.url}/v1/completions", json={**long, "stream": True}) as stream:
                    await stream.content.readline()  # its first token
                    while metric(tp2, "plait:num_requests_running") < 2:
                        await asyncio.sleep(0.05)
                    os.kill(ranks[1], signal.SIGKILL)
                    rest = (await stream.read()).decode()
                async with await plain as resp:
                    return rest, resp.status, await resp.json()

        start = time.monotonic()
        rest, status, error = asyncio.run(asyncio.wait_for(run(), 60))
        code = tp2.proc.wait(30)
        assert time.monotonic() - start < 30
    finally:
        tp2.stop()
    failed = "the engine has failed (RankFailure: rank 1 exited with code -9"
    assert status == 500 and failed in error["error"]["message"]
    events = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {")]
    assert failed in events[-1]["error"]["message"] and rest.rstrip().endswith("data: [DONE]")
    assert code == 1, tp2.log_tail()
    assert "plait: rank 1 exited with code -9 without answering" in tp2.log_tail(), tp2.log_tail()


def test_thread_path_streamed_and_not(client, tmp_path):
    """--disable-frontend-multiprocessing (vLLM's name): the step loop in a thread of the HTTP process (no process
    spawned) answers as the default server, its engine in a process of its own, does, streamed or not, and drains
    to exit 0."""
    kwargs = dict(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    expected = client.completions.create(**kwargs).choices[0].text
    srv = ServerProcess(tmp_path / "thread.log", "--disable-frontend-multiprocessing")
    try:
        srv.wait_healthy()
        assert rank_pids(srv.proc.pid) == []
        thread = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
        assert thread.completions.create(**kwargs).choices[0].text == expected
        chunks = list(thread.completions.create(**kwargs, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "length"
    finally:
        srv.stop()
    assert srv.proc.returncode == 0, srv.log_tail()


def test_sigterm_drains_then_exits_0(server):
    """Last: SIGTERM stops new requests (503) while the running stream finishes, then the process exits 0."""
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}

    async def run():
        async with aiohttp.ClientSession(headers=headers) as s:
            async with s.post(f"{server.url}/v1/completions", json=body) as resp:
                first = await resp.content.readline()
                server.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                async with s.post(f"{server.url}/v1/completions", json={"prompt": "x"}) as late:
                    refused = late.status, await late.json()
                rest = (await resp.read()).decode()
            return first.decode() + rest, refused

    stream, (status, answer) = asyncio.run(run())
    assert status == 503 and answer["error"]["code"] == 503
    events = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
    assert events[-1]["usage"]["completion_tokens"] == 24 and stream.rstrip().endswith("data: [DONE]")
    assert server.proc.wait(60) == 0
