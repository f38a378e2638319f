"""Decode bursts (several decode steps per launch): a request's tokens are the ones single steps
give it; bursts run only where nothing needs the host between tokens."""

import jax
import pytest

from engine_utils import make_engine, random_requests, run_all
from jaxpage.engine import OutputKind
from jaxpage.request import Request, Sequence
from jaxpage.sampling_params import SamplingParams
from jaxpage.scheduler import Scheduler
from test_paging import PAGE, make_manager, make_seq

REQUESTS = random_requests(seed=11, n=10, max_prompt=30, max_output=23)
FAMILIES = ["gemma2", "gemma3"]


def count_bursts(engine) -> list[int]:
    """Spy on the runner: one entry per launch, 1 for a burst."""
    launches, launch = [], engine.runner.launch

    def spy(step):
        launches.append(int(step.burst))
        return launch(step)

    engine.runner.launch = spy
    return launches


def run_with_steps(family: str, num_decode_steps: int, params_for=None, **config):
    engine = make_engine(family, num_decode_steps=num_decode_steps, **config)
    launches = count_bursts(engine)
    return run_all(engine, REQUESTS, params_for), launches


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_bursts_give_the_tokens_of_single_steps(family):
    single, launches = run_with_steps(family, 1)
    assert not any(launches)
    bursts, launches = run_with_steps(family, 4)
    assert bursts == single
    assert sum(launches) >= 3, "the batch (mostly) never ran a burst"


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_sampling_with_filters_draws_the_same_tokens_in_bursts(family):
    def params_for(i):
        return SamplingParams(temperature=0.9, top_k=40 if i % 2 else 0, top_p=0.8, seed=i,
                              max_tokens=REQUESTS[i][1])

    single, _ = run_with_steps(family, 1, params_for)
    bursts, launches = run_with_steps(family, 3, params_for)
    assert bursts == single and sum(launches) >= 3


def test_bursts_keep_outputs_when_a_small_cache_preempts_and_windows_recycle_pages():
    single, _ = run_with_steps("gemma3", 1, num_pages=30)
    engine = make_engine("gemma3", num_decode_steps=4, num_pages=30)
    launches = count_bursts(engine)
    assert run_all(engine, REQUESTS) == single
    assert sum(launches) > 0 and engine.scheduler.num_preemptions > 0


def test_a_stop_inside_a_burst_ends_the_output_at_the_stop():
    engine = make_engine("gemma3", num_decode_steps=4)
    free_run = run_all(engine, [([9, 8, 7], 12)])["r0"]
    stop_at = free_run[5]  # the prefill samples token 0; a burst samples tokens 1-4, then 5-8
    first = free_run.index(stop_at)
    launches = count_bursts(engine)
    engine.add_request("s", prompt_token_ids=[9, 8, 7], output_kind=OutputKind.FINAL_ONLY,
                       params=SamplingParams(temperature=0.0, max_tokens=12,
                                             stop_token_ids=[stop_at]))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].outputs[0].token_ids == free_run[:first + 1]
    assert outs[-1].outputs[0].finish_reason == "stop" and sum(launches) >= 1
    assert not engine.scheduler.running
    assert all(u.pages_used == 0 for u in engine.kv.usage().values())  # every page given back


def test_the_context_limit_ends_a_sequence_inside_a_burst():
    limit = 40
    prompt = list(range(3, 30))  # 27 tokens: 13 more fit
    single = make_engine("gemma2", num_decode_steps=1, max_model_len=limit)
    engine = make_engine("gemma2", num_decode_steps=4, max_model_len=limit)
    params = SamplingParams(temperature=0.0, max_tokens=limit - len(prompt), ignore_eos=True)
    outs = []
    for e in (single, engine):
        e.add_request("x", prompt_token_ids=prompt, params=params,
                      output_kind=OutputKind.FINAL_ONLY)
        while e.has_unfinished_requests():
            outs += e.step()
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert len(outs[1].outputs[0].token_ids) == 13 and outs[1].outputs[0].finish_reason == "length"


def test_pages_written_in_bursts_serve_a_later_request_from_the_prefix_cache():
    """A follow-up whose prompt holds an earlier answer reuses the pages the bursts filled and
    decodes what an engine without prefix caching decodes."""
    prompt = list(range(5, 21))
    outputs = {}
    for caching in (True, False):
        engine = make_engine("gemma2", num_decode_steps=4, enable_prefix_caching=caching)
        first = run_all(engine, [(prompt, 20)])["r0"]
        follow_up = prompt + first + [11, 12]
        engine.add_request("f", prompt_token_ids=follow_up, output_kind=OutputKind.FINAL_ONLY,
                           params=SamplingParams(temperature=0.0, max_tokens=8))
        while engine.has_unfinished_requests():
            for out in engine.step():
                outputs[caching] = (out.outputs[0].token_ids, out.num_cached_tokens)
    assert outputs[True][0] == outputs[False][0]
    assert outputs[True][1] >= len(prompt) + 16  # pages of generated tokens came from the cache


def test_penalties_logprobs_and_min_tokens_keep_their_batch_to_single_steps():
    needs_host = [SamplingParams(temperature=0.0, max_tokens=12, repetition_penalty=1.3),
                  SamplingParams(temperature=0.0, max_tokens=12, logprobs=2),
                  SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12)]
    for params in needs_host:
        engine = make_engine("gemma3", num_decode_steps=4)
        launches = count_bursts(engine)
        reference = make_engine("gemma3", num_decode_steps=1)
        for e in (engine, reference):
            e.add_request("plain", prompt_token_ids=[4, 5, 6],
                          params=SamplingParams(temperature=0.0, max_tokens=12))
            e.add_request("host", prompt_token_ids=[7, 8], params=params)
        got, want = {}, {}
        for e, out in ((engine, got), (reference, want)):
            while e.has_unfinished_requests():
                for o in e.step():
                    out[o.request_id] = (o.outputs[0].token_ids, o.outputs[0].logprobs)
        assert got == want and not any(launches), params


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
def test_the_compiled_gpu_kernels_give_the_same_tokens_in_bursts():
    config = dict(attention_backend="pallas_gpu", max_num_seqs=16)  # decode kernels either way
    single, _ = run_with_steps("gemma3", 1, **config)
    bursts, launches = run_with_steps("gemma3", 4, **config)
    assert bursts == single and sum(launches) >= 3


# -- the scheduler's choice -------------------------------------------------------------------

def step_through(sched: Scheduler) -> dict[int, int]:
    """Schedule one step and play it on the host; steps per sequence id."""
    out = sched.schedule()
    for item in out.scheduled:
        item.seq.num_computed_tokens = item.end
        if item.samples:
            item.seq.token_ids += [7] * item.num_steps
            if item.seq.num_output_tokens >= item.seq.params.max_tokens:
                sched.remove(item.seq)
    return {item.seq.seq_id: item.num_steps for item in out.scheduled}


def test_a_burst_waits_while_a_request_could_start_and_stops_at_each_sequences_end():
    kv = make_manager()
    sched = Scheduler(kv, max_num_seqs=2, max_num_batched_tokens=64, num_decode_steps=4,
                      max_model_len=200)
    a, b, c = make_seq(0, 5, 7), make_seq(1, 6, 30), make_seq(2, 4, 30)
    sched.add(a)
    assert step_through(sched) == {0: 1}        # a's prefill samples its first token
    assert step_through(sched) == {0: 4}        # a decodes alone: a burst of 4 (5 tokens out)
    assert len(kv.block_table(0, "global")) * PAGE >= a.num_computed_tokens == 9
    sched.add(b)
    sched.add(c)
    assert step_through(sched) == {0: 1, 1: 1}  # b can start: single steps while it prefills
    # c cannot start (max_num_seqs=2): a burst, in which a runs the 1 step it has left
    assert step_through(sched) == {0: 1, 1: 4}
    assert a.num_output_tokens == 7 and a not in sched.running
    assert step_through(sched) == {1: 1, 2: 1}  # a's seat went to c


def test_the_scheduler_bursts_only_rows_that_sample_without_the_host():
    kv = make_manager()
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64, num_decode_steps=4,
                      max_model_len=200)
    plain = make_seq(0, 5, 20)
    penalised_request = Request("p", None, [3, 4, 5], SamplingParams(max_tokens=20,
                                                                    presence_penalty=0.5),
                                eos_token_ids=(1,))
    penalised = Sequence(1, penalised_request, 0, [3, 4, 5], seed=0)
    penalised_request.sequences.append(penalised)
    sched.add(plain)
    step_through(sched)
    assert step_through(sched) == {0: 4}
    sched.add(penalised)
    step_through(sched)
    assert set(step_through(sched).values()) == {1}


def test_a_batch_about_to_end_finishes_in_single_steps():
    kv = make_manager()
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64, num_decode_steps=4,
                      max_model_len=200)
    seqs = [make_seq(i, 5, 3) for i in range(2)]  # the prefill's token, then 2 left each
    for s in seqs:
        sched.add(s)
    step_through(sched)
    assert step_through(sched) == {0: 1, 1: 1}
    assert step_through(sched) == {0: 1, 1: 1}
    assert [s.num_output_tokens for s in seqs] == [3, 3] and not sched.running
