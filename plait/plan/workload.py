"""The steps a workload becomes: the scheduler's policy replayed on a fixed batch, and workloads read from traces.

A prediction needs each step's shape (which tokens of which sequences), since the bytes of every collective
follow from it. `fixed_batch_steps` replays plait's scheduling policy (docs/architecture.md, "A step"): running
sequences first, one decode token or the rest of their prompt each, then waiting prompts admitted under the token
budget and the sequence limit, chunked when they do not fit. With a pipeline of P stages the engine keeps P
schedulers, requests dealt to them in turn, so the batch becomes P independent micro-batches. Preemption is not
replayed: the memory model says when a batch does not fit.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass

from plait.comm.profiler import step_phase
from plait.layers.attention import attends_prompt_by_prompt


@dataclass(frozen=True)
class StepShape:
    """One plan as the ranks run it. chunks: (start position, new tokens) per sequence. first_tokens / finished:
    how many sequences got their first output token / their last in this step (for TTFT and TPOT). prompt_rows:
    the logits rows of prompt logprobs; the other logits rows are the sampled sequences'.
    one_launch: the engine attends several short new prompts in one launch (`attends_prompt_by_prompt`); engines
    before commit 28ed6e2 attended every all-new step prompt by prompt (`EngineLimits.one_launch_prompts`)."""

    chunks: tuple[tuple[int, int], ...]
    logit_rows: int
    phase: str
    first_tokens: int = 0
    finished: int = 0
    prompt_rows: int = 0
    one_launch: bool = True

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def seqs(self) -> int:
        return len(self.chunks)

    @property
    def samples(self) -> int:
        """Sequences that sample a token in this step."""
        return self.logit_rows - self.prompt_rows

    @property
    def context_tokens(self) -> int:
        """Cached tokens attention reads (per layer, per KV head): each sequence's length after the step."""
        return sum(s + n for s, n in self.chunks)

    @property
    def fresh(self) -> bool:
        """Every sequence is a whole new prompt (no cached prefix)."""
        return all(s == 0 for s, _ in self.chunks)

    @property
    def prompt_by_prompt(self) -> bool:
        """Whole new prompts that the model runner attends one by one with flash attention (one prompt, or long
        ones); several short ones go to the paged prefill kernel in one launch (`attends_prompt_by_prompt`)."""
        if not self.one_launch:
            return self.fresh
        return attends_prompt_by_prompt([n for _, n in self.chunks], [s + n for s, n in self.chunks])

    @property
    def attention_pairs(self) -> int:
        """(query, key) pairs of causal attention over the step: sum of n * start + n (n + 1) / 2."""
        return sum(n * s + n * (n + 1) // 2 for s, n in self.chunks)


@dataclass
class _Seq:
    prompt_len: int
    num_tokens: int
    computed: int = 0
    outputs: int = 0


def _schedule(running: list[_Seq], waiting: list[_Seq], budget: int, max_num_seqs: int) -> list[tuple[_Seq, int]]:
    """One step of the scheduler's policy (no preemption): running first, then admit waiting prompts, chunked."""
    picked = []
    for seq in running:
        if budget <= 0:
            break
        n = min(seq.num_tokens - seq.computed, budget)
        picked.append((seq, n))
        budget -= n
    while waiting and budget > 0 and len(running) < max_num_seqs:
        seq = waiting.pop(0)
        n = min(seq.num_tokens - seq.computed, budget)
        running.append(seq)
        picked.append((seq, n))
        budget -= n
    return picked


def microbatch_steps(batch: int, input_len: int, output_len: int, budget: int, max_num_seqs: int,
                     prompt_logprobs: bool = False, one_launch: bool = True) -> list[StepShape]:
    """Every step of one scheduler given `batch` equal prompts at once, each generating `output_len` tokens."""
    if min(batch, input_len, output_len, budget, max_num_seqs) < 1:
        raise ValueError(f"batch ({batch}), input_len ({input_len}), output_len ({output_len}), budget ({budget}) "
                         f"and max_num_seqs ({max_num_seqs}) must all be >= 1")
    waiting = [_Seq(input_len, input_len) for _ in range(batch)]
    running: list[_Seq] = []
    steps = []
    while waiting or running:
        picked = _schedule(running, waiting, budget, max_num_seqs)
        rows = prompt_rows = first = done = 0
        for seq, n in picked:
            start = seq.computed
            if prompt_logprobs and start < seq.prompt_len - 1:
                prompt_rows += min(start + n, seq.prompt_len - 1) - start
            seq.computed = start + n
            if seq.computed == seq.num_tokens:  # sampled: one more token, and maybe done
                rows += 1
                seq.outputs += 1
                seq.num_tokens += 1
                first += seq.outputs == 1
                if seq.outputs == output_len:
                    running.remove(seq)
                    done += 1
        chunks = tuple((seq.computed - n, n) for seq, n in picked)
        phase = step_phase([s for s, _ in chunks], [seq.prompt_len for seq, _ in picked])
        steps.append(StepShape(chunks, prompt_rows + rows, phase, first, done, prompt_rows, one_launch))
    return steps


def fixed_batch_steps(batch: int, input_len: int, output_len: int, budget: int, max_num_seqs: int,
                      num_microbatches: int = 1, prompt_logprobs: bool = False,
                      one_launch: bool = True) -> list[list[StepShape]]:
    """The steps of each micro-batch (one per pipeline stage; requests dealt in turn, as the engine does)."""
    sizes = [len(range(j, batch, num_microbatches)) for j in range(num_microbatches)]
    return [microbatch_steps(b, input_len, output_len, budget, max_num_seqs, prompt_logprobs, one_launch) if b else []
            for b in sizes]


@dataclass(frozen=True)
class Workload:
    """What the planner sizes for: typical prompt and output lengths, and either a fixed number of concurrent
    sequences (`batch`) or an arrival rate (requests per second) from which concurrency follows."""

    input_len: int
    output_len: int
    batch: int | None = None
    request_rate: float | None = None

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError(f"input_len ({self.input_len}) and output_len ({self.output_len}) must be >= 1")
        if self.batch is not None and self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.request_rate is not None and self.request_rate <= 0:
            raise ValueError(f"request_rate must be > 0 requests/s, got {self.request_rate}")


def workload_from_trace(path: str) -> Workload:
    """A trace as `plait bench serve --dataset-name trace` replays it: one {"timestamp", "input_len", "output_len"}
    per line (timestamps in seconds). Sized by the median lengths and the mean arrival rate."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                missing = {"timestamp", "input_len", "output_len"} - row.keys()
                if missing:
                    raise ValueError(f"{path}:{i}: missing {sorted(missing)}; each line needs timestamp, input_len, output_len")
                rows.append(row)
    if len(rows) < 2:
        raise ValueError(f"{path}: a trace needs at least 2 requests to give an arrival rate, found {len(rows)}")
    times = sorted(float(r["timestamp"]) for r in rows)
    span = times[-1] - times[0]
    if span <= 0:
        raise ValueError(f"{path}: every request has the same timestamp; give a rate with --request-rate instead")
    return Workload(int(statistics.median(r["input_len"] for r in rows)), int(statistics.median(r["output_len"] for r in rows)),
                    request_rate=(len(rows) - 1) / span)
