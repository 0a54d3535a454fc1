"""The KV cache's bookkeeping, owned by the scheduler: which blocks each sequence holds.

The tensors themselves live on every rank (same block ids everywhere, each rank holding its own heads);
only this driver-side manager decides which block goes to whom, so ranks never disagree.

Prefix caching (vLLM's automatic prefix caching): a full block is also known by its content, a key chained over
the tokens in it and every token before it, so a new sequence whose tokens start the same way shares those blocks
and computes only the rest. Blocks are reference-counted. A cached block that no sequence holds keeps its content
and counts as free; when a block is needed and none is empty, the one released longest ago is evicted (a
sequence's blocks are released last block first, so a shared prefix outlives the tails that follow it).
"""

from __future__ import annotations

from collections import OrderedDict


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # empty blocks, a stack: pop() hands out low ids first
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks no sequence holds, oldest release first
        self.refs = [0] * num_blocks
        self.tables: dict[int, list[int]] = {}
        self.key_of: dict[int, int] = {}  # cached block -> its key
        self.block_of: dict[int, int] = {}  # key -> cached block
        self.keys: dict[int, list[int]] = {}  # seq_id -> the keys of its full blocks so far
        self.queried_tokens = self.hit_tokens = 0  # prompt tokens looked up in the cache, and found there

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def table(self, seq_id: int) -> list[int]:
        return self.tables.get(seq_id, [])

    def grow(self, seq_id: int, num_tokens: int) -> list[int] | None:
        """Make the sequence's table cover `num_tokens` positions and return it; None (and nothing taken) when
        the free blocks are too few. One call per sequence per step: a decode step mostly needs no block."""
        table = self.tables.setdefault(seq_id, [])
        missing = blocks_needed(num_tokens, self.block_size) - len(table)
        if missing > 0:
            if missing > self.num_free:
                return None
            for _ in range(missing):
                block = self._take()
                self.refs[block] = 1
                table.append(block)
        return table

    def release(self, seq_id: int) -> None:
        self.keys.pop(seq_id, None)
        for block in reversed(self.tables.pop(seq_id, [])):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.key_of:
                    self.evictable[block] = None
                else:
                    self.free.append(block)

    def _take(self) -> int:
        if self.free:
            return self.free.pop()
        block, _ = self.evictable.popitem(last=False)
        del self.block_of[self.key_of.pop(block)]
        return block

    def cached_prefix(self, token_ids: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
        """The cached blocks that hold the first full blocks of `token_ids` (at most `max_tokens` tokens of them),
        and their keys."""
        blocks, keys, bs = [], [], self.block_size
        for i in range(max_tokens // bs):
            key = self._key(keys, token_ids, i)
            block = self.block_of.get(key)
            if block is None:
                break
            blocks.append(block)
            keys.append(key)
        return blocks, keys

    def _key(self, keys: list[int], token_ids: list[int], i: int) -> int:
        """Block i's content key, chained over the keys of the blocks before it (`keys`, at least i of them)."""
        bs = self.block_size
        return hash((keys[i - 1] if i else None, tuple(token_ids[i * bs : (i + 1) * bs])))

    def can_share(self, blocks: list[int], num_tokens: int) -> bool:
        """Whether a new sequence can hold `blocks` (cached) and grow to `num_tokens`: the cached blocks that
        nobody holds stop counting as free once it holds them."""
        idle = sum(1 for b in blocks if self.refs[b] == 0)
        return blocks_needed(num_tokens, self.block_size) - len(blocks) <= self.num_free - idle

    def share(self, seq_id: int, blocks: list[int], keys: list[int], queried_tokens: int = 0) -> None:
        """Start a new sequence's table with cached blocks (the caller checked `can_share`); `queried_tokens` of
        it were looked up in the cache, for the hit rate."""
        self.queried_tokens += queried_tokens
        self.hit_tokens += len(blocks) * self.block_size
        for block in blocks:
            if self.refs[block] == 0:
                del self.evictable[block]
            self.refs[block] += 1
        self.tables[seq_id] = list(blocks)
        self.keys[seq_id] = list(keys)

    def register(self, seq_id: int, token_ids: list[int], num_tokens: int) -> None:
        """Key the sequence's blocks that `num_tokens` known tokens fill, so later sequences can share them. Called
        once the plan that computes them is made: a later plan, run after it on every rank, reads them written."""
        keys, table, bs = self.keys.setdefault(seq_id, []), self.tables[seq_id], self.block_size
        while len(keys) < num_tokens // bs:
            i = len(keys)
            key = self._key(keys, token_ids, i)
            keys.append(key)
            if key not in self.block_of and table[i] not in self.key_of:  # the first block with this content stays
                self.block_of[key], self.key_of[table[i]] = table[i], key

    def check_invariants(self) -> None:
        """Every block is empty, cached and idle, or held, each exactly once; a held block's count is its holders."""
        held: dict[int, int] = {}
        for table in self.tables.values():
            for b in table:
                held[b] = held.get(b, 0) + 1
        n = self.num_blocks
        assert all(self.refs[b] == k for b, k in held.items() if 0 <= b < n), (
            "a block's reference count is not the number of sequences holding it")
        unheld = set(self.free) | set(self.evictable)
        assert not unheld & set(held), "a block is both free and owned"
        assert len(held) + len(self.free) + len(self.evictable) == n, (
            f"blocks leaked: {len(held)} held + {len(self.free)} free + {len(self.evictable)} cached idle != {n}")
        # With the count right, a block free twice or an id out of range would hide a lost block.
        lost = set(range(n)) - set(held) - unheld
        assert not lost, f"blocks {sorted(lost)[:5]} are neither free nor owned"
        assert all(self.refs[b] == 0 for b in unheld), "a free block is counted as held"
        assert all(b in self.key_of for b in self.evictable), "an idle block without content is not free"
        assert all(self.block_of[k] == b for b, k in self.key_of.items()), "the cache's two maps disagree"
