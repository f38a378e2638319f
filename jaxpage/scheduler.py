"""Continuous-batching scheduler: which sequences run in the next step, and how many tokens each.

Each step fills a token budget and a sequence budget: running sequences first (decode tokens, then
the next chunk of prompts being prefilled), then waiting sequences in arrival order (FCFS), each
taking as much of its prompt as the budget leaves (chunked prefill). When the allocator runs out
of pages, the newest running sequence is preempted: its pages are freed and it goes back to the
front of the queue, to be recomputed from its prompt and the tokens it already generated.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from jaxpage.paging import KVCacheManager
from jaxpage.request import Sequence, SeqStatus


@dataclasses.dataclass
class ScheduledSeq:
    """A sequence in this step: tokens [start, start + num_new_tokens) are computed."""

    seq: Sequence
    start: int
    num_new_tokens: int
    samples: bool = dataclasses.field(init=False)  # the step reaches the end: a token is sampled

    def __post_init__(self) -> None:
        self.samples = self.start + self.num_new_tokens == self.seq.num_tokens


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_decode_only(self) -> bool:
        return all(s.num_new_tokens == 1 for s in self.scheduled)


class Scheduler:
    """Waiting and running queues over a KVCacheManager."""

    def __init__(self, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and free its pages."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq.seq_id)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        taken: set[int] = set()

        # Sequences with nothing to compute (beams waiting for their siblings) sit this step out.
        active = [s for s in self.running if not s.finishing]
        decodes = [s for s in active if s.num_tokens - s.num_computed_tokens == 1]
        prefills = [s for s in active if s.num_tokens - s.num_computed_tokens > 1]
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            if self.kv.copies_needed(seq.seq_id, seq.num_computed_tokens) > self.kv.copy_slots_left():
                continue  # its copy-on-write waits for the next step
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.allocate(seq.seq_id, seq.num_computed_tokens, num_new):
                victim = self._newest_unscheduled(taken)
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, num_new))
                taken.add(seq.seq_id)
                budget -= num_new

        while not preempted and budget > 0 and self.waiting:
            seq = self.waiting[0]
            if len(self.running) + self._width(seq) > self.max_num_seqs:
                break
            cached = self.kv.reuse_prefix(seq.seq_id, seq.token_ids)
            num_new = min(seq.num_tokens - cached, budget)
            if not self.kv.allocate(seq.seq_id, cached, num_new):
                self.kv.free(seq.seq_id)
                break
            self.waiting.popleft()
            self._record_prefix_hit(seq, cached)
            seq.num_computed_tokens = cached
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, cached, num_new))
            budget -= num_new
        return SchedulerOutput(scheduled, preempted)

    def _width(self, seq: Sequence) -> int:
        """Sequences this waiting one will occupy: a request not yet forked grows to all samples."""
        request = seq.request
        return request.width if len(request.sequences) == 1 else 1

    def _record_prefix_hit(self, seq: Sequence, cached: int) -> None:
        cache = self.kv.prefix_cache
        if cache is not None:
            cache.queries += seq.num_tokens
            cache.hits += cached
        if seq.num_preemptions == 0 and seq.index == 0:
            seq.request.num_cached_tokens = cached

    def _newest_unscheduled(self, taken: set[int]) -> Sequence:
        for seq in reversed(self.running):
            if seq.seq_id not in taken:
                return seq
        raise AssertionError("the sequence being scheduled is always running and unscheduled")

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
