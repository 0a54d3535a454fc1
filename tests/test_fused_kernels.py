"""Fused Triton kernels against the PyTorch layers they replace (CPU: Triton interpreter)."""

from __future__ import annotations

import pytest
import torch

import plait.kernels.fused as fused
from plait.kernels.allreduce_norm import owned_rows, reduce_add_rms_norm_
from plait.layers.norm import RMSNorm
from plait.layers.rotary import RotaryEmbedding
from transformers import LlamaConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_rms_norm_with_and_without_residual():
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(5, 72, generator=g), torch.randn(5, 72, generator=g)
    norm = RMSNorm(72, 1e-6)
    norm.weight.data = torch.rand(72, generator=g) + 0.5
    ref_out, ref_res = norm(x, r.clone())
    res = r.clone().to(DEVICE)
    out = fused.rms_norm(x.to(DEVICE), norm.weight.to(DEVICE), 1e-6, res)
    torch.testing.assert_close(out.cpu(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.cpu(), ref_res)
    torch.testing.assert_close(fused.rms_norm(x.to(DEVICE), norm.weight.to(DEVICE), 1e-6).cpu(), norm(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("x_shape,w_shape", [((3, 5, 72), (3, 1, 72)), ((5, 3, 2, 72), (3, 1, 72))])
def test_rms_norm_with_a_weight_per_track(x_shape, w_shape):
    """Grouped Parallel Track layers: one weight per track, broadcast over the tokens ([tracks, T, N]) or over each
    track's heads ([T, tracks, heads, N]); the kernel picks each row's weight as the broadcast does."""
    g = torch.Generator().manual_seed(3)
    x, r = torch.randn(*x_shape, generator=g), torch.randn(*x_shape, generator=g)
    norm = RMSNorm(w_shape, 1e-6)
    norm.weight.data = torch.rand(*w_shape, generator=g) + 0.5
    ref_out, ref_res = norm(x, r.clone())
    res = r.clone().to(DEVICE)
    torch.testing.assert_close(fused.rms_norm(x.to(DEVICE), norm.weight.to(DEVICE), 1e-6, res).cpu(), ref_out,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.cpu(), ref_res)


@pytest.mark.parametrize("shape", [(3, 2 * 1500), (2, 3, 2 * 40)])
def test_silu_mul(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_mul(x.to(DEVICE)).cpu(), torch.nn.functional.silu(gate) * up, atol=1e-5, rtol=1e-5)


def test_rotary_in_place_on_a_strided_view():
    rope = RotaryEmbedding(LlamaConfig(), 16, 64)
    qkv = torch.randn(4, 5 * 16 + 2 * 16, generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([0, 3, 17, 63])
    q = qkv[:, : 5 * 16].view(4, 5, 16)
    ref = rope(positions, q.clone())[0]
    dev_qkv = qkv.to(DEVICE)
    dev_q = dev_qkv[:, : 5 * 16].view(4, 5, 16)
    fused.rotary_(dev_q, rope.cos.to(DEVICE), rope.sin.to(DEVICE), positions.to(DEVICE))
    torch.testing.assert_close(dev_q.cpu(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dev_qkv[:, 80:].cpu(), qkv[:, 80:])  # k/v columns untouched


def test_rope_store_kv_rotates_q_and_writes_the_rotated_k_and_v_into_the_cache():
    rope = RotaryEmbedding(LlamaConfig(), 16, 64)
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(3, (4 + 2 + 2) * 16, generator=g)
    q, k, v = (t.view(3, -1, 16) for t in qkv.split([64, 32, 32], dim=-1))
    positions, slots = torch.tensor([5, 6, 40]), torch.tensor([9, 2, 30])
    ref_q, ref_k = rope(positions, q.clone(), k.clone())
    cache = torch.zeros(2, 8, 4, 2, 16)
    dq, dk = q.clone().to(DEVICE), k.clone().to(DEVICE)
    dcache = cache.to(DEVICE)
    fused.rope_store_kv(dq, dk, v.to(DEVICE), dcache[0], dcache[1], rope.cos.to(DEVICE), rope.sin.to(DEVICE),
                        positions.to(DEVICE), slots.to(DEVICE))
    torch.testing.assert_close(dq.cpu(), ref_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dk.cpu(), ref_k, atol=1e-5, rtol=1e-5)
    flat_k, flat_v = dcache[0].view(-1, 2, 16).cpu(), dcache[1].view(-1, 2, 16).cpu()
    torch.testing.assert_close(flat_k[slots], ref_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat_v[slots], v)
    assert flat_k.abs().sum() == flat_k[slots].abs().sum()  # nothing written elsewhere


@pytest.mark.parametrize("world,tokens", [(2, 7), (4, 7), (4, 2)])
def test_all_reduce_add_rms_norm_over_peer_buffers(world, tokens):
    """Every rank's partial sums in one process stand for the peers' symmetric buffers; ranks run one after the
    other (the barriers' order). Each buffer must end with norm(sum + residual) on every row, and each rank's
    residual with the sum on the rows it owns."""
    g = torch.Generator().manual_seed(world)
    parts = [torch.randn(tokens, 72, generator=g) for _ in range(world)]
    residual = torch.randn(tokens, 72, generator=g)
    norm = RMSNorm(72, 1e-6)
    norm.weight.data = torch.rand(72, generator=g) + 0.5
    ref_out, ref_res = norm(sum(parts), residual.clone())
    buffers = [p.clone().to(DEVICE) for p in parts]
    residuals = [residual.clone().to(DEVICE) for _ in range(world)]
    for rank in range(world):
        rows = owned_rows(tokens, world, rank)
        reduce_add_rms_norm_(buffers, residuals[rank], norm.weight.to(DEVICE), 1e-6, rows, num_blocks=2)
        torch.testing.assert_close(residuals[rank][slice(*rows)].cpu(), ref_res[slice(*rows)], atol=1e-5, rtol=1e-5)
    for buf in buffers:
        assert torch.equal(buf, buffers[0])  # bit-identical on every rank: each row was written by one rank
    torch.testing.assert_close(buffers[0].cpu(), ref_out, atol=1e-5, rtol=1e-5)
    assert [owned_rows(tokens, world, r) for r in range(world)][-1][1] == tokens


def test_small_m_gemv_probe_matches_pytorch():
    """The Triton GEMV that benchmarks/small_m_gemv.py times against cuBLAS (with its SiLU-and-mul prologue)."""
    from benchmarks.small_m_gemv import check

    check(DEVICE)
