"""The step loop's overlap features against the plain loop: asynchronous scheduling, the output thread and
sampling spread over the tensor-parallel ranks give the same outputs (greedy and seeded), also with stop strings,
preemption, aborts, chunked prefill, n > 1 and penalties; its draws against the filtered distribution: test_spread_sampling.py."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import random
import subprocess
import sys

import pytest
import torch

from conftest import make_checkpoint, random_prompts
from plait import LLM, RequestOutputKind, SamplingParams
from plait.config import EngineConfig
from plait.core import PLACEHOLDER, SeqStatus
from plait.engine.output import IncrementalDetokenizer, new_texts, text_decoder
from plait.engine.sampler import SampleInput, Sampler
from test_scheduler import add, make_scheduler, make_seq

VOCAB = 251  # odd: the vocabulary splits unevenly over 2 and 3 ranks


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's byte-level tokenizer: ids below VOCAB are special tokens, characters and raw bytes."""
    from plait.models.loader import _tokenizer_at, default_model_path

    return _tokenizer_at(default_model_path())


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    """A tiny Llama (9 query / 3 KV heads) of VOCAB tokens that has a tokenizer, so stop strings apply."""
    path = tmp_path_factory.mktemp("tokenized")
    make_checkpoint(path, "llama", vocab_size=VOCAB)
    tokenizer.save_pretrained(path)
    return str(path)


# --- units: the scheduler planning ahead, penalties over a pending token, incremental text -----------------------


def test_scheduler_plans_a_step_ahead_with_placeholders_and_late_tokens():
    sched, seqs = make_scheduler(), {}
    a, short = make_seq(5, "a"), make_seq(3, "short")
    short.params.max_tokens = 1
    add(sched, seqs, a, short)
    first = sched.schedule()
    assert [(s.start, len(s.token_ids), s.sample) for s in first.seqs] == [(0, 5, True), (0, 3, True)]
    ahead = sched.schedule()  # before step 1's tokens are known: a decodes its unknown token, short is done
    assert [(s.seq_id, s.start, s.token_ids, s.sample) for s in ahead.seqs] == [(a.seq_id, 5, [PLACEHOLDER], True)]
    assert a.num_pending == 2 and a.num_computed_tokens == 6
    a.append_token(7)  # step 1's token arrives: the ranks learn it with the next plan
    sched.token_known(a)
    assert sched.schedule().late_tokens == [(a.seq_id, 5, 7)]


def test_a_sequence_preempted_with_a_token_in_flight_waits_for_it():
    sched, seqs = make_scheduler(num_blocks=4, block_size=4, budget=64, max_len=16), {}
    a, b = make_seq(6, "a"), make_seq(8, "b")  # 2 blocks each, none left
    add(sched, seqs, a, b)
    sched.schedule()
    sched.schedule()  # b's next position needs a third block: b, the newest, is preempted with its token in flight
    assert b.status is SeqStatus.WAITING and b.num_pending == 1 and b.num_computed_tokens == 0
    sched.finish(a)
    assert sched.schedule().seqs == []  # room now, but b's token is not known yet
    b.append_token(9)
    sched.token_known(b)
    plan = sched.schedule()
    assert [(s.start, s.token_ids) for s in plan.seqs] == [(0, b.prompt_token_ids + [9])] and plan.late_tokens == []


def test_penalties_count_a_pending_token_as_if_it_were_known():
    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=0.5)
    known = [SampleInput(0, params, [1, 2, 3, 4], 2), SampleInput(1, params, [5, 6, 7], 2)]
    pending = [SampleInput(0, params, [1, 2, 3, PLACEHOLDER], 2), SampleInput(1, params, [5, 6, 7], 2)]
    want = Sampler("cpu", {0}).sample(logits, known).tolist()
    got = Sampler("cpu", {0}).sample(logits, pending, (torch.tensor([0]), torch.tensor([4]))).tolist()
    assert got == want


def test_incremental_text_equals_decoding_the_whole_list(tokenizer):
    """Several growing sequences (both skip settings) decoded together, one token each per round, as a step does."""
    rng = random.Random(0)
    lists = [[rng.randrange(tokenizer.vocab_size) for _ in range(300)] + list(range(100, 260)),  # raw bytes too
             list(range(100, 260)) + [rng.randrange(tokenizer.vocab_size) for _ in range(120)]]
    cases = [(ids, skip) for ids in lists for skip in (True, False)]
    detoks = [IncrementalDetokenizer(skip) for _, skip in cases]
    texts = [""] * len(cases)
    decode = text_decoder(tokenizer)  # through the Rust backend (no clean-up)
    for step in range(max(len(ids) for ids, _ in cases)):
        growing = [i for i, (ids, _) in enumerate(cases) if step < len(ids)]
        for i in growing:
            detoks[i].ids.append(cases[i][0][step])
        for i, text in zip(growing, new_texts(decode, [detoks[i] for i in growing], final=False)):
            texts[i] += text
    for i, text in enumerate(new_texts(decode, detoks, final=True)):
        ids, skip = cases[i]
        assert texts[i] + text == tokenizer.decode(ids, skip_special_tokens=skip)


def test_text_decoder_keeps_transformers_clean_up_where_asked(tokenizer):
    """A tokenizer that cleans up spaces after decoding is decoded through transformers, clean-up included."""
    ids = tokenizer.encode("Hello , world ! It 's fine .")
    cleaning = copy.copy(tokenizer)
    cleaning.clean_up_tokenization_spaces = True
    assert text_decoder(cleaning)([ids], True) == [cleaning.decode(ids, skip_special_tokens=True)]
    assert text_decoder(tokenizer)([ids], True) == [tokenizer.decode(ids, skip_special_tokens=True)]


# --- the whole loop: every mode against the plain one, on one mixed workload ---------------------------------------


def workload(stops: dict[int, str]) -> tuple[list[list[int]], list[SamplingParams]]:
    prompts = random_prompts(16, vocab=VOCAB, lo=3, hi=40, seed=21)
    params = []
    for i in range(16):
        kind, length = i % 4, 6 + (7 * i) % 17
        if kind == 0:
            params.append(SamplingParams(temperature=0.0, max_tokens=length, logprobs=2 if i % 8 == 0 else None))
        elif kind == 1:  # a stop string found in the plain run's text
            params.append(SamplingParams(temperature=0.0, max_tokens=24, stop=[stops.get(i, "\x00")],
                                         include_stop_str_in_output=i % 8 == 1))
        elif kind == 2:  # seeded draws with penalties, one request with two completions
            params.append(SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=length,
                                         presence_penalty=0.5, repetition_penalty=1.2, n=2 if i == 6 else 1))
        else:
            params.append(SamplingParams(temperature=0.0, max_tokens=length, min_tokens=2, stop_token_ids=[40, 41],
                                         prompt_logprobs=1 if i == 7 else None))
    for i in (3, 10):  # aborted mid-run
        params[i] = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    return prompts, params


def drive(llm: LLM, prompts, params, abort=("3", "10"), abort_at: int = 4) -> tuple[dict, list]:
    """Step the engine, aborting some requests on the way; returns the finished outputs and every plan sent."""
    engine, sent = llm.engine, []
    submit = engine.executor.submit
    engine.executor.submit = lambda cmd, arg=None: (sent.append(arg), submit(cmd, arg))[1]
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(p, sp, str(i))
    done, steps = {}, 0
    while engine.has_unfinished_requests():
        if steps == abort_at:
            for request_id in abort:
                engine.abort_request(request_id)
        for out in engine.step():
            assert out.request_id not in done, "a finished request was reported again"
            assert steps < abort_at or out.request_id not in abort, "an aborted request was reported"
            if out.finished:
                done[out.request_id] = out
        engine.blocks.check_invariants()
        steps += 1
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.seqs
    engine.executor.submit = submit
    return done, sent


def assert_same_outputs(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for rid in want:
        for g, w in zip(got[rid].outputs, want[rid].outputs, strict=True):
            seen = (g.token_ids, g.text, g.finish_reason, g.stop_reason)
            assert seen == (w.token_ids, w.text, w.finish_reason, w.stop_reason), rid
            for a, b in zip(g.logprobs or [], w.logprobs or [], strict=True):
                assert a.keys() == b.keys()
                assert [v.logprob for v in a.values()] == pytest.approx([v.logprob for v in b.values()], abs=1e-4)
        for a, b in zip(got[rid].prompt_logprobs or [], want[rid].prompt_logprobs or [], strict=True):
            assert (a is None) == (b is None) and (a is None or a.keys() == b.keys())


ENGINE = dict(dtype="float32", device="cpu", max_model_len=96, block_size=4, num_gpu_blocks_override=36,
              max_num_batched_tokens=24, max_num_seqs=8)


@pytest.fixture(scope="module")
def reference(folder):
    """The plain loop at one rank: stop strings picked from its own text, then its outputs with them."""
    llm = LLM(folder, **ENGINE)
    try:
        prompts, params = workload({})
        first, _ = drive(llm, prompts, params, abort=())
        stops = {}
        for i in range(1, 16, 4):  # two printable characters from the second half of the text
            text = first[str(i)].outputs[0].text
            pairs = [text[j : j + 2] for j in range(len(text) // 2, len(text) - 1)]
            stops[i] = next(p for p in pairs if p.isprintable() and "\ufffd" not in p)
        prompts, params = workload(stops)
        return prompts, params, drive(llm, prompts, params)[0]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("tp,modes", [
    (1, [dict(async_scheduling=True), dict(async_scheduling=True, async_output_proc=True)]),
    (2, [dict(), dict(async_scheduling=True, async_output_proc=True),
         dict(sampling_parallel=True, async_scheduling=True)]),
])
def test_every_mode_gives_the_plain_loops_outputs(folder, reference, tp, modes):
    prompts, params, want = reference
    stopped = [o for o in want.values() for c in o.outputs if isinstance(c.stop_reason, str)]
    assert len(stopped) >= 3, "the stop strings should end some requests"
    for kw in modes:
        llm = LLM(folder, tensor_parallel_size=tp, **ENGINE, **kw)
        try:
            got, sent = drive(llm, prompts, params)
        finally:
            llm.shutdown()
        assert_same_outputs(got, want)
        planned_ahead = any(PLACEHOLDER in s.token_ids for plan in sent for s in plan.seqs)
        assert planned_ahead == bool(kw.get("async_scheduling")), kw
        assert any(len(s.token_ids) > 1 and s.start > 0 for plan in sent for s in plan.seqs)  # chunked prefill
        recomputed = any(len(d.token_ids) > d.prompt_len for plan in sent for d in plan.new_seqs)
        assert recomputed, f"the small cache should have preempted someone ({kw})"


def test_final_only_requests_give_the_same_outputs_once_a_completion_ends(folder, reference):
    """The offline API's output kind (what LLM.generate asks for): the same final outputs, and an output only at a
    step where a completion of the request ended, with the output thread behind an asynchronous loop."""
    prompts, params, want = reference
    final = [dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params]
    llm = LLM(folder, **ENGINE, async_scheduling=True, async_output_proc=True)
    seen = []
    step = llm.engine.step
    llm.engine.step = lambda: (outs := step(), seen.extend(outs))[0]
    try:
        got, _ = drive(llm, prompts, final)
    finally:
        llm.shutdown()
    assert_same_outputs(got, want)
    assert seen and all(any(c.finish_reason is not None for c in out.outputs) for out in seen)


def test_delta_requests_add_up_to_the_cumulative_outputs(folder, reference):
    """The server's output kind: each output carries only its step's new tokens (one per completion at most),
    the prompt only in the first, and the deltas add up to the plain loop's outputs, text held back before a
    stop string included, with the output process behind an asynchronous loop."""
    prompts, params, want = reference
    delta = [dataclasses.replace(p, output_kind=RequestOutputKind.DELTA) for p in params]
    llm = LLM(folder, **ENGINE, async_scheduling=True, async_output_proc=True)
    whole: dict[str, object] = {}
    step = llm.engine.step

    def add_up():
        outs = step()
        for out in outs:
            assert out.outputs and all(len(c.token_ids) == 1 for c in out.outputs), out
            if out.request_id not in whole:
                assert out.prompt_token_ids == prompts[int(out.request_id)]
                whole[out.request_id] = out
            else:
                assert out.prompt_token_ids == [] and out.prompt_logprobs is None
                whole[out.request_id].add(out)
        return outs

    llm.engine.step = add_up
    try:
        drive(llm, prompts, delta)
    finally:
        llm.shutdown()
    assert_same_outputs({rid: out for rid, out in whole.items() if out.finished}, want)


def test_plait_generate_streams_the_same_text_with_every_overlap_on(folder):
    from plait.cli import main

    prompt = "x=1;(1,2)"  # every token id below VOCAB
    llm = LLM(folder, dtype="float32", device="cpu", max_model_len=96)
    try:
        want = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[0].outputs[0].text
    finally:
        llm.shutdown()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["generate", folder, "--prompt", prompt, "--max-tokens", "12", "--device", "cpu",
                     "--dtype", "float32", "--max-model-len", "96", "--async-scheduling", "--async-output-proc"]) == 0
    assert out.getvalue() == want + "\n"


def test_bench_throughput_counts_every_token_with_the_output_process(folder, tmp_path):
    """`plait bench throughput` (final outputs only, output process on): every prompt's tokens counted, the
    switches recorded; no GPU timeline off the GPU; the host profile names the step loop's functions."""
    from plait.cli import main

    out = tmp_path / "throughput.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["bench", "throughput", folder, "--device", "cpu", "--dtype", "float32", "--num-prompts", "6",
                     "--input-len", "10", "--output-len", "7", "--async-output-proc", "--profile-host",
                     "--output-json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["requests"], r["output_tokens"], r["async_output_proc"]) == (6, 42, True)
    assert r["output_tok_s"] > 0 and "gpu_busy_fraction" not in r
    rows, own = r["host_profile"], [row["own_us_per_step"] for row in r["host_profile"]]
    assert len(rows) == 30 and r["steps"] >= 7 and own == sorted(own, reverse=True)
    assert all(row["cum_us_per_step"] >= row["own_us_per_step"] for row in rows)
    assert any(row["function"].startswith("plait/engine/") for row in rows)


def test_bench_tp_sweep_records_the_measured_and_the_predicted_t_e(folder, tmp_path):
    """`plait bench tp-sweep` over 2 CPU ranks, TP1 x 2 replicas and TP2: each degree measured and predicted by the
    planner on the built-in figures (no --calibration), with the engine's limits; both t_e in the result."""
    from plait.cli import main

    out, text = tmp_path / "sweep.json", io.StringIO()
    with contextlib.redirect_stdout(text):
        assert main(["bench", "tp-sweep", folder, "--gpus", "2", "--tp-sizes", "1,2", "--device", "cpu",
                     "--dtype", "float32", "--num-prompts", "3", "--input-len", "6", "--output-len", "3",
                     "--max-num-seqs", "8", "--output-json", str(out)]) == 0
    r = json.loads(out.read_text())
    points = r["points"]
    assert [(p["tensor_parallel_size"], p["data_parallel_size"]) for p in points] == [(1, 2), (2, 1)]
    assert all(p["output_tokens"] == 9 and p["predicted_output_tok_s"] > 0 for p in points)
    assert [p["predicted_batch"] for p in points] == [16, 8]  # every replica full at --max-num-seqs
    assert r["t_e"] == max(points, key=lambda p: p["output_tok_s"])["tensor_parallel_size"]
    assert r["predicted_t_e"] == max(points, key=lambda p: p["predicted_output_tok_s"])["tensor_parallel_size"]
    assert r["prediction_figures"].startswith("built-in defaults")
    assert f"t_e = {r['t_e']} measured, {r['predicted_t_e']} predicted" in text.getvalue()


def test_data_parallel_replicas_plan_ahead_too(folder, reference):
    prompts, params, want = reference
    llm = LLM(folder, data_parallel_size=2, async_scheduling=True, async_output_proc=True, **ENGINE)
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
        for replica in llm.engine.replicas:
            assert not replica.has_unfinished_requests() and replica.blocks.num_free == replica.blocks.num_blocks
    finally:
        llm.shutdown()
    assert_same_outputs({str(i): o for i, o in enumerate(outs) if str(i) in want}, want)


def test_async_scheduling_with_pipeline_stages_is_refused():
    with pytest.raises(ValueError, match="async_scheduling needs pipeline_parallel_size 1, got 2"):
        EngineConfig(async_scheduling=True, pipeline_parallel_size=2)


# --- the output process: its failures reach the caller, never a hang ------------------------------------------------


def test_a_dead_output_process_fails_the_next_step(folder):
    llm = LLM(folder, **ENGINE, async_output_proc=True)
    try:
        for i, ids in enumerate(random_prompts(4, vocab=VOCAB, seed=5)):
            llm.engine.add_request(ids, SamplingParams(max_tokens=30, ignore_eos=True), str(i))
        llm.engine.step()
        llm.engine.outputs._proc.kill()
        with pytest.raises(RuntimeError, match="the output process (failed|is gone)"):
            for _ in range(40):
                llm.engine.step()
    finally:
        llm.shutdown()


def test_an_unguarded_script_gets_a_clear_error_instead_of_a_hang(folder, tmp_path):
    """A spawned process re-runs a script without `if __name__ == '__main__':` and dies starting up."""
    script = tmp_path / "unguarded.py"
    script.write_text(f"from plait import LLM\nLLM({folder!r}, dtype='float32', async_output_proc=True)\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert run.returncode != 0
    assert "under `if __name__ == '__main__':`" in run.stderr


def test_the_start_up_heap_is_frozen_while_the_engine_runs_and_collectable_after(folder):
    """plait.engine.heap: the garbage collector skips what start-up made while the engine runs; at shutdown it is
    thawed, so the model's objects (and, on GPU, their memory) go once the engine is dropped."""
    import gc
    import weakref

    llm = LLM(folder, async_output_proc=True, **ENGINE)
    try:
        assert gc.get_freeze_count() > 0
        model = weakref.ref(llm.engine.executor.runner.model)
        assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)[0].outputs[0].token_ids) == 4
    finally:
        llm.shutdown()
    assert gc.get_freeze_count() == 0
    del llm
    gc.collect()
    assert model() is None
