"""The OpenAI-compatible API over real HTTP: `jaxpage serve` (demo model) and the openai client."""

from __future__ import annotations

import json
import re
import time

import pytest
from server_utils import HOT, MODEL, shared_server, sse_data, sse_events

from jaxpage.demo import demo_checkpoint_dir
from jaxpage.tokenizer import Tokenizer, apply_chat_template

USER = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def tok(server) -> Tokenizer:
    return Tokenizer(demo_checkpoint_dir() / "tokenizer.model")  # built by the server


def test_completion_returns_text_finish_reason_and_usage(client, tok):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=7,
                                  temperature=HOT, seed=1)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL
    (choice,) = r.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert r.usage.prompt_tokens == len(tok.encode("Once upon a time"))
    assert (r.usage.completion_tokens, r.usage.total_tokens) == (7, r.usage.prompt_tokens + 7)


def test_chat_prompt_is_the_gemma_template_and_generates_what_completions_would(client, tok):
    messages = [{"role": "system", "content": "Be brief."}, *USER]
    ids = apply_chat_template(messages, "gemma3", tok)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                       temperature=HOT, seed=5)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids)
    same = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=HOT,
                                     seed=5)
    # chat stops at <end_of_turn>; completions go on: the chat text is a prefix
    assert same.choices[0].text.startswith(r.choices[0].message.content)
    if r.choices[0].finish_reason == "length":
        assert same.choices[0].text == r.choices[0].message.content


def test_streamed_completion_with_usage_matches_the_whole_response(client):
    kwargs = dict(model=MODEL, prompt="The sea", max_tokens=9, temperature=HOT, seed=7)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            **kwargs))
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("cmpl-")
    assert {c.object for c in chunks} == {"text_completion"}
    *content, usage = chunks
    assert usage.choices == [] and usage.usage.completion_tokens == 9
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens
    assert [c.usage for c in content] == [None] * len(content)
    assert "".join(c.choices[0].text for c in content) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in content] == [None] * (len(content) - 1) + [
        "length"]


def test_streamed_chat_opens_with_the_role_and_ends_with_finish_reason(client):
    kwargs = dict(model=MODEL, messages=USER, max_tokens=5, temperature=HOT, seed=9)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == (
        whole.choices[0].message.content)
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_n_2_gives_two_choices_and_counts_both_in_usage(client):
    r = client.completions.create(model=MODEL, prompt="Hi", n=2, max_tokens=6,
                                  temperature=HOT, seed=4)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.choices[0].text != r.choices[1].text  # independent samples
    assert r.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, n=2, max_tokens=4,
                                                 temperature=HOT, seed=4, stream=True))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert [c.finish_reason is not None for c in mine] == [False] * (len(mine) - 1) + [True]


def test_a_stop_string_ends_the_text_right_before_it(client):
    kwargs = dict(model=MODEL, prompt="A", max_tokens=24, temperature=HOT, seed=11)
    text = client.completions.create(**kwargs).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    r = client.completions.create(stop=[stop, "never appears"], **kwargs)
    assert r.choices[0].text == text[:text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    r = client.completions.create(stop=stop, extra_body={"include_stop_str_in_output": True},
                                  **kwargs)
    assert r.choices[0].text == text[:text.index(stop) + len(stop)]


def test_the_same_seed_gives_the_same_text_and_other_seeds_other_text(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt="Seeds", max_tokens=10,
                                         temperature=HOT, seed=seed).choices[0].text

    assert sample(123) == sample(123)
    assert len({sample(123), sample(124), sample(125)}) == 3


def test_a_batch_of_prompts_answers_each_as_if_alone(client):
    prompts = ["First prompt", "Second one"]
    r = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=5,
                                  temperature=HOT, seed=21)
    assert [c.index for c in sorted(r.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    alone = client.completions.create(model=MODEL, prompt=prompts[1], n=2, max_tokens=5,
                                      temperature=HOT, seed=21)
    by_index = {c.index: c.text for c in r.choices}
    assert [by_index[2], by_index[3]] == [c.text for c in sorted(alone.choices,
                                                                  key=lambda c: c.index)]


def test_token_id_prompts_equal_their_text_prompts(client, tok):
    kwargs = dict(model=MODEL, max_tokens=5, temperature=HOT, seed=8)
    text = client.completions.create(prompt="Token ids", **kwargs)
    ids = client.completions.create(prompt=tok.encode("Token ids"), **kwargs)
    nested = client.completions.create(prompt=[tok.encode("Token ids")], **kwargs)
    assert text.choices[0].text == ids.choices[0].text == nested.choices[0].text


def test_completion_logprobs_and_echo(client):
    r = client.completions.create(model=MODEL, prompt="Log", max_tokens=4, logprobs=2,
                                  temperature=HOT, seed=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(lp_ <= 0 for lp_ in lp.token_logprobs)
    assert all(2 <= len(top) <= 3 for top in lp.top_logprobs)  # top 2, plus the chosen
    assert [b - a for a, b in zip(lp.text_offset, lp.text_offset[1:])] == [
        len(t) for t in lp.tokens[:-1]]
    echo = client.completions.create(model=MODEL, prompt="Log", max_tokens=4, echo=True,
                                     temperature=HOT, seed=2)
    assert echo.choices[0].text == "Log" + r.choices[0].text


def test_chat_logprobs_list_each_token_with_top_alternatives(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4,
                                       temperature=HOT, seed=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and all(0 <= b < 256 for b in item.bytes)
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)


def test_models_health_and_metrics(server, client):
    (card,) = client.models.list().data
    assert card.id == MODEL and card.object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    assert server.get("/health").status_code == 200
    m = server.metrics()
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "prompt_tokens_total", "generation_tokens_total", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "time_to_first_token_seconds_count",
                 "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count",
                 'request_success_total{finished_reason="length"}'):
        assert "jaxpage:" + name in m
    assert m["jaxpage:generation_tokens_total"] > 0
    assert m["jaxpage:time_to_first_token_seconds_count"] > 0


def test_unknown_fields_are_ignored_with_a_log_line(server):
    r = server.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2,
                                        "frobnicate_level": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert "ignoring unknown fields 'frobnicate_level'" in server.log()


def test_raw_sse_framing_ends_with_done(server):
    body = {"model": MODEL, "prompt": "Raw", "max_tokens": 5, "stream": True, "n": 2,
            "stream_options": {"include_usage": True}}
    with server.post("/v1/completions", body, stream=True) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = r.content.decode()
    assert raw.endswith("\n\ndata: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith(("data: ", ":")) and "\n" not in e for e in events)
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1
    payloads = [json.loads(e[6:]) for e in events[:-1] if e.startswith("data: ")]
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 10
    assert all(len(p["choices"]) == 1 for p in payloads[:-1])


def test_raw_chat_stream_opens_with_the_role_and_ends_with_done(server):
    body = {"model": MODEL, "messages": USER, "max_tokens": 3, "stream": True}
    with server.post("/v1/chat/completions", body, stream=True) as r:
        events = sse_events(r)
    assert events[-1] == "data: [DONE]"
    data = sse_data(events)
    assert data[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert data[-1]["choices"][0]["finish_reason"] is not None


def test_a_stats_line_is_logged_while_there_is_work(server, client):
    client.completions.create(model=MODEL, prompt="Busy", max_tokens=30,
                              extra_body={"ignore_eos": True})
    deadline = time.monotonic() + 10
    while not re.search(r"running: \d+ seqs, waiting: \d+ seqs, KV cache use: global [\d.]+%.*"
                        r"generation: [\d.]+ tok/s", server.log()):
        assert time.monotonic() < deadline, server.log()[-2000:]
        time.sleep(0.2)
