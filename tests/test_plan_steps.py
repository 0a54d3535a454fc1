"""The analytical model's steps: the replayed schedule and pipeline, what each step costs by the kernel that runs it,
and which steps it prices as replayed from CUDA graphs (exactly those the model runner replays)."""

from __future__ import annotations

import dataclasses

import pytest

from plait.plan.calibration import Curve, curve_key, h200_defaults
from plait.plan.costs import stage_time
from plait.plan.predict import EngineLimits, predict
from plait.plan.shapes import Layout, rank_shard
from plait.plan.workload import StepShape, fixed_batch_steps, microbatch_steps


def test_schedule_replay_chunks_prefill_and_counts_rows():
    steps = microbatch_steps(batch=3, input_len=20, output_len=4, budget=32, max_num_seqs=8, prompt_logprobs=True)
    assert [s.chunks for s in steps[:2]] == [((0, 20), (0, 12)), ((20, 1), (12, 8), (0, 20))]
    assert [s.phase for s in steps] == ["prefill", "mixed", "decode", "decode", "decode"]
    assert steps[0].logit_rows == 19 + 1 + 12 and steps[1].logit_rows == 1 + 7 + 1 + 19 + 1
    assert sum(s.first_tokens for s in steps) == sum(s.finished for s in steps) == 3
    assert steps[1].attention_pairs == (20 + 1) + (8 * 12 + 36) + 210 and steps[1].context_tokens == 21 + 20 + 20
    assert [len(mb) for mb in fixed_batch_steps(5, 8, 2, 64, 8, num_microbatches=2)] == [2, 2]  # 3 + 2 requests
    with pytest.raises(ValueError, match="must all be >= 1"):
        microbatch_steps(0, 8, 2, 64, 8)


def test_pipeline_replay_shows_the_bubble(smollm2_config):
    """m equal micro-batches of one prefill step each over p stages take the stages' sum plus (m - 1) times the
    slowest stage: (m + p - 1) stage times for equal stages (no host cost, GPU-bound)."""
    calib = dataclasses.replace(h200_defaults(), host_step_s=0.0, host_per_seq_s=0.0, eager_layer_s=0.0,
                                eager_seq_layer_s=0.0, curves={curve_key("send_recv", "nccl", "eager", 2): Curve([1, 2], [0.0, 0.0])})
    lim = EngineLimits(max_num_batched_tokens=4096)
    for p in (2, 3):
        layout = Layout(1, p)
        pred = predict(smollm2_config, layout, batch=p * 4, input_len=256, output_len=1, calib=calib, lim=lim)
        shape = fixed_batch_steps(4, 256, 1, 4096, 64)[0][0]
        t = [stage_time(smollm2_config, layout, s, shape, calib, 2, graph=False).total_s for s in range(p)]
        assert pred.ttft_s == pytest.approx(sum(t) + (p - 1) * max(t), rel=1e-6)
    one = predict(smollm2_config, Layout(1, 2), 1, 256, 1, calib, lim)  # one sequence: the stages run one after the other
    alone = StepShape(((0, 256),), 1, "prefill")
    assert one.ttft_s == pytest.approx(sum(stage_time(smollm2_config, Layout(1, 2), s, alone, calib, 2, False).total_s
                                           for s in range(2)), rel=1e-6)


def test_async_scheduling_overlaps_the_host_with_the_next_step(smollm2_config):
    """Synchronously a step costs GPU + host; with asynchronous scheduling the host's work on step N's tokens runs
    while the GPU runs step N+1, so a decode step costs the longer of the two. TTFT pays the host once either way:
    the first token reaches the host when its own step is collected, not a step later."""
    base = dataclasses.replace(h200_defaults(), host_per_seq_s=0.0, graph_layer_s=0.0)
    lim = EngineLimits(max_num_batched_tokens=4096)
    decode = fixed_batch_steps(4, 64, 2, 4096, 64)[0][-1]
    gpu = stage_time(smollm2_config, Layout(1), 0, decode, base, 2, graph=True).total_s
    for host in (0.5 * gpu, 2 * gpu):  # GPU-bound, then host-bound
        calib = dataclasses.replace(base, host_step_s=host)
        sync, overlapped = (predict(smollm2_config, Layout(1), 4, 64, 2, calib, dataclasses.replace(lim, async_scheduling=a))
                            for a in (False, True))
        assert sync.tpot_s == pytest.approx(gpu + host, rel=1e-6)
        assert overlapped.tpot_s == pytest.approx(max(gpu, host), rel=1e-6)
        assert overlapped.ttft_s == pytest.approx(sync.ttft_s, rel=1e-6)
        assert overlapped.comm_share == sync.comm_share == 0.0
    # the default follows the engine: on with a GPU and one stage, off with pipeline stages or on CPU
    assert lim.resolved_async_scheduling(base, Layout(1)) and not lim.resolved_async_scheduling(base, Layout(1, 2))
    assert not lim.resolved_async_scheduling(dataclasses.replace(base, device="cpu"), Layout(1))


def test_eager_pipeline_stages_issue_at_once(smollm2_config):
    """CPU-bound eager steps: every stage's CPU issues its layers from the plan's submission, so a pipeline step
    takes about one stage's issue time, not the sum over stages; and the issue time follows the kernels:
    per layer, per prompt that flash attends one by one (one prompt, or long ones; several short prompts go in one
    launch), per collective (no prefill graphs: each prompt runs eager)."""
    calib = dataclasses.replace(h200_defaults(), host_step_s=0.0, host_per_seq_s=0.0, eager_layer_s=1e-3,
                                eager_seq_layer_s=1e-4, eager_collective_s=2e-4)
    for p in (1, 2, 3):
        stage = len(rank_shard(smollm2_config, Layout(1, p), 0).layers)
        one = predict(smollm2_config, Layout(1, p), 1, 16, 1, calib, EngineLimits(max_prefill_graph_tokens=0))
        assert one.ttft_s == pytest.approx(stage * 1.1e-3, rel=0.02)  # + the later stages' GPU work, tiny here
    long, short = StepShape(((0, 600), (0, 600)), 2, "prefill"), StepShape(((0, 16), (0, 16)), 2, "prefill")
    mixed = StepShape(((16, 1), (0, 16)), 2, "mixed")
    tp2 = [stage_time(smollm2_config, Layout(2), 0, shape, calib, 2, graph=False) for shape in (long, short, mixed)]
    collectives = 2 * smollm2_config.num_layers + 2  # o_proj and down_proj per layer, embedding, lm_head
    assert tp2[0].cpu_s == pytest.approx(smollm2_config.num_layers * 1.2e-3 + collectives * 2e-4)
    for one_launch in tp2[1:]:
        assert one_launch.cpu_s == pytest.approx(smollm2_config.num_layers * 1e-3 + collectives * 2e-4)


def test_attention_follows_the_kernel_that_runs_it():
    """The paged prefill kernel computes whole 64 x 64 tiles up to each tile's causal end; a decode row mixed into
    a step costs a tile of queries over its context."""
    from plait.plan.costs import paged_prefill_pairs

    assert paged_prefill_pairs(((0, 64),)) == 64 * 64
    assert paged_prefill_pairs(((0, 65),)) == 64 * 64 + 64 * 128
    assert paged_prefill_pairs(((100, 1),)) == 64 * 128  # keys 0..100 in two blocks of 64
    assert StepShape(((0, 5), (0, 7)), 2, "prefill").fresh and not StepShape(((3, 1), (0, 7)), 2, "mixed").fresh


def test_graphs_are_priced_where_the_engine_replays_them(llama8b):
    """The model runner replays one whole new prompt of up to max_prefill_graph_tokens (its largest bucket) from a
    CUDA graph (`ModelRunner._prefill_graph_step`), several sequences with prompt tokens from a mixed graph (unless
    they are new prompts flash attends one by one), and on a pipeline stage its decode body; the model prices
    those steps, and only those, without the CPU's eager issue."""
    from plait.engine.cuda_graph import graph_token_cap, prefill_graph_tokens
    from plait.plan.costs import uses_graph

    calib, lim = h200_defaults(), EngineLimits(8192, 32)
    assert prefill_graph_tokens(512) == 512 and prefill_graph_tokens(300) == 256 and prefill_graph_tokens(8) == 0
    assert graph_token_cap(512, 8192, None) == 512 and graph_token_cap(512, 300, None) == 300
    assert prefill_graph_tokens(graph_token_cap(512, 8192, 100)) == 64  # Shift: TP mode only
    assert prefill_graph_tokens(graph_token_cap(512, 8192, 0)) == 0
    one = StepShape(((0, 128),), 1, "prefill")
    assert uses_graph(calib, Layout(1), one, lim) and uses_graph(calib, Layout(2), one, lim)
    assert not uses_graph(calib, Layout(1), StepShape(((0, 600),), 1, "prefill"), lim)  # past the largest bucket
    two, mixed = StepShape(((0, 64), (0, 64)), 2, "prefill"), StepShape(((300, 1), (40, 1), (0, 100)), 2, "mixed")
    assert uses_graph(calib, Layout(1), two, lim) and uses_graph(calib, Layout(2), mixed, lim)  # mixed graphs
    assert not uses_graph(calib, Layout(1), two, dataclasses.replace(lim, mixed_graphs=False))  # a record from before
    assert not uses_graph(calib, Layout(1), StepShape(((0, 600), (0, 9)), 2, "prefill"), lim)  # flash, prompt by prompt
    assert not uses_graph(calib, Layout(1), StepShape(((0, 300), (0, 300)), 2, "prefill"), lim)  # past the largest bucket
    assert not uses_graph(calib, Layout(1), StepShape(((0, 128),), 127, "prefill"), lim)  # prompt logprobs: all rows
    logprobs = dataclasses.replace(lim, prompt_logprobs=True)
    assert not uses_graph(calib, Layout(1), two, logprobs)
    assert uses_graph(calib, Layout(1), StepShape(((300, 1), (40, 1)), 2, "decode"), logprobs)  # decode rows never ask
    assert not uses_graph(calib, Layout(1, 2), one, lim) and not uses_graph(calib, Layout(1, sp=2), one, lim)
    assert not uses_graph(calib, Layout(1), one, dataclasses.replace(lim, enforce_eager=True))
    shift = Layout(1, sp=2, shift_threshold=256)  # Shift's TP mode has prefill graphs, their buckets up to the threshold
    assert uses_graph(calib, shift, one, lim) and not uses_graph(calib, dataclasses.replace(shift, shift_threshold=0), one, lim)
    ninety = StepShape(((0, 90),), 1, "prefill")  # TP mode at threshold 100, but past the largest bucket there
    assert uses_graph(calib, shift, ninety, lim)
    assert not uses_graph(calib, dataclasses.replace(shift, shift_threshold=100), ninety, lim)
    decode = StepShape(((128, 1), (40, 1)), 2, "decode")  # a pipeline stage replays its decode body, not its prefills
    assert uses_graph(calib, Layout(1, 2), decode, lim)
    assert not uses_graph(calib, Layout(1, 2), decode, dataclasses.replace(lim, layout_graphs=False))
    # SP mode replays decode at every batch bucket, alone or above Shift's threshold; its prefills run eager
    wide = StepShape(tuple((128, 1) for _ in range(20)), 20, "decode")
    sp, shift8, before = Layout(1, sp=2), dataclasses.replace(shift, shift_threshold=8), dataclasses.replace(lim, layout_graphs=False)
    assert all(uses_graph(calib, layout, s, lim) for layout in (sp, shift8) for s in (decode, wide))
    assert not uses_graph(calib, sp, decode, before) and not uses_graph(calib, shift8, wide, before)
    assert uses_graph(calib, shift8, decode, before)  # two rows: Shift's TP mode, graphed before SP graphs existed
    assert not uses_graph(calib, sp, wide, dataclasses.replace(lim, max_num_seqs=16))
    old = EngineLimits.recorded({"max_num_batched_tokens": 2048, "max_num_seqs": 8, "dtype": "bfloat16"})
    assert (old.max_prefill_graph_tokens, old.layout_graphs, old.mixed_graphs) == (0, False, False)  # from before
    graphed = predict(llama8b, Layout(1), 1, 128, 8, calib, lim)
    eager = predict(llama8b, Layout(1), 1, 128, 8, calib, dataclasses.replace(lim, max_prefill_graph_tokens=0))
    # benchmarks/results/latency_tp1_bs1.json: this prompt's TTFT measured 6.07 ms with prefill graphs on one H200
    assert graphed.ttft_s == pytest.approx(6.07e-3, rel=0.15) and eager.ttft_s > 3 * graphed.ttft_s
    assert graphed.tpot_s == pytest.approx(eager.tpot_s)


def test_prefill_floor_is_the_slower_of_compute_and_the_weight_read(llama8b):
    """A short prompt cannot beat one read of the weights (its FLOPs alone would put its floor below a decode
    step's); a long one is bound by the matrix rate."""
    from plait.bench import floors

    bw, rate = 4.27e12, 800e12  # one H200, as measured (benchmarks/results/latency_tp1_bs1.json)
    weights = floors.decode_floor_s(llama8b, 2, 0, 1, bw)
    assert floors.prefill_floor_s(llama8b, 2, [128], 1, rate, bw) == weights
    assert floors.prefill_flops(llama8b, [128]) / rate < weights
    long = floors.prefill_floor_s(llama8b, 2, [8192], 2, rate, bw)
    assert long == floors.prefill_flops(llama8b, [8192]) / rate / 2 > weights / 2


@pytest.mark.parametrize("max_batch,multiple,above", [(256, 1, 0), (64, 2, 0), (64, 3, 0), (64, 2, 8), (60, 8, 40),
                                                      (60, 8, 60), (8, 2, 8), (5, 4, 0)])
def test_graph_buckets_hold_every_batch_they_are_for(max_batch, multiple, above):
    """Decode graphs replay the smallest bucket that holds the batch: every batch in (above, max_batch] has one, each
    bucket splits evenly over the sequence-parallel ranks, and no bucket is captured that no batch can use."""
    from plait.engine.cuda_graph import graph_buckets

    buckets = graph_buckets(max_batch, multiple, above)
    assert all(b % multiple == 0 and b > above for b in buckets)
    smallest = [next(b for b in buckets if b >= n) for n in range(above + 1, max_batch + 1)]
    assert set(smallest) == set(buckets)  # each bucket is the smallest for some batch


def test_the_planner_graphs_the_steps_the_runner_replays():
    """For steps of several sequences, `uses_graph` and the model runner's choice (`takes_mixed` within the largest
    mixed bucket) agree: new prompts attended one by one (one of them long) run eager, anything else replays."""
    from plait.engine.cuda_graph import graph_token_cap, mixed_buckets, takes_mixed
    from plait.plan.costs import uses_graph

    calib, lim = h200_defaults(), EngineLimits(8192, 256)
    most = max(mixed_buckets(graph_token_cap(lim.max_prefill_graph_tokens, lim.max_num_batched_tokens, None)))
    steps = [((0, 64), (0, 64)), ((0, 600), (0, 9)), ((100, 1), (0, 200)), ((0, 300), (0, 300)), ((0, 512), (0, 1)),
             ((20, 44), (7, 1), (9, 1)), tuple((50, 1) for _ in range(200))]
    for chunks in steps:
        shape = StepShape(chunks, len(chunks), "decode" if all(n == 1 for _, n in chunks) else "mixed")
        query, seq = [n for _, n in chunks], [s + n for s, n in chunks]
        runner = shape.phase == "decode" or (takes_mixed(query, seq) and shape.tokens <= most)
        assert uses_graph(calib, Layout(1), shape, lim) == runner, chunks
