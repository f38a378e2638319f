"""LLMEngine: requests in, tokens out; the loop that ties scheduler, allocator and runner together.

    engine.add_request("r1", prompt_token_ids=[2, 17, 99], params=SamplingParams(max_tokens=8))
    while engine.has_unfinished_requests():
        for out in engine.step(): ...

`step` schedules one batch, runs it, and returns a RequestOutput for every request that produced
tokens or finished. `abort_request` may be called at any time; it frees everything at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import time

import jax.numpy as jnp

from jaxpage import beam_search, compat, sampler
from jaxpage.attention import max_cache_array_elements, resolve_backend
from jaxpage.config import EngineConfig
from jaxpage.kv_cache import free_kv_bytes, plan_num_pages
from jaxpage.models.gemma import Gemma
from jaxpage.outputs import OutputKind, OutputTracker, RequestOutput
from jaxpage.paging import GroupUsage, KVCacheManager
from jaxpage.request import Request, Sequence, SeqStatus
from jaxpage.runner import ModelRunner, StepHandle, StepResult
from jaxpage.sampling_params import MAX_LOGPROBS, SamplingParams
from jaxpage.scheduler import Scheduler, SchedulerOutput
from jaxpage.tokenizer import IncrementalDetokenizer, StopChecker

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request that can never be served (bad prompt, too long); `param` names the culprit."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_preemptions: int
    kv: dict[str, GroupUsage]
    prompt_tokens_total: int
    generation_tokens_total: int
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0     # of those, tokens found


@dataclasses.dataclass
class _Step:
    """A launched step: what was scheduled, who samples in which row, where the tokens go."""

    sched: SchedulerOutput
    row_seqs: list[Sequence]
    sources: list[int]     # row -> index of the scheduled sequence whose logits it samples
    slots: list[int]       # row -> index of its first placeholder in token_ids (-1: no token)
    handle: StepHandle

    def num_tokens(self, row: int) -> int:
        """Tokens row `row` samples (a burst's steps for its sequence; 0 when it samples none)."""
        return 0 if self.slots[row] < 0 else self.sched.scheduled[self.sources[row]].num_steps


class LLMEngine:
    """Continuous-batching engine over one model on one device."""

    def __init__(self, model: Gemma, *, tokenizer=None, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        exe_cache_dir = None  # serialized executables: on with (and beside) the XLA cache
        if self.config.compilation_cache_dir is not None:
            xla_dir = (None if self.config.compilation_cache_dir == "default"
                       else self.config.compilation_cache_dir)
            compat.enable_persistent_compilation_cache(xla_dir)
            exe_cache_dir = compat.executable_cache_dir(xla_dir)
        self.model_config = model.config
        self.tokenizer = tokenizer
        self.backend = resolve_backend(self.config.attention_backend)
        self.max_model_len = min(self.config.max_model_len or self.model_config.max_context,
                                 self.model_config.max_context)
        kv_dtype = jnp.dtype(self.config.kv_cache_dtype or model.embedder.embedding.get_value().dtype)
        num_pages = plan_num_pages(
            self.model_config, page_size=self.config.page_size,
            kv_bytes=None if self.config.num_pages else free_kv_bytes(
                self.model_config, act_dtype=model.embedder.embedding.get_value().dtype,
                max_num_seqs=self.config.max_num_seqs,
                max_num_batched_tokens=self.config.max_num_batched_tokens,
                memory_utilization=self.config.gpu_memory_utilization),
            num_pages=self.config.num_pages, max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            max_model_len=self.max_model_len, dtype=kv_dtype,
            max_array_elements=max_cache_array_elements(self.backend))
        self.kv = KVCacheManager(
            page_size=self.config.page_size, num_pages=num_pages, max_context=self.max_model_len,
            windows={g: self.model_config.window_of(g) for g in num_pages},
            enable_prefix_caching=self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, max_num_seqs=self.config.max_num_seqs,
                                   max_num_batched_tokens=self.config.max_num_batched_tokens,
                                   num_decode_steps=self.config.num_decode_steps,
                                   max_model_len=self.max_model_len)
        self.runner = ModelRunner(
            model, num_pages=num_pages, page_size=self.config.page_size,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            max_model_len=self.max_model_len, backend=self.backend, kv_dtype=kv_dtype,
            compile_workers=self.config.compile_workers, precompile=self.config.precompile,
            max_copies=self.kv.max_copies_per_step, executable_cache_dir=exe_cache_dir,
            num_decode_steps=self.config.num_decode_steps)
        log.info("KV cache: %s pages of %d tokens; attention backend %s",
                 num_pages, self.config.page_size, self.backend)
        if self.config.precompile:
            self.runner.compile_all()
            log.info("start-up compilation took %.1f s", self.runner.executables.compile_seconds)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._seed_rng = random.Random(self.config.seed)
        self._outputs = OutputTracker(tokenizer)
        self._aborted: list[RequestOutput] = []
        self._in_flight: _Step | None = None
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None = None,
                    prompt_token_ids: list[int] | None = None,
                    params: SamplingParams | None = None, *,
                    output_kind: OutputKind = OutputKind.CUMULATIVE) -> None:
        """Queue a request; raises RequestError (a ValueError) if it can never be served."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use", "request_id")
        ids = self._prompt_ids(prompt, prompt_token_ids)
        max_tokens = self._check_fits(ids, params)
        if params.max_tokens != max_tokens:
            params = dataclasses.replace(params, max_tokens=max_tokens)
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; this engine has none", "stop")
        if params.prompt_logprobs is not None:
            raise RequestError("prompt_logprobs is not supported", "prompt_logprobs")
        if params.use_beam_search and params.stop:
            raise RequestError("stop strings are not supported with beam search", "stop")
        banned = set(params.stop_token_ids) | set(self._eos_ids())
        if params.min_tokens and len(banned) > sampler.BAN_ROOM:
            raise RequestError(f"min_tokens can hold back at most {sampler.BAN_ROOM} stop/eos "
                               f"token ids, got {len(banned)}", "stop_token_ids")
        if params.best_of and params.best_of > params.n and output_kind is OutputKind.DELTA:
            output_kind = OutputKind.FINAL_ONLY  # the best n are only known at the end
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(31)
        request = Request(request_id, prompt, ids, params, self._eos_ids(), seed=seed)
        seq = self._new_sequence(request, 0, list(ids))
        self.scheduler.add(seq)
        self.requests[request_id] = request
        self._outputs.add(request_id, output_kind)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its pages; its final output says finish_reason="abort"."""
        request = self.requests.get(request_id)
        if request is None:
            return
        for seq in request.sequences:
            if not seq.finished:
                self._finish(seq, "abort")
        self._aborted.append(self._outputs.output(request))
        self._forget(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._aborted) or self._in_flight is not None

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch; outputs of the requests that made progress (and of aborted ones).

        Steps are pipelined: the next batch is scheduled and launched before this one's sampled
        tokens are read back, with those tokens fed to it on the device, so host work overlaps
        device work. Requests whose sampling needs their real token history (penalties) make
        the engine wait instead.
        """
        outputs, self._aborted = self._aborted, []
        if self._in_flight is None:
            self._in_flight = self._dispatch()
            if self._in_flight is None:
                return outputs
        following = self._dispatch() if self._can_overlap() else None
        outputs += self._process(self._in_flight)
        self._in_flight = following
        return outputs

    def save_executables(self, max_entries: int | None = None) -> int:
        """Write executables compiled at start-up (or on first use) to the executable cache, up
        to `max_entries`; returns how many are still unsaved. Callers run it while idle."""
        self.runner.executables.save(max_entries)
        return self.runner.executables.unsaved

    def stats(self) -> EngineStats:
        cache = self.kv.prefix_cache
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_preemptions=self.scheduler.num_preemptions, kv=self.kv.usage(),
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            prefix_cache_queries=cache.queries if cache else 0,
            prefix_cache_hits=cache.hits if cache else 0)

    def _dispatch(self) -> "_Step | None":
        """Schedule and launch a step; each sampling row's token is a placeholder until read."""
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return None
        now = time.monotonic()
        row_seqs, sources = [], []
        for i, item in enumerate(sched.scheduled):
            row_seqs.append(item.seq)
            sources.append(i)
            if item.samples and self._forks_pending(item.seq):
                children = [self._fork(item.seq, j) for j in range(1, item.seq.request.width)]
                row_seqs += children
                sources += [i] * len(children)
        rows = [self._row_spec(seq) for seq in row_seqs]
        handle = self.runner.dispatch(sched, rows, sources, self.kv)
        for seq, src in zip(row_seqs, sources):
            seq.num_computed_tokens = sched.scheduled[src].end
            # cache full pages now: the next step's window release must find them cached
            self.kv.commit(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = now
        slots = []
        for r, (seq, src) in enumerate(zip(row_seqs, sources)):
            if not sched.scheduled[src].samples or seq.params.use_beam_search:
                slots.append(-1)
                continue
            steps = sched.scheduled[src].num_steps
            seq.token_ids += [-1 - r] * steps  # the last is read on the device by the next step
            seq.num_pending += steps
            slots.append(len(seq.token_ids) - steps)
            if (seq.num_output_tokens >= seq.params.max_tokens
                    or seq.num_tokens >= self.max_model_len):
                seq.finishing = True  # ends at this token whatever it is: nothing more to compute
        return _Step(sched, row_seqs, sources, slots, handle)

    def _process(self, step: "_Step") -> list[RequestOutput]:
        """Read a step's sampled tokens back and act on them (stops, beams, outputs)."""
        result = self.runner.collect(step.handle)
        for seq, src in zip(step.row_seqs, step.sources):
            item = step.sched.scheduled[src]
            if self.kv.has(seq.seq_id):  # not preempted or finished since it was launched
                self.kv.commit(seq.seq_id, seq.token_ids, item.end)
        touched: dict[str, Request] = {}
        per_step = [result.step(j) for j in range(result.num_steps)]
        for r, (seq, src) in enumerate(zip(step.row_seqs, step.sources)):
            if seq.finished or not step.sched.scheduled[src].samples:
                continue
            request = seq.request
            touched[request.request_id] = request
            if request.params.use_beam_search:
                width = 2 * request.width
                seq.beam_candidates = list(zip(per_step[0].top_ids[r][:width].tolist(),
                                               per_step[0].top_logprobs[r][:width].tolist()))
                continue
            tokens = result.token_ids[:, r].tolist()
            for j in range(step.num_tokens(r)):
                if seq.finished:  # stopped inside a burst: the later tokens are dropped
                    break
                self._accept_token(seq, step.slots[r] + j, tokens[j], per_step[j], r)
        outputs = []
        for request in touched.values():
            if request.params.use_beam_search:
                self._beam_step(request)
            out = self._outputs.output(request)
            if out is not None:
                outputs.append(out)
            if request.finished:
                request.metrics.finished_time = time.monotonic()
                self._forget(request)
        return outputs

    def _can_overlap(self) -> bool:
        return not any(sampler.reads_output_tokens(seq.params) for seq in self.scheduler.running)

    # -- sequences -----------------------------------------------------------------------------
    def _new_sequence(self, request: Request, index: int, token_ids: list[int]) -> Sequence:
        params = request.params
        wants_logprobs = params.logprobs is not None and not params.use_beam_search
        seq = Sequence(next(self._seq_ids), request, index, token_ids,
                       seed=(request.seed + 7919 * index) & 0x7FFFFFFF,
                       logprobs=[] if wants_logprobs else None)
        if self.tokenizer is not None and not params.use_beam_search:
            seq.detokenizer = IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens)
            seq.stop_checker = StopChecker(
                params.stop, include_stop_str_in_output=params.include_stop_str_in_output)
        request.sequences.append(seq)
        return seq

    def _forks_pending(self, seq: Sequence) -> bool:
        """A parallel-sampling request whose prompt is done but whose samples don't exist yet."""
        request = seq.request
        return (request.width > 1 and not request.params.use_beam_search
                and len(request.sequences) == 1 and seq.num_output_tokens == 0)

    def _fork(self, parent: Sequence, index: int) -> Sequence:
        """A new sequence sharing the parent's tokens and pages (copy-on-write from here on)."""
        child = self._new_sequence(parent.request, index, list(parent.token_ids))
        child.cumulative_logprob = parent.cumulative_logprob
        if child.logprobs is not None:
            child.logprobs = list(parent.logprobs)
        if parent.status is SeqStatus.RUNNING:
            self.kv.fork(parent.seq_id, child.seq_id)
            child.num_computed_tokens = parent.num_computed_tokens
            child.status = SeqStatus.RUNNING
            self.scheduler.running.append(child)
        else:  # a preempted parent has no pages: the child recomputes too
            self.scheduler.add(child)
        return child

    def _row_spec(self, seq: Sequence) -> sampler.RowSpec:
        params = seq.params
        if params.use_beam_search:  # beams read the top raw log-probs; no sampling
            params = self._beam_params(seq.request)
        return sampler.RowSpec(params=params, seed=seq.seed, step_index=seq.num_output_tokens,
                               prompt_token_ids=seq.request.prompt_token_ids,
                               output_token_ids=(seq.output_token_ids  # O(len): only if read
                                                 if sampler.reads_output_tokens(params) else ()),
                               eos_token_ids=() if params.ignore_eos else seq.request.eos_token_ids)

    @staticmethod
    def _beam_params(request: Request) -> SamplingParams:
        if request.beam_row_params is None:
            request.beam_row_params = SamplingParams(temperature=0.0, logprobs=MAX_LOGPROBS,
                                                     max_tokens=request.params.max_tokens)
        return request.beam_row_params

    def _accept_token(self, seq: Sequence, slot: int, token: int, result: StepResult,
                      row: int) -> None:
        """Put a sampled token in its placeholder slot, then check whether the sequence ends."""
        params, request = seq.params, seq.request
        self._count_tokens(request, 1)
        seq.token_ids[slot] = token
        seq.num_pending -= 1
        num_output = slot + 1 - seq.num_prompt_tokens
        logprob = float(result.logprobs[row])
        seq.cumulative_logprob += logprob
        if seq.logprobs is not None:
            entry = {}
            if params.logprobs:
                entry = {int(t): float(lp) for t, lp in zip(result.top_ids[row][:params.logprobs],
                                                          result.top_logprobs[row][:params.logprobs])}
            entry[token] = logprob
            seq.logprobs.append(entry)
        if not params.ignore_eos and token in request.eos_token_ids:
            self._finish(seq, "stop")
        elif token in params.stop_token_ids:
            self._finish(seq, "stop", token)
        else:
            if seq.detokenizer is not None:
                seq.text += seq.stop_checker.update(
                    seq.detokenizer.step(token), can_stop=num_output >= params.min_tokens)
                if seq.stop_checker.stopped:
                    self._finish(seq, "stop", seq.stop_checker.stop)
                    return
            if num_output >= params.max_tokens or slot + 1 >= self.max_model_len:
                self._finish(seq, "length")

    def _count_tokens(self, request: Request, n: int) -> None:
        if request.metrics.first_token_time is None:
            self.prompt_tokens_total += len(request.prompt_token_ids)
        self.generation_tokens_total += n
        now = time.monotonic()
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
        request.metrics.last_token_time = now

    def _beam_step(self, request: Request) -> None:
        """Once every live beam has its candidates: extend, fork and prune the beams."""
        live = [s for s in request.sequences if not s.finished]
        if any(s.beam_candidates is None for s in live):
            return  # a beam was preempted or not scheduled: wait for it
        params, width = request.params, request.width
        generated = live[0].num_output_tokens + 1
        end_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(request.eos_token_ids))
        continuing, ended = beam_search.select(
            [s.cumulative_logprob for s in live], [s.beam_candidates for s in live],
            width=width, end_ids=end_ids, can_end=generated > params.min_tokens)
        for c in ended:
            request.hypotheses.append(beam_search.Hypothesis(
                live[c.beam].output_token_ids + [c.token], c.score, "stop",
                c.token if c.token in params.stop_token_ids else None))
        at_limit = (generated >= params.max_tokens
                    or live[0].num_tokens + 1 >= self.max_model_len)
        if at_limit:
            request.hypotheses += [beam_search.Hypothesis(
                live[c.beam].output_token_ids + [c.token], c.score, "length") for c in continuing]
        self._count_tokens(request, len(continuing) + len(ended))
        if at_limit or beam_search.is_done(request.hypotheses, continuing, width=width,
                                           generated_len=generated,
                                           length_penalty=params.length_penalty):
            for seq in live:
                self._finish(seq, "stop")
            return
        reused: set[int] = set()
        targets = []
        for c in continuing:  # fork every beam chosen twice before any beam changes
            parent = live[c.beam]
            targets.append(parent if parent.seq_id not in reused
                           else self._fork(parent, len(request.sequences)))
            reused.add(parent.seq_id)
        for seq in live:
            seq.beam_candidates = None
            if seq.seq_id not in reused:
                self._finish(seq, "stop")
                request.sequences.remove(seq)
        for seq, c in zip(targets, continuing):
            seq.token_ids.append(c.token)
            seq.cumulative_logprob = c.score

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        if seq.num_pending:  # tokens of steps still in flight: they will not be read
            del seq.token_ids[-seq.num_pending:]
            seq.num_pending = 0
        if seq.stop_checker is not None and not seq.stop_checker.stopped:
            seq.text += seq.stop_checker.update(seq.detokenizer.flush())
            seq.text += seq.stop_checker.finish()
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.status = SeqStatus.FINISHED
        self.scheduler.remove(seq)

    def _forget(self, request: Request) -> None:
        self.requests.pop(request.request_id, None)
        self._outputs.forget(request)

    def _prompt_ids(self, prompt: str | None, prompt_token_ids: list[int] | None) -> list[int]:
        if prompt_token_ids is None:
            if prompt is None:
                raise RequestError("give a prompt or prompt_token_ids", "prompt")
            if self.tokenizer is None:
                raise RequestError("this engine has no tokenizer: give prompt_token_ids", "prompt")
            prompt_token_ids = self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise RequestError("the prompt is empty", "prompt")
        bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary "
                               f"[0, {self.model_config.vocab_size})", "prompt")
        return ids

    def _check_fits(self, ids: list[int], params: SamplingParams) -> int:
        """max_tokens this request gets; RequestError when it can never be served."""
        limit = self.max_model_len
        if len(ids) >= limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, your request "
                f"has {len(ids)} input tokens. Please reduce the length of the input.", "prompt")
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - len(ids)
        if len(ids) + max_tokens > limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the input, {max_tokens} in the "
                f"completion). Please reduce the length of the input or completion.", "max_tokens")
        for group, pool in self.kv.pools.items():
            need = self.kv.pages_for(len(ids) + max_tokens, group,
                                     chunk=self.config.max_num_batched_tokens)
            if need > pool.num_pages - 1:
                raise RequestError(
                    f"the request needs {need} KV pages for its '{group}' layers but the cache "
                    f"holds only {pool.num_pages - 1}; reduce the input or max_tokens", "max_tokens")
        return max_tokens

    def _eos_ids(self) -> tuple[int, ...]:
        eos = set(self.model_config.eos_ids)
        if self.tokenizer is not None:
            eos.add(self.tokenizer.eos_id)
        return tuple(sorted(eos))
