"""Clients that go away and bursts beyond capacity, over real HTTP: nothing leaks, nothing hangs."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from server_utils import (HOT, MAX_MODEL_LEN, MAX_NUM_SEQS, MAX_QUEUED, MODEL, is_idle,
                          read_until, read_until_some, shared_server)

ABORTED = 'jaxpage:request_success_total{finished_reason="abort"}'
LONG = {"model": MODEL, "prompt": "Go on and on", "max_tokens": MAX_MODEL_LEN - 20,
        "ignore_eos": True, "temperature": HOT}


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture
def idle_server(server):
    """The server, checked idle (nothing running, every page free) before and after a test."""
    assert is_idle(server.wait_idle())
    yield server
    assert is_idle(server.wait_idle())


def wait_for_metrics(server, condition, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while not condition(m := server.metrics()):
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    return m


def close_all(socks) -> None:
    for s in socks:
        s.close()


def test_twenty_streaming_clients_that_drop_mid_stream_free_every_page(idle_server):
    server = idle_server
    before = server.metrics()[ABORTED]
    socks = [server.open_request("/v1/completions", LONG | {"stream": True, "seed": i})
             for i in range(20)]
    try:
        # MAX_NUM_SEQS of them get tokens (mid-stream now); the others wait for a batch slot
        read_until_some(socks, b'"text"', MAX_NUM_SEQS)
        wait_for_metrics(server, lambda m: (m["jaxpage:num_requests_running"],
                                            m["jaxpage:num_requests_waiting"])
                         == (MAX_NUM_SEQS, 20 - MAX_NUM_SEQS))
    finally:
        close_all(socks)
    m = server.wait_idle(timeout=30)
    assert is_idle(m), m
    assert m[ABORTED] - before == 20
    assert server.client().completions.create(model=MODEL, prompt="Still there?",
                                              max_tokens=3).usage.completion_tokens == 3


def test_a_client_that_drops_a_non_streamed_request_aborts_it(idle_server):
    server = idle_server
    before = server.metrics()[ABORTED]
    sock = server.open_request("/v1/completions", LONG)
    wait_for_metrics(server, lambda m: m["jaxpage:num_requests_running"] == 1)
    sock.close()
    m = server.wait_idle(timeout=30)
    assert is_idle(m) and m[ABORTED] - before == 1


def test_a_queued_stream_gets_keep_alive_comments_until_its_turn(idle_server):
    server = idle_server
    fillers = [server.open_request("/v1/completions", LONG | {"stream": True})
               for _ in range(MAX_NUM_SEQS)]
    try:
        read_until_some(fillers, b'"text"', MAX_NUM_SEQS)
        queued = server.open_request("/v1/completions", LONG | {"stream": True, "max_tokens": 2})
        fillers.append(queued)
        head = read_until(queued, b": keep-alive\n\n")
        assert b"data:" not in head  # nothing but comments while it waits
        assert head.split(b"\r\n\r\n", 1)[0].startswith(b"HTTP/1.1 200")
        for s in fillers[:MAX_NUM_SEQS]:
            s.close()  # the queued request gets its turn, runs and ends the stream
        assert read_until(queued, b"data: [DONE]\n\n").count(b'"finish_reason":"length"') == 1
    finally:
        close_all(fillers)


def test_a_burst_far_above_capacity_gets_503s_and_the_admitted_requests_all_finish(idle_server):
    server = idle_server
    capacity = MAX_NUM_SEQS + MAX_QUEUED
    body = {"model": MODEL, "prompt": "Burst", "max_tokens": 64, "ignore_eos": True,
            "temperature": HOT}
    peak, sampling = [0.0], threading.Event()

    def watch():  # requests in the engine never exceed its bound
        while not sampling.is_set():
            m = server.metrics()
            peak[0] = max(peak[0], m["jaxpage:num_requests_running"]
                          + m["jaxpage:num_requests_waiting"])
            time.sleep(0.02)

    def burst(n=4 * capacity):
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda _: requests.post(
                server.url + "/v1/completions", json=body, timeout=120), range(n)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        first = burst()
        rss_after_first = server.metrics()["process_resident_memory_bytes"]
        second = burst()
    finally:
        sampling.set()
        watcher.join()
    rss_after_second = server.metrics()["process_resident_memory_bytes"]
    for responses in (first, second):
        ok = [r for r in responses if r.status_code == 200]
        full = [r for r in responses if r.status_code == 503]
        assert len(ok) + len(full) == len(responses)
        assert len(ok) >= capacity and len(full) >= capacity
        for r in full:
            assert r.headers["Retry-After"] == "1"
            assert r.json()["error"]["code"] == "server_overloaded"
        for r in ok:
            assert r.json()["choices"][0]["finish_reason"] == "length"
            assert r.json()["usage"]["completion_tokens"] == 64
    assert 0 < peak[0] <= capacity
    assert rss_after_second - rss_after_first < 64 << 20
