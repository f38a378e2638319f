"""EngineClient: the one engine thread behind the HTTP server (tiny engine, in-process)."""

from __future__ import annotations

import queue
import time

import pytest
from engine_utils import make_engine, run_all

from jaxpage.engine import RequestError
from jaxpage.engine_client import EngineClient, EngineDeadError, QueueFullError
from jaxpage.sampling_params import SamplingParams

PROMPTS = [[5, 17, 99, 3], [8, 1, 2]]
LONG = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)


def slowed(engine, delay: float = 0.02):
    """The engine with each step delayed, so requests stay in flight while a test looks."""
    step = engine.step

    def slow_step():
        time.sleep(delay)
        return step()

    engine.step = slow_step
    return engine


@pytest.fixture
def started():
    clients = []

    def start(make=lambda: make_engine("gemma3", max_num_seqs=2), **kwargs) -> EngineClient:
        client = EngineClient(make, stats_interval=0.2, **kwargs)
        client.start()
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.shutdown()


def collect(sub, timeout: float = 60.0) -> dict[str, list]:
    """Every output of a submission by request id, until all are finished."""
    outputs = {rid: [] for rid in sub.request_ids}
    while not all(outs and outs[-1].finished for outs in outputs.values()):
        item = sub.outputs.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        outputs[item.request_id].append(item)
    return outputs


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_outputs_arrive_as_deltas_equal_to_the_engine_run_alone(started):
    client = started()
    params = SamplingParams(temperature=0.0, max_tokens=9)
    outputs = collect(client.submit([(None, p) for p in PROMPTS], params))
    expected = run_all(make_engine("gemma3", max_num_seqs=2), [(p, 9) for p in PROMPTS])
    for i, outs in enumerate(outputs.values()):
        assert sum((o.outputs[0].token_ids for o in outs), []) == expected[f"r{i}"]
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    assert client.num_in_flight == 0


def test_admission_stops_at_max_num_seqs_plus_max_queued_and_resumes_when_room_is_made(started):
    client = started(lambda: slowed(make_engine("gemma3", max_num_seqs=2)),
                     max_queued_requests=1)
    assert client.capacity == 3
    subs = [client.submit([(None, PROMPTS[0])], LONG) for _ in range(3)]
    with pytest.raises(QueueFullError, match="capacity"):
        client.submit([(None, PROMPTS[1])], LONG)
    with pytest.raises(ValueError, match="holds at most 3"):  # could never fit: not a 503
        client.submit([(None, p) for p in PROMPTS], SamplingParams(n=2))
    for sub in subs:
        client.abort(sub)
    wait_until(lambda: client.num_in_flight == 0)
    collect(client.submit([(None, PROMPTS[1])], SamplingParams(max_tokens=2)))


def test_an_aborted_submission_ends_with_abort_and_frees_its_pages(started):
    client = started(lambda: slowed(make_engine("gemma3", max_num_seqs=2)))
    sub = client.submit([(None, p) for p in PROMPTS], LONG)
    first = sub.outputs.get(timeout=60)
    assert not first.finished
    client.abort(sub)
    outputs = collect(sub)
    assert {outs[-1].outputs[0].finish_reason for outs in outputs.values()} == {"abort"}
    wait_until(lambda: client.metrics.stats.num_running == 0)
    assert all(u.pages_used == 0 for u in client.metrics.stats.kv.values())
    assert client.metrics.success.labels(finished_reason="abort")._value.get() == 2


def test_an_unservable_prompt_raises_the_engine_error_and_leaves_nothing_behind(started):
    client = started()
    too_long = [7] * 200
    with pytest.raises(RequestError, match="maximum context length") as info:
        client.submit([(None, PROMPTS[0]), (None, too_long)], SamplingParams(max_tokens=4))
    assert info.value.param == "prompt"
    assert client.num_in_flight == 0
    wait_until(lambda: not client.engine.has_unfinished_requests())
    collect(client.submit([(None, PROMPTS[1])], SamplingParams(max_tokens=2)))


@pytest.mark.parametrize("num_decode_steps, token_steps", [(1, 5), (4, 2)])
def test_latency_metrics_follow_each_request(started, num_decode_steps, token_steps):
    """One inter-token latency per step that brought tokens after the first: with bursts of 4,
    5 tokens come as the prefill's one, then one burst of 4."""
    client = started(lambda: make_engine("gemma3", max_num_seqs=2,
                                         num_decode_steps=num_decode_steps))
    collect(client.submit([(None, PROMPTS[0])], SamplingParams(max_tokens=5, ignore_eos=True)))
    m = client.metrics
    assert m.ttft._sum.get() > 0 and m.e2e._sum.get() >= m.ttft._sum.get()
    counts = {name: h.collect()[0].samples for name, h in (("ttft", m.ttft), ("itl", m.itl),
                                                           ("e2e", m.e2e))}
    count = {name: next(s.value for s in samples if s.name.endswith("_count"))
             for name, samples in counts.items()}
    assert count == {"ttft": 1, "itl": token_steps - 1, "e2e": 1}
    assert m.success.labels(finished_reason="length")._value.get() == 1


def test_an_engine_failure_reaches_every_caller_and_the_client_reports_dead(started):
    def failing():
        engine = slowed(make_engine("gemma3", max_num_seqs=2))
        step, calls = engine.step, []

        def step_then_fail():
            calls.append(1)
            if len(calls) > 5:
                raise RuntimeError("device lost")
            return step()

        engine.step = step_then_fail
        return engine

    client = started(failing)
    sub = client.submit([(None, PROMPTS[0])], LONG)
    with pytest.raises(EngineDeadError, match="device lost"):
        collect(sub)
    wait_until(lambda: not client.alive)
    with pytest.raises(EngineDeadError):
        client.submit([(None, PROMPTS[0])], LONG)


def test_a_failing_engine_build_is_raised_by_start():
    def broken():
        raise FileNotFoundError("no checkpoint here")

    client = EngineClient(broken)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        client.start()
    assert not client.alive


def test_queues_are_per_submission(started):
    client = started()
    a = client.submit([(None, PROMPTS[0])], SamplingParams(max_tokens=3))
    b = client.submit([(None, PROMPTS[1])], SamplingParams(max_tokens=3))
    outs_a, outs_b = collect(a), collect(b)
    assert a.finished and b.finished
    assert set(outs_a) == set(a.request_ids) and set(outs_b) == set(b.request_ids)
    with pytest.raises(queue.Empty):
        a.outputs.get_nowait()
