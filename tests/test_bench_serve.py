"""`plait bench serve`: the figures from hand-made results, the arrival schedules, and real runs of the CLI against
one real `plait serve` on loopback (random, trace and ShareGPT workloads; completions and chat)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from plait import cli
from plait.bench.datasets import SampleRequest, random_requests
from plait.bench.serve import arrival_offsets
from plait.bench.serve_client import RequestResult, ServerTokenizer
from plait.bench.serve_metrics import calculate_metrics, format_table, parse_goodput
from server_process import ServerProcess, free_port

MODEL = "SmolLM2-135M-Instruct"


# --- the figures, from results made by hand -------------------------------------------------------------------

def _result(ttft: float, itl: list[float], tokens: int, prompt_len: int = 10, success: bool = True) -> RequestResult:
    return RequestResult(success=success, prompt_len=prompt_len, output_tokens=tokens, ttft=ttft, itl=itl,
                         latency=ttft + sum(itl), error="" if success else "HTTP 503: overloaded")


def test_metrics_follow_vllm_definitions():
    results = [_result(0.1, [0.02, 0.04], 3), _result(0.3, [0.05] * 4, 5), _result(0.0, [], 0, success=False)]
    m = calculate_metrics(results, duration=2.0, slos={"ttft": 200.0, "tpot": 50.0}, percentiles=[50, 99])
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (2, 1, 20, 8)
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 4.0 and m["total_token_throughput"] == 14.0
    assert m["mean_ttft_ms"] == pytest.approx(200.0) and m["p50_ttft_ms"] == pytest.approx(200.0)
    # TPOT = (latency - TTFT) / (tokens - 1): 60 ms / 2 and 200 ms / 4
    assert m["mean_tpot_ms"] == pytest.approx(40.0) and m["median_tpot_ms"] == pytest.approx(40.0)
    assert m["mean_itl_ms"] == pytest.approx(1e3 * (0.06 + 0.2) / 6)
    assert m["mean_e2el_ms"] == pytest.approx((160.0 + 500.0) / 2)
    assert m["request_goodput"] == 0.5  # only the first meets TTFT <= 200 ms and TPOT <= 50 ms
    table = format_table(m, ["ttft", "tpot", "itl", "e2el"], [50, 99], 32, float("inf"))
    for line in ("Successful requests:                     2", "Failed requests:                         1",
                 "Request goodput (req/s):                 0.50", "P99 TPOT (ms):", "Median E2EL (ms):"):
        assert line in table


def test_goodput_flags():
    assert parse_goodput(["ttft:500", "tpot:50", "e2el:2000.5"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 2000.5}
    assert parse_goodput(None) == {}
    for bad in (["itl:5"], ["ttft"], ["ttft:fast"], ["tpot:-1"]):
        with pytest.raises(ValueError, match="--goodput"):
            parse_goodput(bad)


def test_arrivals():
    rng = np.random.default_rng(0)
    reqs = [SampleRequest("x", 1, 1)] * 4000
    assert arrival_offsets(reqs, float("inf"), 1.0, rng) == [0.0] * 4000
    for burstiness in (1.0, 0.25):
        gaps = np.diff(arrival_offsets(reqs, 10.0, burstiness, rng))
        assert gaps.mean() == pytest.approx(0.1, rel=0.1)  # the rate holds whatever the burstiness
        assert gaps.std() / gaps.mean() == pytest.approx(burstiness ** -0.5, rel=0.1)  # gamma: CV = 1/sqrt(shape)
    trace = [SampleRequest("x", 1, 1, t) for t in (0.0, 0.5, 2.0)]
    assert arrival_offsets(trace, 1.0, 1.0, rng) == [0.0, 0.5, 2.0]
    with pytest.raises(ValueError, match="--request-rate"):
        arrival_offsets(reqs, 0.0, 1.0, rng)


def test_bad_flags_fail_before_touching_a_server(capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    for flags, message in ((["--goodput", "itl:5"], "--goodput"), (["--metric-percentiles", "101"], "percentiles"),
                           (["--max-concurrency", "0"], "--max-concurrency")):
        assert cli.main(["bench", "serve", "--base-url", dead, *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("plait: error:") and message in err


# --- against a real server --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("bench") / "server.log")
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


def bench(server, tmp_path, *flags: str) -> tuple[str, dict]:
    out_json = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "plait.cli", "bench", "serve", "--base-url", server.url, "--disable-tqdm",
           "--output-json", str(out_json), *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr + server.log_tail()
    return out.stdout, json.loads(out_json.read_text())


def counters(server) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"{server.url}/metrics").read().decode()
    names = ("prompt_tokens_total", "generation_tokens_total", "request_success_total")
    return {n: sum(float(v) for v in re.findall(rf"^plait:{n}\{{[^}}]*\}} (\S+)$", text, re.M)) for n in names}


def test_random_prompts_are_cut_by_the_server_tokenizer(server):
    tok = ServerTokenizer.probe(server.url, MODEL, {})
    reqs = random_requests(20, 30, 5, 0.5, np.random.default_rng(1), tok)
    assert all(15 <= r.prompt_len <= 45 and 2 <= r.output_len <= 7 for r in reqs)
    assert len({r.prompt for r in reqs}) == 20
    assert all(abs(len(tok.encode(r.prompt)) - r.prompt_len) <= 1 for r in reqs)  # decode then encode: near-exact
    shared = random_requests(5, 10, 5, 0.0, np.random.default_rng(2), tok, prefix_len=40)  # --random-prefix-len 40
    assert len({tuple(r.prompt.split()[:12]) for r in shared}) == 1  # every prompt opens with the same words
    assert len({r.prompt for r in shared}) == 5 and all(r.prompt_len == 50 for r in shared)
    assert all(abs(len(tok.encode(r.prompt)) - 50) <= 2 for r in shared)


def test_load_run_loses_nothing(server, tmp_path):
    """200 requests at concurrency 32: none fails, and the server counted exactly the tokens the client did."""
    before = counters(server)
    stdout, r = bench(server, tmp_path, "--num-prompts", "200", "--max-concurrency", "32", "--random-input-len", "16",
                      "--random-output-len", "4", "--ignore-eos", "--goodput", "ttft:60000", "tpot:60000",
                      "--plot", str(tmp_path / "run"))
    after = counters(server)
    assert "Serving Benchmark Result" in stdout and "Successful requests:                     200" in stdout
    assert (r["completed"], r["failed"], r["total_output_tokens"]) == (200, 0, 800)
    assert r["errors"] == [""] * 200 and r["request_goodput"] == pytest.approx(r["request_throughput"])
    # The initial test request sends the first prompt once more before the timed run.
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == 800 + 4
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == r["total_input_tokens"] + r["input_lens"][0]
    assert after["request_success_total"] - before["request_success_total"] == 201
    assert r["model"] == MODEL and r["base_url"] == server.url and "bench serve --base-url" in r["command"]
    assert {"git_commit", "date"} <= set(r) and r["settings"]["max_concurrency"] == 32
    for name in ("run-latency-cdf.png", "run-throughput.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trace_is_replayed_in_time(server, tmp_path):
    stamps = [100.0, 100.5, 101.0, 101.5, 102.0]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": t, "input_len": 8, "output_len": 3}) + "\n" for t in stamps))
    _, r = bench(server, tmp_path, "--dataset-name", "trace", "--dataset-path", str(trace), "--ignore-eos")
    assert (r["completed"], r["failed"], r["output_lens"]) == (5, 0, [3] * 5)
    assert r["start_times"] == pytest.approx([t - 100.0 for t in stamps], abs=0.25)


def test_sharegpt_through_chat(server, tmp_path):
    turns = [("Tell me a short story about a brave little robot.", "Once upon a time a robot..."),
             ("What is the capital of France, and why is it famous?", "Paris, famous for..."),
             ("Hi", "Hello!"),  # a prompt under 4 tokens: dropped, as vLLM drops it
             ("Explain why the sky is blue in one sentence please.", "Rayleigh scattering...")]
    data = [{"id": str(i), "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            for i, (q, a) in enumerate(turns)] + [{"id": "lonely", "conversations": [{"from": "human", "value": "x"}]}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    _, r = bench(server, tmp_path, "--backend", "openai-chat", "--dataset-name", "sharegpt", "--dataset-path",
                 str(path), "--num-prompts", "10", "--sharegpt-output-len", "4", "--ignore-eos")
    assert (r["completed"], r["failed"], r["output_lens"]) == (3, 0, [4] * 3)
    assert r["endpoint"].endswith("/v1/chat/completions")
