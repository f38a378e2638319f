"""Beam search bookkeeping on the host: which beams continue, which hypotheses end.

Each step every live beam offers its 2W most likely next tokens (raw log-probs). Candidates are
ranked by total log-prob (ties: beam order, then the beam's own ranking). Walking down the ranks,
an end token (eos / stop id) ranked among the first W ends a hypothesis; other tokens extend a
beam, until W beams are chosen. Search stops when W hypotheses have ended and no live beam can
still beat the worst of them after length normalisation (score / generated_len ** length_penalty),
or when the length limit is reached (live beams then end with finish_reason "length").
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass
class Hypothesis:
    """A finished beam: its generated tokens and total log-prob."""

    token_ids: list[int]
    cumulative_logprob: float
    finish_reason: str
    stop_reason: int | None = None

    def score(self, length_penalty: float) -> float:
        return self.cumulative_logprob / (max(len(self.token_ids), 1) ** length_penalty)


@dataclasses.dataclass(frozen=True)
class Choice:
    """Live beam `beam` extended by `token` (log-prob `logprob`), total log-prob `score`."""

    beam: int
    token: int
    logprob: float
    score: float


def select(beam_scores: Sequence[float], candidates: Sequence[Sequence[tuple[int, float]]], *,
           width: int, end_ids: set[int], can_end: bool) -> tuple[list[Choice], list[Choice]]:
    """(beams that continue, hypotheses that end) for one step.

    beam_scores[b] is live beam b's total log-prob; candidates[b] its (token, logprob) options in
    the beam's own order. With can_end=False (min_tokens not reached) end tokens are passed over.
    """
    ranked = sorted(((score + lp, b, j, tok, lp)
                     for b, (score, cands) in enumerate(zip(beam_scores, candidates))
                     for j, (tok, lp) in enumerate(cands)),
                    key=lambda c: (-c[0], c[1], c[2]))
    continuing, ended, rank = [], [], 0
    for total, b, _, tok, lp in ranked:
        if tok in end_ids:
            if can_end and rank < width:
                ended.append(Choice(b, tok, lp, total))
            if can_end:
                rank += 1
            continue
        continuing.append(Choice(b, tok, lp, total))
        rank += 1
        if len(continuing) == width:
            break
    return continuing, ended


def is_done(finished: Sequence[Hypothesis], continuing: Sequence[Choice], *, width: int,
            generated_len: int, length_penalty: float) -> bool:
    """No live beam can still make the best `width` hypotheses."""
    if not continuing:
        return True
    if len(finished) < width:
        return False
    worst_kept = sorted((h.score(length_penalty) for h in finished), reverse=True)[width - 1]
    best_live = max(c.score for c in continuing) / (generated_len ** length_penalty)
    return best_live <= worst_kept


def best(finished: Sequence[Hypothesis], n: int, length_penalty: float) -> list[Hypothesis]:
    """The n best hypotheses, best first."""
    return sorted(finished, key=lambda h: -h.score(length_penalty))[:n]
