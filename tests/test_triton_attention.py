"""The Triton paged-attention kernels against the PyTorch reference (CPU: Triton interpreter; GPU: the real thing)."""

from __future__ import annotations

import pytest
import torch

from plait.layers.attention import AttentionMetadata, PagedAttention, prefill_work, reference_attention
from plait.parallel.tensor import HeadShard

import plait.kernels.attention as kernels  # noqa: E402  (triton is a test dependency: never skipped)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(q_lens, ctx_lens, heads, kv_heads, kv_index, D=16, block_size=4, num_blocks=64, seed=0, dtype=torch.float32):
    """Random cache and queries; sequence i has ctx_lens[i] cached tokens, q_lens[i] of which are new."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, D, generator=g).to(DEVICE, dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()  # scattered blocks, as after churn
    tables, used = [], 0
    for n in ctx_lens:
        k = -(-n // block_size)
        tables.append(perm[used : used + k])
        used += k
    width = max(len(t) for t in tables)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.long, device=DEVICE),
        query_start=torch.tensor(starts, device=DEVICE),
        seq_lens=torch.tensor(ctx_lens, device=DEVICE),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], device=DEVICE),
        max_query_len=max(q_lens),
        max_seq_len=max(ctx_lens),
    ).prepare_reference(block_size)
    q = torch.randn(starts[-1], heads, D, generator=g).to(DEVICE, dtype)
    attn = PagedAttention(heads, kv_heads, D, kv_index).to(DEVICE)
    ref = reference_attention(q.float(), cache[0].float(), cache[1].float(), meta, attn.kv_index, attn.scale)
    return q, cache, meta, attn, ref


# (heads, kv_heads, kv_index): plain GQA, and the uneven split SmolLM2's rank 1 holds at TP=2 (q 5-8 -> KV 1-2).
LAYOUTS = [(4, 2, [0, 0, 1, 1]), (4, 2, [0, 1, 1, 1]), (3, 3, [0, 1, 2])]


@pytest.mark.parametrize("heads,kv_heads,kv_index", LAYOUTS)
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_kernel_matches_reference(heads, kv_heads, kv_index, num_splits):
    ctx = [1, 7, 33, 70]
    q, cache, meta, attn, ref = make_case([1] * len(ctx), ctx, heads, kv_heads, kv_index)
    out = kernels.paged_decode(q, cache[0], cache[1], meta.block_tables, meta.seq_lens, attn.q_first, attn.q_count,
                               attn.max_group, attn.scale, num_splits)
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("heads,kv_heads,kv_index", LAYOUTS[:2])
def test_prefill_kernel_matches_reference(heads, kv_heads, kv_index):
    # A fresh prompt, a chunk after a cached prefix, and a decode token, in one batch.
    q_lens, ctx = [19, 6, 1], [19, 40, 9]
    q, cache, meta, attn, ref = make_case(q_lens, ctx, heads, kv_heads, kv_index)
    work = torch.tensor(prefill_work(q_lens, DEVICE == "cuda") + [-1] * 3, device=DEVICE)  # padding items
    out = kernels.paged_prefill(q, cache[0], cache[1], meta.block_tables, meta.query_start, meta.seq_lens,
                                attn.kv_index, work, attn.scale)
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


def test_head_shard_maps_match_kernel_tables():
    shard = HeadShard(q_start=5, q_end=9, kv_start=1, kv_end=3, group=3)
    attn = PagedAttention(shard.num_q, shard.num_kv, 8, shard.kv_index())
    assert attn.q_first.tolist() == [0, 1] and attn.q_count.tolist() == [1, 3] and attn.max_group == 3


def test_engine_with_triton_backend_matches_reference_backend(checkpoints):
    from conftest import random_prompts
    from plait import LLM, SamplingParams

    folder, _ = checkpoints["llama"]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=1, ignore_eos=True)
    prompts = random_prompts(3, seed=5)
    runs = {}
    for backend in ("torch", "triton"):
        llm = LLM(folder, device=DEVICE, dtype="float32", max_model_len=128, attention_backend=backend, enforce_eager=True)
        runs[backend] = llm.generate(prompts, params, use_tqdm=False)
        llm.shutdown()
    for a, b in zip(runs["torch"], runs["triton"]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        la = [lp[t].logprob for lp, t in zip(a.outputs[0].logprobs, a.outputs[0].token_ids)]
        lb = [lp[t].logprob for lp, t in zip(b.outputs[0].logprobs, b.outputs[0].token_ids)]
        torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), atol=1e-4, rtol=0)
