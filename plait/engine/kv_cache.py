"""The KV cache's bookkeeping, owned by the scheduler: which blocks each sequence holds.

The tensors themselves live on every rank (same block ids everywhere, each rank holding its own heads);
only this driver-side manager decides which block goes to whom, so ranks never disagree.
"""

from __future__ import annotations


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pop() hands out low ids first
        self.tables: dict[int, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def table(self, seq_id: int) -> list[int]:
        return self.tables.get(seq_id, [])

    def can_grow(self, seq_id: int, num_tokens: int) -> bool:
        return blocks_needed(num_tokens, self.block_size) - len(self.table(seq_id)) <= self.num_free

    def grow(self, seq_id: int, num_tokens: int) -> list[int]:
        """Make the sequence's table cover `num_tokens` positions; the caller checked `can_grow`."""
        table = self.tables.setdefault(seq_id, [])
        for _ in range(blocks_needed(num_tokens, self.block_size) - len(table)):
            table.append(self.free.pop())
        return table

    def release(self, seq_id: int) -> None:
        self.free.extend(reversed(self.tables.pop(seq_id, [])))

    def check_invariants(self) -> None:
        """Every block is either free or owned by exactly one sequence."""
        owned = [b for t in self.tables.values() for b in t]
        assert len(owned) == len(set(owned)), "a block is owned by two sequences"
        assert not set(owned) & set(self.free), "a block is both free and owned"
        assert len(owned) + len(self.free) == self.num_blocks, (
            f"blocks leaked: {len(owned)} owned + {len(self.free)} free != {self.num_blocks}"
        )
        # With the count right, a block free twice or an id out of range would hide a lost block.
        lost = set(range(self.num_blocks)) - set(owned) - set(self.free)
        assert not lost, f"blocks {sorted(lost)[:5]} are neither free nor owned"
