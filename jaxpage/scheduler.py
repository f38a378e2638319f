"""Continuous-batching scheduler: which sequences run in the next step, and how many tokens each.

Each step fills a token budget and a sequence budget: running sequences first (decode tokens, then
the next chunk of prompts being prefilled), then waiting sequences in arrival order (FCFS), each
taking as much of its prompt as the budget leaves (chunked prefill). When the allocator runs out
of pages, the newest running sequence is preempted: its pages are freed and it goes back to the
front of the queue, to be recomputed from its prompt and the tokens it already generated.

Decode bursts (vLLM's multi-step scheduling): when every running sequence is decoding and no
waiting one could start, a step may run up to `num_decode_steps` decode steps in one launch, each
sampled token fed to the next step on the device, so the host's per-launch work is paid once for
several tokens. Each sequence gets pages for all of its steps up front and runs as many as it has
tokens left; sequences whose sampling needs the host between tokens (penalties, min_tokens, top
logprobs, beams) keep the batch to single steps.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from jaxpage import sampler
from jaxpage.paging import KVCacheManager
from jaxpage.request import Sequence, SeqStatus


@dataclasses.dataclass
class ScheduledSeq:
    """A sequence in this step: tokens [start, start + num_new_tokens) are computed, then, in a
    decode burst, num_steps - 1 more, each the token the step before sampled."""

    seq: Sequence
    start: int
    num_new_tokens: int
    num_steps: int = 1
    samples: bool = dataclasses.field(init=False)  # the step reaches the end: a token is sampled

    def __post_init__(self) -> None:
        self.samples = self.start + self.num_new_tokens == self.seq.num_tokens

    @property
    def end(self) -> int:
        """Tokens of the sequence in the KV cache once the step has run."""
        return self.start + self.num_new_tokens + self.num_steps - 1


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

    @property
    def num_steps(self) -> int:
        """Decode steps the launch runs (1: an ordinary step)."""
        return max((s.num_steps for s in self.scheduled), default=1)


class Scheduler:
    """Waiting and running queues over a KVCacheManager."""

    def __init__(self, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 num_decode_steps: int = 1, max_model_len: int | None = None):
        if num_decode_steps > 1 and max_model_len is None:
            raise ValueError("decode bursts (num_decode_steps > 1) need max_model_len")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_decode_steps = num_decode_steps
        self.max_model_len = max_model_len
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
        burst = not prefills and self._burst_allowed(decodes)
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            if self.kv.copies_needed(seq.seq_id, seq.num_computed_tokens) > self.kv.copy_slots_left():
                continue  # its copy-on-write waits for the next step
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            steps = self._burst_steps(seq) if burst else 1
            while not self.kv.allocate(seq.seq_id, seq.num_computed_tokens, num_new + steps - 1):
                victim = self._newest_unscheduled(taken)
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, num_new, steps))
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

    def _burst_steps(self, seq: Sequence) -> int:
        return min(self.num_decode_steps, seq.tokens_left(self.max_model_len))

    def _burst_allowed(self, decodes: list[Sequence]) -> bool:
        """Whether these decodes (all that run) may run ahead: nobody waiting could start now,
        every row samples without the host, and some row has a full burst of tokens left (a
        batch that is about to end finishes in single steps rather than idle ones)."""
        if self.num_decode_steps == 1 or not decodes:
            return False
        if self.waiting and len(self.running) + self._width(self.waiting[0]) <= self.max_num_seqs:
            return False
        if not all(sampler.samples_ahead(s.params, s.num_output_tokens) for s in decodes):
            return False
        return max(map(self._burst_steps, decodes)) == self.num_decode_steps

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
