"""EngineClient: the one thread that owns the engine (and so the device), and its mailbox.

HTTP threads call `submit` with the prompts of one API call; each prompt becomes one engine
request, and the DELTA RequestOutputs of all of them arrive on that submission's own queue.
`abort` stops a submission whose client went away; its pages are freed at the next step.

Admission is decided by the engine thread, so it is exact: a submission is admitted while at most
max_num_seqs + max_queued_requests sequences (n per prompt) are in flight, i.e. while at most
max_queued_requests of them would wait for a batch slot; otherwise QueueFullError (HTTP 503).
A request the engine can never serve (prompt too long, ...) raises the engine's RequestError.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
import uuid
from typing import Callable

from jaxpage.engine import LLMEngine, OutputKind
from jaxpage.metrics import ServerMetrics
from jaxpage.sampling_params import SamplingParams

log = logging.getLogger(__name__)

STATS_REFRESH_S = 0.25  # how stale the stats snapshot behind /metrics may get while busy
SAVE_WHEN_IDLE_FOR_S = 1.0  # quiet time before compiled executables are written to the cache


class QueueFullError(RuntimeError):
    """The server holds as many requests as it may; the client should retry later."""


class EngineDeadError(RuntimeError):
    """The engine thread is not running (it failed or was shut down)."""


@dataclasses.dataclass(eq=False)
class Submission:
    """The engine requests of one API call (one per prompt), sharing one output queue.

    `outputs` receives RequestOutputs (DELTA) and, if the engine dies, an EngineDeadError.
    """

    prompts: list[tuple[str | None, list[int]]]
    params: SamplingParams
    request_ids: list[str]
    outputs: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue)
    finished: bool = False  # every request ended (set by the engine thread)
    _unfinished: int = 0
    _decided: threading.Event = dataclasses.field(default_factory=threading.Event)
    _error: BaseException | None = None

    @property
    def seqs_per_prompt(self) -> int:
        return self.params.beam_width if self.params.use_beam_search else self.params.n

    @property
    def num_seqs(self) -> int:
        return self.seqs_per_prompt * len(self.prompts)

    def _decide(self, error: BaseException | None) -> None:
        self._error = error
        self._decided.set()


@dataclasses.dataclass(eq=False)
class _Tracked:
    submission: Submission
    num_seqs: int
    last_token_time: float | None = None


class EngineClient:
    """Runs `make_engine()` and then the engine loop on one thread; thread-safe front door."""

    def __init__(self, make_engine: Callable[[], LLMEngine], *, max_queued_requests: int = 256,
                 stats_interval: float = 5.0, metrics: ServerMetrics | None = None):
        if max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {max_queued_requests}")
        self._make_engine = make_engine
        self.max_queued_requests = max_queued_requests
        self.stats_interval = stats_interval
        self.metrics = metrics or ServerMetrics()
        self.engine: LLMEngine | None = None
        self.capacity = 0  # sequences in flight at most; set once the engine exists
        self._lock = threading.Lock()
        self._inbox: collections.deque[tuple[str, Submission]] = collections.deque()
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._closed = False
        self._stopping = False
        self._error: BaseException | None = None
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._in_flight = 0  # sequences admitted and not finished; written by the engine thread
        self._thread = threading.Thread(target=self._run, name="jaxpage-engine", daemon=True)

    # -- any thread ----------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> None:
        """Start the engine thread and wait until the engine is built; re-raises its failure."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the engine was not ready after {timeout} s")
        if self._error is not None:
            raise self._error

    @property
    def alive(self) -> bool:
        return self._ready.is_set() and self._thread.is_alive() and not self._closed

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    def submit(self, prompts: list[tuple[str | None, list[int]]],
               params: SamplingParams) -> Submission:
        """Hand prompts to the engine; returns once admitted. Raises QueueFullError,
        EngineDeadError, or the engine's RequestError/ValueError for an unservable request."""
        base = uuid.uuid4().hex
        sub = Submission(list(prompts), params, [f"{base}-{i}" for i in range(len(prompts))])
        with self._lock:
            if self._closed:
                raise EngineDeadError("the engine is not running")
            if sub.num_seqs > self.capacity:
                raise ValueError(f"the request asks for {sub.num_seqs} sequences (prompts x n) "
                                 f"but the server holds at most {self.capacity} at once")
            if self._in_flight + sub.num_seqs > self.capacity:  # fast path; the engine re-checks
                raise QueueFullError(self._full_message())
            self._inbox.append(("add", sub))
        self._wake.set()
        sub._decided.wait()
        if sub._error is not None:
            raise sub._error
        return sub

    def abort(self, sub: Submission) -> None:
        """Stop every request of `sub` (no-op for finished ones); frees their KV pages."""
        if sub.finished:
            return
        with self._lock:
            if self._closed:
                return
            self._inbox.append(("abort", sub))
        self._wake.set()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the engine thread; in-flight requests get an EngineDeadError."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._make_engine()
            self.capacity = self.engine.config.max_num_seqs + self.max_queued_requests
            self.metrics.set_stats(self.engine.stats())
        except BaseException as e:  # noqa: BLE001 - handed to start()'s caller
            self._error = e
            self._closed = True
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop(self.engine)
        except BaseException as e:  # noqa: BLE001 - a dead engine must still answer its callers
            log.exception("the engine thread failed; the server can no longer generate")
            self._error = e
        finally:
            self._close(EngineDeadError("the engine stopped" if self._error is None else
                                        f"the engine failed: {self._error!r}"))

    def _loop(self, engine: LLMEngine) -> None:
        last_refresh = last_log = time.monotonic()
        logged_totals = (0, 0)
        busy = False
        unsaved = True  # compiled executables may be waiting to be written to the cache
        idle_since = time.monotonic()
        while not self._stopping:
            self._wake.clear()
            self._process_inbox(engine)
            if engine.has_unfinished_requests():
                busy = True
                self._dispatch(engine.step())
            elif busy:  # just went idle: make the snapshot exact
                busy = False
                unsaved = True  # steps compiled on first use may be waiting to be saved
                self.metrics.set_stats(engine.stats())
                last_refresh = idle_since = time.monotonic()
            elif unsaved and time.monotonic() - idle_since >= SAVE_WHEN_IDLE_FOR_S:
                # quiet for a while: persist one compiled executable (it holds the GIL for up to
                # a few hundred ms), then look at the inbox again
                unsaved = engine.save_executables(max_entries=1) > 0
            else:
                self._wake.wait(SAVE_WHEN_IDLE_FOR_S if unsaved else self.stats_interval)
            now = time.monotonic()
            if busy and now - last_refresh >= STATS_REFRESH_S:
                self.metrics.set_stats(engine.stats())
                last_refresh = now
            if now - last_log >= self.stats_interval:
                logged_totals = self._log_stats(engine, now - last_log, logged_totals)
                last_log = now

    def _process_inbox(self, engine: LLMEngine) -> None:
        while True:
            with self._lock:
                if not self._inbox:
                    return
                kind, sub = self._inbox.popleft()
            if kind == "abort":
                for rid in sub.request_ids:
                    if rid in self._tracked:
                        engine.abort_request(rid)
            else:
                self._admit(engine, sub)

    def _admit(self, engine: LLMEngine, sub: Submission) -> None:
        if self._in_flight + sub.num_seqs > self.capacity:
            sub._decide(QueueFullError(self._full_message()))
            return
        added = []
        try:
            for rid, (text, ids) in zip(sub.request_ids, sub.prompts):
                engine.add_request(rid, prompt=text, prompt_token_ids=ids, params=sub.params,
                                   output_kind=OutputKind.DELTA)
                added.append(rid)
        except ValueError as e:  # RequestError included: the request can never be served
            for rid in added:
                engine.abort_request(rid)  # its final output is dropped: it is not tracked
            sub._decide(e)
            return
        for rid in added:
            self._tracked[rid] = _Tracked(sub, sub.seqs_per_prompt)
        sub._unfinished = len(added)
        self._in_flight += sub.num_seqs
        sub._decide(None)

    def _dispatch(self, outputs) -> None:
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            tracked.last_token_time = self.metrics.observe(out, tracked.last_token_time)
            tracked.submission.outputs.put(out)
            if out.finished:
                del self._tracked[out.request_id]
                self._in_flight -= tracked.num_seqs
                tracked.submission._unfinished -= 1
                tracked.submission.finished = tracked.submission._unfinished == 0

    def _close(self, error: EngineDeadError) -> None:
        with self._lock:
            self._closed = True
            pending, self._inbox = list(self._inbox), collections.deque()
        for kind, sub in pending:
            if kind == "add":
                sub._decide(error)
        for tracked in self._tracked.values():
            tracked.submission.outputs.put(error)
        self._tracked.clear()
        self._in_flight = 0

    def _full_message(self) -> str:
        return (f"the server is at capacity ({self.capacity} sequences in flight: max_num_seqs "
                f"running + {self.max_queued_requests} queued); retry later")

    def _log_stats(self, engine: LLMEngine, elapsed: float,
                   last_totals: tuple[int, int]) -> tuple[int, int]:
        stats = engine.stats()
        totals = (stats.prompt_tokens_total, stats.generation_tokens_total)
        if stats.num_running or stats.num_waiting or totals != last_totals:
            kv = ", ".join(f"{g} {u.usage:.1%}" for g, u in sorted(stats.kv.items()))
            log.info("running: %d seqs, waiting: %d seqs, KV cache use: %s, prompt: %.1f tok/s, "
                     "generation: %.1f tok/s, preemptions: %d", stats.num_running,
                     stats.num_waiting, kv, (totals[0] - last_totals[0]) / elapsed,
                     (totals[1] - last_totals[1]) / elapsed, stats.num_preemptions)
        return totals
