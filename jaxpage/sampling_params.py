"""SamplingParams: how one request's tokens are chosen, validated on construction."""

from __future__ import annotations

import dataclasses
import math

MAX_LOGPROBS = 20  # most top-k logprobs a request may ask for (OpenAI's top_logprobs limit)


@dataclasses.dataclass
class SamplingParams:
    """Per-request sampling settings (vLLM/OpenAI semantics). Invalid values raise ValueError."""

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0          # 0 = greedy
    top_k: int = 0                    # 0 (or -1) = off
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16       # None = up to the model's context
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None       # number of top logprobs per generated token (plus chosen)
    prompt_logprobs: int | None = None
    use_beam_search: bool = False     # beam width = best_of or n; returns the n best beams
    length_penalty: float = 1.0
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"SamplingParams.{field} {why}, got {getattr(self, field)!r}")

        def check_int(field: str) -> None:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                fail(field, "must be an integer")

        def check_float(field: str) -> None:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(field, "must be a finite number")

        for f in ("n", "top_k", "min_tokens"):
            check_int(f)
        for f in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                  "repetition_penalty", "length_penalty"):
            check_float(f)
        if self.n < 1:
            fail("n", "must be at least 1")
        if self.best_of is not None:
            check_int("best_of")
            if self.best_of < self.n:
                fail("best_of", f"must be at least n={self.n}")
        if self.use_beam_search and self.beam_width > MAX_LOGPROBS // 2:
            fail("n" if self.best_of is None else "best_of",
                 f"(the beam width) must be at most {MAX_LOGPROBS // 2}")
        if self.temperature < 0:
            fail("temperature", "must be non-negative")
        if self.top_k < 0:
            fail("top_k", "must be 0 or -1 (off) or positive")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", "must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            fail("min_p", "must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            fail("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            fail("frequency_penalty", "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            fail("repetition_penalty", "must be positive")
        if self.max_tokens is not None:
            check_int("max_tokens")
            if self.max_tokens < 1:
                fail("max_tokens", "must be at least 1")
        if self.min_tokens < 0:
            fail("min_tokens", "must be non-negative")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"must not exceed max_tokens={self.max_tokens}")
        if not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", "must be non-empty strings")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                   for t in self.stop_token_ids):
            fail("stop_token_ids", "must be non-negative integers")
        if self.seed is not None:
            check_int("seed")
        for f in ("logprobs", "prompt_logprobs"):
            value = getattr(self, f)
            if value is not None:
                check_int(f)
                if not 0 <= value <= MAX_LOGPROBS:
                    fail(f, f"must be in [0, {MAX_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def beam_width(self) -> int:
        return self.best_of or self.n
