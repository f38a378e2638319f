"""Bad input over real HTTP: every answer is a JSON error of the OpenAI shape, never a 5xx."""

from __future__ import annotations

import json

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_utils import MAX_MODEL_LEN, MODEL, is_idle, shared_server, sse_events

ROUTES = ("/v1/completions", "/v1/chat/completions")
USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def server():
    return shared_server()


def body_for(route: str, **fields) -> dict:
    base = {"model": MODEL, "max_tokens": 2}
    base |= {"prompt": "Hello"} if route == ROUTES[0] else {"messages": USER}
    return base | fields


def assert_error(r, status: int, param: str | None = None, contains: str = "") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    assert contains in error["message"]
    return error


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("data", [b"{not json", b"", b"[1, 2]", b'"a string"', b"\x80\x81",
                                  b'{"prompt": NaN}'])
def test_malformed_json_is_a_400(server, route, data):
    assert_error(server.post(route, data=data), 400, contains="JSON")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("field,value", [
    ("temperature", "warm"), ("n", 1.5), ("max_tokens", "8"), ("stream", "yes"), ("seed", 0.5),
    ("stop", 5), ("top_p", [0.5]), ("model", 3), ("stream_options", [1])])
def test_a_wrong_type_is_a_400_naming_the_field(server, route, field, value):
    assert_error(server.post(route, body_for(route, **{field: value})), 400, field, field)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("field,value", [
    ("temperature", -1), ("top_p", 0), ("top_k", -5), ("min_p", 1.5), ("presence_penalty", 9),
    ("frequency_penalty", -9), ("repetition_penalty", -1), ("max_tokens", 0), ("n", 0),
    ("min_tokens", 5), ("stop", [""])])
def test_an_out_of_range_sampling_value_is_a_400_naming_the_field(server, route, field, value):
    assert_error(server.post(route, body_for(route, **{field: value})), 400, field, field)


def test_a_prompt_longer_than_the_context_gets_the_context_length_message(server):
    r = server.post(ROUTES[0], {"model": MODEL, "prompt": [5] * (MAX_MODEL_LEN + 10)})
    assert_error(r, 400, "prompt", f"This model's maximum context length is {MAX_MODEL_LEN} "
                                   f"tokens. However, your request has {MAX_MODEL_LEN + 10} "
                                   "input tokens.")
    r = server.post(ROUTES[0], {"model": MODEL, "prompt": [5] * 100,
                                "max_tokens": MAX_MODEL_LEN})
    assert_error(r, 400, "max_tokens", f"However, you requested {MAX_MODEL_LEN + 100} tokens "
                                       f"(100 in the input, {MAX_MODEL_LEN} in the completion)")


def test_a_streamed_request_that_cannot_be_served_is_a_400_before_streaming(server):
    body = {"model": MODEL, "prompt": [5] * (MAX_MODEL_LEN + 1), "stream": True}
    assert_error(server.post(ROUTES[0], body), 400, "prompt", "maximum context length")


def test_token_ids_outside_the_vocabulary_are_a_400(server):
    assert_error(server.post(ROUTES[0], {"prompt": [5, 10**6], "max_tokens": 2}), 400,
                 "prompt", "vocabulary")


def test_bad_chat_messages_are_a_400(server):
    for messages in ([], [{"role": "assistant", "content": "x"}], [{"role": "user"}], "hi"):
        assert_error(server.post(ROUTES[1], body_for(ROUTES[1], messages=messages)), 400,
                     "messages")


@pytest.mark.parametrize("route", ROUTES)
def test_an_unknown_model_is_a_404(server, route):
    error = assert_error(server.post(route, body_for(route, model="gpt-9")), 404, "model",
                         "gpt-9")
    assert error["code"] == "model_not_found"
    assert_error(server.get("/v1/models/gpt-9"), 404, "model")


def test_unknown_routes_and_methods_get_json_errors(server):
    assert_error(server.get("/v1/nothing-here"), 404)
    assert_error(server.get("/v1/completions"), 405)


def test_the_openai_client_sees_bad_request_and_not_found(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", temperature=-3)
    assert info.value.status_code == 400 and "temperature" in str(info.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=USER)


# -- fuzz ---------------------------------------------------------------------------------------

JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.integers(), st.floats(),
                 st.text(max_size=8), st.lists(st.integers(-2, 1100), max_size=4),
                 st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
SHORT_TEXT = st.text(min_size=1, max_size=3)
PROMPT = st.one_of(st.text(max_size=30), st.lists(st.text(max_size=10), min_size=1, max_size=2),
                   st.lists(st.integers(0, 1023), min_size=1, max_size=12),
                   st.lists(st.lists(st.integers(0, 1023), min_size=1, max_size=6), min_size=1,
                            max_size=2))
MESSAGES = st.lists(st.text(max_size=20), min_size=1, max_size=3).map(
    lambda texts: [{"role": ("user", "assistant")[i % 2], "content": t}
                   for i, t in enumerate(texts)] + ([{"role": "user", "content": "go on"}]
                                                    if len(texts) % 2 == 0 else []))
# field -> values a client may well send; each is swapped for JUNK now and then
VALID = {
    "model": st.just(MODEL), "n": st.integers(1, 3), "temperature": st.floats(0, 3),
    "top_p": st.floats(0.05, 1), "top_k": st.integers(-1, 50), "min_p": st.floats(0, 0.5),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2), "min_tokens": st.integers(0, 2),
    "seed": st.integers(0, 2**40), "logprobs": st.one_of(st.integers(0, 5), st.booleans()),
    "top_logprobs": st.integers(0, 5), "echo": st.booleans(),
    "stop": st.one_of(SHORT_TEXT, st.lists(SHORT_TEXT, max_size=3)),
    "stop_token_ids": st.lists(st.integers(0, 1023), max_size=3),
    "ignore_eos": st.booleans(), "logit_bias": st.just({}), "user": st.text(max_size=5),
    "max_completion_tokens": st.integers(1, 3),
}


@st.composite
def request_bodies(draw):
    """(route, body): mostly sensible fields, some junk, sometimes unknown or missing ones."""
    def value(strategy):
        return draw(JUNK) if draw(st.integers(0, 9)) == 0 else draw(strategy)

    route = draw(st.sampled_from(ROUTES))
    body = {"max_tokens": draw(st.integers(1, 4))}
    if draw(st.integers(0, 9)) == 0:  # never null: a chat would run to the end of the context
        body["max_tokens"] = draw(JUNK.filter(lambda v: v is not None))
    if draw(st.integers(0, 19)):  # now and then, no prompt at all
        body |= ({"prompt": value(PROMPT)} if route == ROUTES[0]
                 else {"messages": value(MESSAGES)})
    if draw(st.booleans()):
        body["stream"] = value(st.just(True))
        if draw(st.booleans()):
            body["stream_options"] = value(st.fixed_dictionaries(
                {"include_usage": st.booleans()}))
    for key, strategy in VALID.items():
        if draw(st.integers(0, 3)) == 0:
            body[key] = value(strategy)
    if draw(st.integers(0, 4)) == 0:
        body[draw(st.text(min_size=1, max_size=6))] = draw(JUNK)
    return route, body


def check_answer(server, route: str, body) -> None:
    """A JSON error of the OpenAI shape, or a well-formed completion / stream."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = server.post(route, data=data, stream=True, timeout=60)
    assert r.status_code in (200, 400, 404), r.content[:500]
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    elif r.headers["Content-Type"].startswith("text/event-stream"):
        events = sse_events(r)
        assert events[-1] == "data: [DONE]"
        assert not any("error" in json.loads(e[6:]) for e in events[:-1]
                       if e.startswith("data: "))
    else:
        answer = r.json()
        assert answer["object"] in ("text_completion", "chat.completion")
        assert answer["choices"] and all(c["finish_reason"] in ("stop", "length")
                                         for c in answer["choices"])


def test_fuzzed_bodies_get_an_answer_or_a_json_error_never_a_5xx_and_the_server_stays_well(
        server):
    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(request=request_bodies())
    def fuzz_bodies(request):
        check_answer(server, *request)

    @settings(max_examples=25, deadline=None, derandomize=True)
    @given(data=st.binary(max_size=64), route=st.sampled_from(ROUTES))
    def fuzz_bytes(data, route):
        check_answer(server, route, data)

    fuzz_bodies()
    fuzz_bytes()
    assert server.get("/health").status_code == 200
    assert is_idle(server.wait_idle())
    assert "Traceback" not in server.log()
