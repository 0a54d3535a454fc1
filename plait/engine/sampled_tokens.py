"""The last step's sampled token ids, kept on the device by sequence.

With asynchronous scheduling a plan reaches a rank before the host knows the tokens of the step before it: a
decode position whose token is the one sampled last step comes as PLACEHOLDER. The rank fills it from here, on
the device, so no token makes a round trip through the host between two steps; the sampler reads it too, for
the penalties of a history that ends in a placeholder. Every rank that feeds inputs needs these tokens, so with
several ranks the sampler shares them (broadcast, or all-gather when sampling is spread).
"""

from __future__ import annotations

import torch

from plait.core import PLACEHOLDER, StepPlan
from plait.engine.sampler import to_device


class SampledTokens:
    def __init__(self, device: torch.device):
        self.device = device
        self.tokens: torch.Tensor | None = None  # [B] of the last step that sampled
        self.rows: dict[int, int] = {}  # seq_id -> its row in tokens
        self._fill: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's (positions, tokens)

    def keep(self, seq_ids: list[int], tokens: torch.Tensor) -> None:
        """tokens: [len(seq_ids)], row i sampled for seq_ids[i]."""
        self.tokens, self.rows = tokens, {seq_id: i for i, seq_id in enumerate(seq_ids)}

    def lookup(self, seq_ids: list[int]) -> torch.Tensor:
        """The last sampled token of each sequence: [len(seq_ids)] on the device."""
        missing = [s for s in seq_ids if s not in self.rows]
        assert not missing, f"sequences {missing} have a placeholder but sampled nothing last step"
        return self.tokens.index_select(0, to_device([self.rows[s] for s in seq_ids], self.device, torch.long))

    def begin(self, plan: StepPlan) -> None:
        """Find this step's placeholders: only a chunk's last token can be one (the token sampled last step)."""
        positions, seq_ids, offset = [], [], 0
        for s in plan.seqs:
            offset += len(s.token_ids)
            if s.token_ids[-1] == PLACEHOLDER:
                positions.append(offset - 1)
                seq_ids.append(s.seq_id)
        self._fill = (to_device(positions, self.device, torch.long), self.lookup(seq_ids)) if positions else None

    def fill(self, ids: torch.Tensor) -> torch.Tensor:
        """Write the step's sampled tokens over its placeholders in the flat input ids [T] (in place)."""
        if self._fill is not None:
            ids.index_copy_(0, *self._fill)
        return ids
