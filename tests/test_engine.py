"""The engine: batching never changes a request's output; pages are accounted for and returned."""

import logging
import math

import jax
import pytest

from engine_utils import make_engine, random_requests, run_alone, run_all
from jaxpage.engine import OutputKind, RequestError
from jaxpage.sampling_params import SamplingParams

REQUESTS = random_requests(seed=0, n=24)
FAMILIES = ["gemma2", "gemma3"]


@pytest.fixture(scope="module")
def alone():
    """Every request run on its own through a roomy engine: the reference outputs."""
    return {f: run_alone(make_engine(f, num_decode_steps=1), REQUESTS) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_outputs_equal_each_request_alone_in_a_roomy_cache(family, alone):
    engine = make_engine(family)
    assert run_all(engine, REQUESTS) == alone[family]
    assert engine.scheduler.num_preemptions == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_unchanged_when_a_small_cache_forces_preemption(family, alone):
    engine = make_engine(family, num_pages=30)
    assert run_all(engine, REQUESTS) == alone[family]
    assert engine.scheduler.num_preemptions > 0, "the cache was meant to be too small"


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_unchanged_with_a_token_budget_of_16_chunking_prefills(family, alone):
    engine = make_engine(family, max_num_batched_tokens=16)
    assert run_all(engine, REQUESTS) == alone[family]


SHORT_REQUESTS = random_requests(seed=4, n=20, max_prompt=24, max_output=6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_outputs_unchanged_through_each_pallas_kernel(family, backend):
    """The Pallas kernels (interpret mode on this host) inside the batched engine give every
    request what the XLA reference gives it alone -- the whole model through each kernel."""
    alone = run_alone(make_engine(family, page_size=8, num_decode_steps=1), SHORT_REQUESTS)
    engine = make_engine(family, attention_backend=backend, page_size=8, num_pages=64)
    assert engine.backend == backend
    assert run_all(engine, SHORT_REQUESTS) == alone


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_sampling_is_reproducible_whatever_else_is_batched(family):
    def params_for(i):
        return SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=REQUESTS[i][1])

    engine = make_engine(family)
    batched = run_all(engine, REQUESTS, params_for)
    assert batched == run_alone(engine, REQUESTS, params_for)
    assert batched == run_all(make_engine(family, num_pages=30), REQUESTS, params_for)


def test_aborts_at_any_time_free_every_page():
    engine = make_engine("gemma3")
    for i, (prompt, max_tokens) in enumerate(REQUESTS):
        engine.add_request(f"r{i}", prompt_token_ids=prompt,
                           params=SamplingParams(temperature=0.0, max_tokens=max_tokens))
    engine.abort_request("r3")  # still waiting
    aborted = {"r3"}
    for step in range(12):
        outs = engine.step()
        if step in (2, 5, 9):
            victim = next(r for r in engine.requests if r not in aborted)
            engine.abort_request(victim)
            aborted.add(victim)
        assert all(o.outputs[0].finish_reason in (None, "stop", "length", "abort") for o in outs)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out.outputs[0].finish_reason
    assert {r for r, why in finals.items() if why == "abort"} <= aborted
    assert all(u.pages_used == 0 and u.tokens_stored == 0 for u in engine.stats().kv.values())
    assert engine.stats().num_running == engine.stats().num_waiting == 0


def test_sliding_window_pages_go_back_during_a_long_generation():
    engine = make_engine("gemma3", max_model_len=160)
    window, page = engine.model_config.sliding_window, engine.config.page_size
    engine.add_request("long", prompt_token_ids=[5, 6, 7],
                       params=SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True))
    seq = engine.requests["long"].sequences[0]
    most_local, most_global = 0, 0
    while engine.has_unfinished_requests():
        engine.step()
        most_local = max(most_local, engine.kv.num_held_pages(seq.seq_id, "local"))
        most_global = max(most_global, engine.kv.num_held_pages(seq.seq_id, "global"))
    assert most_local <= math.ceil(window / page) + 1
    assert most_global == math.ceil(122 / page)  # global layers keep every page


def test_slot_utilisation_stays_above_90_percent_with_page_16():
    # A window of 16 pages, as real Gemma 3 windows (512/1024 tokens) are many pages long.
    engine = make_engine("gemma3", sliding_window=256, page_size=16, num_pages=200,
                         max_model_len=512, max_num_batched_tokens=128)
    requests = random_requests(seed=3, n=16, max_prompt=300, max_output=30)
    requests = [(p + p[:1] * 60, n) for p, n in requests]  # every prompt at least 60 tokens
    for i, (prompt, max_tokens) in enumerate(requests):
        engine.add_request(f"r{i}", prompt_token_ids=prompt,
                           params=SamplingParams(temperature=0.0, max_tokens=max_tokens))
    worst = 1.0
    while engine.has_unfinished_requests():
        engine.step()
        for group, usage in engine.stats().kv.items():
            if usage.pages_used:
                worst = min(worst, usage.slot_utilization)
    assert worst >= 0.9, f"slot utilisation fell to {worst:.3f}"


def test_memory_accounting_reports_pages_and_tokens_per_group():
    engine = make_engine("gemma3")
    engine.add_request("a", prompt_token_ids=list(range(3, 23)),
                       params=SamplingParams(temperature=0.0, max_tokens=4))
    engine.step()  # prefill (20 tokens, 5 pages of 4); the next step is already launched
    seq = engine.requests["a"].sequences[0]
    kv = engine.stats().kv
    computed = seq.num_computed_tokens  # launched steps included
    assert computed in (20, 21)
    assert kv["global"].tokens_stored == computed
    assert kv["global"].pages_used == math.ceil(computed / 4)
    assert kv["global"].pages_free == kv["global"].pages_total - kv["global"].pages_used
    assert kv["local"].tokens_stored <= computed and kv["local"].pages_used <= 3
    assert engine.stats().num_running == 1


def test_a_request_that_can_never_fit_is_rejected_at_admission():
    engine = make_engine("gemma2", max_model_len=64)
    with pytest.raises(RequestError, match="maximum context length is 64 tokens.*70 input tokens"):
        engine.add_request("long", prompt_token_ids=[5] * 70)
    with pytest.raises(RequestError, match="requested 84 tokens"):
        engine.add_request("long", prompt_token_ids=[5] * 60, params=SamplingParams(max_tokens=24))
    small = make_engine("gemma2", num_pages=8, max_model_len=160)
    with pytest.raises(RequestError, match="KV pages"):
        small.add_request("big", prompt_token_ids=[5] * 40, params=SamplingParams(max_tokens=20))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request("bad", prompt_token_ids=[5, 100000])
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("empty", prompt_token_ids=[])
    assert not engine.has_unfinished_requests()


def test_stop_token_ids_and_max_tokens_finish_requests_with_the_right_reason():
    engine = make_engine("gemma3")
    free_run = run_all(engine, [([9, 8, 7], 10)])["r0"]
    stop_at = free_run[4]
    engine.add_request("s", prompt_token_ids=[9, 8, 7],
                       params=SamplingParams(temperature=0.0, max_tokens=10,
                                             stop_token_ids=[stop_at]))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    first = free_run.index(stop_at)
    assert final.outputs[0].token_ids == free_run[:first + 1]
    assert final.outputs[0].finish_reason == "stop" and final.outputs[0].stop_reason == stop_at


def test_delta_outputs_add_up_to_the_cumulative_output():
    engine = make_engine("gemma2")
    engine.add_request("d", prompt_token_ids=[4, 5, 6],
                       params=SamplingParams(temperature=0.0, max_tokens=9, logprobs=2),
                       output_kind=OutputKind.DELTA)
    tokens, logprobs, finish = [], [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.outputs[0].token_ids
            logprobs += out.outputs[0].logprobs
            finish = out.outputs[0].finish_reason
    assert tokens == run_all(engine, [([4, 5, 6], 9)])["r0"]
    assert len(logprobs) == 9 and all(t in lp and len(lp) in (2, 3) for t, lp in zip(tokens, logprobs))
    assert finish == "length"


def test_no_compilation_happens_after_start_up(caplog):
    compiles = []

    def listener(event, duration, **kwargs):
        if event in ("/jax/core/compile/backend_compile_duration",
                     "/jax/core/compile/jaxpr_trace_duration"):
            compiles.append(kwargs.get("fun_name", event))

    with caplog.at_level(logging.INFO, logger="jaxpage"):
        engine = make_engine("gemma3", precompile=True, max_num_batched_tokens=32)
    assert any("compilation took" in r.message for r in caplog.records)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        varied = [
            SamplingParams(temperature=0.0, max_tokens=6),
            SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=1, max_tokens=9),
            SamplingParams(temperature=1.0, min_p=0.1, logprobs=3, max_tokens=4),
            SamplingParams(temperature=0.0, presence_penalty=0.5, repetition_penalty=1.2,
                           max_tokens=7, min_tokens=3, stop_token_ids=[11]),
            SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=5),
        ]
        requests = random_requests(seed=7, n=10, max_prompt=70)
        run_all(engine, requests, lambda i: varied[i % len(varied)])
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def test_a_dropped_engine_gives_its_kv_cache_back():
    # Benchmarks and servers build one engine after another in a process: nothing may keep a
    # finished engine (and its KV cache) alive.
    import gc  # noqa: PLC0415
    import weakref  # noqa: PLC0415

    engine = make_engine("gemma2")
    run_all(engine, REQUESTS[:3])
    caches = [weakref.ref(k) for k, _ in engine.runner.kv_caches]
    del engine
    gc.collect()
    assert all(ref() is None for ref in caches)
