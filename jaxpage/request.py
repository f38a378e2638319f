"""Host-side state of a request and of each of its sequences (one per sample)."""

from __future__ import annotations

import dataclasses
import enum
import time

from jaxpage.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class RequestMetrics:
    """Timestamps (time.monotonic) for latency metrics."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclasses.dataclass(eq=False)
class Sequence:
    """One sample of a request: the unit the scheduler and the page allocator work on.

    token_ids holds the prompt and every generated token; the first `num_computed_tokens` of them
    have their keys/values in the KV cache.
    """

    seq_id: int
    request: "Request"
    index: int  # sample index within the request
    token_ids: list[int]
    seed: int
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    num_pending: int = 0  # trailing token_ids that are placeholders for tokens still on device
    finishing: bool = False  # its last token is on its way: nothing more to compute
    num_preemptions: int = 0
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""
    # Set when the engine has a tokenizer: jaxpage.tokenizer.IncrementalDetokenizer / StopChecker.
    detokenizer: object | None = None
    stop_checker: object | None = None
    beam_candidates: list[tuple[int, float]] | None = None  # beam search: this step's options

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """Generated tokens known on the host (placeholders excluded)."""
        return self.token_ids[self.num_prompt_tokens:len(self.token_ids) - self.num_pending]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def tokens_left(self, max_model_len: int) -> int:
        """Tokens still to sample before max_tokens or the context limit ends the sequence."""
        return min(self.params.max_tokens - self.num_output_tokens,
                   max_model_len - self.num_tokens)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED


@dataclasses.dataclass(eq=False)
class Request:
    """A user request: a prompt, its sampling settings and its sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...]
    seed: int = 0  # sample i draws from seed + 7919 * i
    sequences: list[Sequence] = dataclasses.field(default_factory=list)
    hypotheses: list = dataclasses.field(default_factory=list)  # beam search: ended beams
    beam_row_params: SamplingParams | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics = dataclasses.field(
        default_factory=lambda: RequestMetrics(arrival_time=time.monotonic()))

    @property
    def width(self) -> int:
        """Sequences the request runs at once: its samples (best_of of them), or its beams."""
        return self.params.best_of or self.params.n

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.sequences)
