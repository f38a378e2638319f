"""What the engine hands back: RequestOutput with one CompletionOutput per sample, built from a
request's state in the form its caller asked for (OutputKind)."""

from __future__ import annotations

import dataclasses
import enum

from jaxpage import beam_search
from jaxpage.request import Request, RequestMetrics


class OutputKind(enum.Enum):
    CUMULATIVE = "cumulative"  # every output carries all tokens so far
    DELTA = "delta"            # every output carries only what is new since the last one
    FINAL_ONLY = "final_only"  # one output, when the request finishes


@dataclasses.dataclass
class CompletionOutput:
    """One generated sequence of a request (vLLM's CompletionOutput)."""

    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    cumulative_logprob: float | None = None
    # Per generated token: {token id: logprob} for the top-k plus the chosen id.
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    """The state of one request: prompt, its samples so far, and whether it is done."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_logprobs: list[dict[int, float] | None] | None = None
    metrics: RequestMetrics | None = None  # arrival / first token / finish times (monotonic)


class OutputTracker:
    """Builds each request's RequestOutput in its OutputKind, remembering for DELTA callers how
    much of every sample (tokens, characters, logprobs) they have been sent."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self._kind: dict[str, OutputKind] = {}
        self._sent: dict[tuple[str, int], tuple[int, int, int]] = {}

    def add(self, request_id: str, kind: OutputKind) -> None:
        self._kind[request_id] = kind

    def forget(self, request: Request) -> None:
        self._kind.pop(request.request_id, None)
        for seq in request.sequences:
            self._sent.pop((request.request_id, seq.index), None)

    def output(self, request: Request) -> RequestOutput | None:
        """The request's output now; None where its kind says nothing is due yet."""
        kind = self._kind[request.request_id]
        params = request.params
        if not request.finished and (kind is OutputKind.FINAL_ONLY or params.use_beam_search):
            return None
        if params.use_beam_search:
            completions = [CompletionOutput(
                index=i, text=self._decode(h.token_ids, params.skip_special_tokens),
                token_ids=h.token_ids, cumulative_logprob=h.cumulative_logprob,
                finish_reason=h.finish_reason, stop_reason=h.stop_reason)
                for i, h in enumerate(beam_search.best(request.hypotheses, params.n,
                                                       params.length_penalty))]
            return _request_output(request, completions)
        seqs = request.sequences
        if request.finished and len(seqs) > params.n:  # best_of: keep the n most likely
            seqs = sorted(seqs, key=lambda s: -s.cumulative_logprob)[:params.n]
        completions = []
        for seq in seqs:
            out_ids = seq.output_token_ids
            tokens, chars, lps = 0, 0, 0
            if kind is OutputKind.DELTA:
                tokens, chars, lps = self._sent.get((request.request_id, seq.index), (0, 0, 0))
                self._sent[(request.request_id, seq.index)] = (
                    len(out_ids), len(seq.text), len(seq.logprobs or ()))
            completions.append(CompletionOutput(
                index=seq.index, text=seq.text[chars:], token_ids=out_ids[tokens:],
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=None if seq.logprobs is None else seq.logprobs[lps:],
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        return _request_output(request, completions)

    def _decode(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def _request_output(request: Request, completions: list[CompletionOutput]) -> RequestOutput:
    return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids,
                         completions, finished=request.finished,
                         num_cached_tokens=request.num_cached_tokens, metrics=request.metrics)
