"""Cutting a step's flattened tokens in two (the token-split overlap): each half is a valid step of its own."""

from __future__ import annotations

import pytest

from plait.engine.cuda_graph import StepInputs
from plait.engine.overlap import split_inputs

# A fresh prompt of 5 tokens, one decode token (9 cached), a chunk of 4 after 8 cached tokens.
STEP = StepInputs(ids=list(range(10)), positions=[0, 1, 2, 3, 4, 9, 8, 9, 10, 11], slots=list(range(100, 110)),
                  seq_lens=[5, 10, 12], query_lens=[5, 1, 4], tables=[[0], [1], [2]])


@pytest.mark.parametrize(
    "k, first, second",
    [
        (3, ([3], [3], [[0]]), ([5, 10, 12], [2, 1, 4], [[0], [1], [2]])),  # the prompt cut after 3 of its 5
        (5, ([5], [5], [[0]]), ([10, 12], [1, 4], [[1], [2]])),  # cut between sequences
        (8, ([5, 10, 10], [5, 1, 2], [[0], [1], [2]]), ([12], [2], [[2]])),  # the chunk cut: 8 + 2 cached, then 2
    ],
)
def test_split_inputs(k, first, second):
    a, b = split_inputs(STEP, k)
    for half, (seq_lens, query_lens, tables) in ((a, first), (b, second)):
        assert (half.seq_lens, half.query_lens, half.tables) == (seq_lens, query_lens, tables)
        assert sum(half.query_lens) == len(half.ids) == len(half.positions) == len(half.slots)
    assert a.ids + b.ids == STEP.ids and a.positions + b.positions == STEP.positions and a.slots + b.slots == STEP.slots


def test_split_needs_a_token_on_each_side():
    with pytest.raises(AssertionError):
        split_inputs(STEP, 0)
