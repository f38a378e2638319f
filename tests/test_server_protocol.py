"""OpenAI request parsing and response building, without a server (the demo tokenizer)."""

from __future__ import annotations

import math

import pytest

from jaxpage.demo import build_demo_tokenizer
from jaxpage.openai_protocol import (LOGPROB_FLOOR, APIError, ResponseBuilder, parse_chat_request,
                                     parse_completion_request, parse_json_body)
from jaxpage.outputs import CompletionOutput, RequestOutput
from jaxpage.tokenizer import Tokenizer, apply_chat_template

VOCAB = 1024


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer(build_demo_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


def completion(tok, **body):
    return parse_completion_request(body, tok, VOCAB)


def chat(tok, family="gemma3", **body):
    return parse_chat_request(body, tok, VOCAB, family)


def api_error(fn, *args, **kwargs) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args, **kwargs)
    return info.value


# -- bodies -----------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [b"{", b"[1, 2]", b'"text"', b"\xff\xfe", b"NaN",
                                  b'{"temperature": NaN}', b"[" * 100_000])
def test_a_body_that_is_not_a_json_object_is_a_400(data):
    e = api_error(parse_json_body, data)
    assert e.status == 400 and e.body()["error"]["type"] == "invalid_request_error"


def test_every_prompt_form_becomes_token_id_prompts(tok):
    assert completion(tok, prompt="Hello").prompts == [("Hello", tok.encode("Hello"))]
    assert completion(tok, prompt=["a", "b c"]).prompts == [("a", tok.encode("a")),
                                                            ("b c", tok.encode("b c"))]
    assert completion(tok, prompt=[5, 6, 7]).prompts == [(None, [5, 6, 7])]
    assert completion(tok, prompt=[[5], [6, 7]]).prompts == [(None, [5]), (None, [6, 7])]


@pytest.mark.parametrize("prompt", [None, [], 3, {"a": 1}, ["a", 3], [[1], "a"], [True],
                                    [[1.5]], "\ud800"])
def test_a_malformed_prompt_is_a_400_naming_prompt(tok, prompt):
    e = api_error(completion, tok, prompt=prompt)
    assert (e.status, e.param) == (400, "prompt")


@pytest.mark.parametrize("field,value", [
    ("temperature", "hot"), ("temperature", True), ("top_p", [1]), ("n", 1.5), ("n", "2"),
    ("max_tokens", 2.0), ("seed", "1"), ("stream", 1), ("echo", "yes"), ("logprobs", True),
    ("top_k", 0.5), ("min_tokens", "1"), ("ignore_eos", 0), ("stream_options", "x"),
    ("stop_token_ids", 3), ("model", 7), ("presence_penalty", "x")])
def test_a_field_of_the_wrong_type_is_a_400_naming_it(tok, field, value):
    e = api_error(completion, tok, prompt="x", **{field: value})
    assert (e.status, e.param) == (400, field)
    assert field in e.message


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 2.0), ("top_k", -2),
    ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0),
    ("max_tokens", 0), ("min_tokens", 100), ("logprobs", 21), ("n", 0), ("n", 129),
    ("temperature", 1e400), ("seed", 2**64), ("stop", ""), ("stop", ["x"] * 17),
    ("stop", ["x" * 201]), ("stop_token_ids", [VOCAB]), ("stop_token_ids", [-1]),
    ("best_of", 3), ("logit_bias", {"5": 1}), ("suffix", "x")])
def test_an_out_of_range_or_unsupported_value_is_a_400_naming_the_field(tok, field, value):
    e = api_error(completion, tok, prompt="x", **{field: value})
    assert (e.status, e.param) == (400, field)
    assert "SamplingParams" not in e.message


def test_sampling_fields_reach_sampling_params(tok):
    p = completion(tok, prompt="x", n=3, temperature=0.5, top_p=0.9, top_k=7, min_p=0.1,
                   presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2,
                   max_tokens=9, min_tokens=2, stop=["a", "b"], seed=11, logprobs=3,
                   stop_token_ids=[9, 9, 8], ignore_eos=True).params
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (3, 0.5, 0.9, 7, 0.1)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)
    assert (p.max_tokens, p.min_tokens, p.stop, p.seed, p.logprobs) == (9, 2, ["a", "b"], 11, 3)
    assert p.stop_token_ids == [9, 8] and p.ignore_eos


def test_defaults_follow_openai(tok):
    p = completion(tok, prompt="x").params
    assert (p.n, p.temperature, p.top_p, p.max_tokens, p.logprobs) == (1, 1.0, 1.0, 16, None)
    assert chat(tok, messages=[{"role": "user", "content": "x"}]).params.max_tokens is None


def test_top_k_of_the_whole_vocabulary_or_more_means_off(tok):
    assert completion(tok, prompt="x", top_k=VOCAB + 5).params.top_k == 0


def test_unknown_fields_are_ignored_with_a_log_line(tok, caplog):
    with caplog.at_level("INFO", logger="jaxpage.openai_protocol"):
        req = completion(tok, prompt="x", frobnicate=1, another={"a": 1})
    assert req.params.max_tokens == 16
    assert "'another', 'frobnicate'" in caplog.text


def test_stream_options_need_stream(tok):
    assert api_error(completion, tok, prompt="x", stream_options={"include_usage": True}
                     ).param == "stream_options"
    req = completion(tok, prompt="x", stream=True, stream_options={"include_usage": True})
    assert req.stream and req.include_usage


def test_echo_with_logprobs_is_refused_clearly(tok):
    e = api_error(completion, tok, prompt="x", echo=True, logprobs=1)
    assert e.param == "echo" and "not supported" in e.message


# -- chat -------------------------------------------------------------------------------------

def test_chat_prompt_is_the_gemma_template_and_end_of_turn_stops(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    req = chat(tok, messages=messages)
    assert req.prompts[0][1] == apply_chat_template(messages, "gemma3", tok)
    assert req.prompts[0][0] == ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                                 "<start_of_turn>model\n")
    assert req.prompts[0][1].count(tok.bos_id) == 1
    assert tok.end_of_turn_id in req.params.stop_token_ids


@pytest.mark.parametrize("messages,why", [
    (None, "required"), ([], "empty"), ("hi", "must be"),
    ([{"role": "assistant", "content": "x"}], "alternate"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "text parts")])
def test_malformed_messages_are_a_400_naming_messages(tok, messages, why):
    e = api_error(chat, tok, messages=messages)
    assert (e.status, e.param) == (400, "messages") and why in e.message


def test_gemma2_rejects_a_system_message_clearly(tok):
    e = api_error(chat, tok, family="gemma2", messages=[{"role": "system", "content": "s"},
                                                        {"role": "user", "content": "u"}])
    assert e.param == "messages" and "system" in e.message


def test_chat_token_limits_and_logprob_fields(tok):
    msgs = [{"role": "user", "content": "x"}]
    assert chat(tok, messages=msgs, max_tokens=5, max_completion_tokens=3).params.max_tokens == 3
    req = chat(tok, messages=msgs, logprobs=True, top_logprobs=4)
    assert (req.logprobs, req.top_logprobs, req.params.logprobs) == (True, 4, 4)
    assert chat(tok, messages=msgs, logprobs=True).params.logprobs == 0
    assert api_error(chat, tok, messages=msgs, top_logprobs=2).param == "top_logprobs"
    e = api_error(chat, tok, messages=msgs, logprobs=True, top_logprobs=25)
    assert e.param == "top_logprobs" and e.message.startswith("top_logprobs")


@pytest.mark.parametrize("field,value", [("tools", [{"type": "function"}]),
                                         ("tool_choice", "auto"),
                                         ("response_format", {"type": "json_object"})])
def test_unsupported_chat_features_are_refused_clearly(tok, field, value):
    e = api_error(chat, tok, messages=[{"role": "user", "content": "x"}], **{field: value})
    assert (e.status, e.param) == (400, field)


# -- responses ----------------------------------------------------------------------------------

def delta(rid, *choices, finished=False, prompt_ids=(2, 5)):
    """A DELTA RequestOutput; choices are (index, text, token_ids, logprobs, finish_reason)."""
    outs = [CompletionOutput(index=i, text=t, token_ids=list(ids), logprobs=lps,
                             finish_reason=fr) for i, t, ids, lps, fr in choices]
    return RequestOutput(rid, None, list(prompt_ids), outs, finished=finished)


def test_stream_chunks_report_each_finish_once_on_the_choice_last_chunk(tok):
    req = completion(tok, prompt=["a", "b"], n=2, stream=True,
                     stream_options={"include_usage": True})
    b = ResponseBuilder(req, "m", tok, ["r0", "r1"])
    chunks = b.update(delta("r0", (0, "x", [7], None, None), (1, "y", [8], None, "length")))
    chunks += b.update(delta("r1", (0, "p", [9], None, "stop"), (1, "q", [10], None, "stop"),
                             finished=True))
    # sample 1 of prompt 0 finished earlier: DELTA outputs repeat it with nothing new
    chunks += b.update(delta("r0", (0, "z", [11, 12], None, "length"),
                             (1, "", [], None, "length"), finished=True))
    assert {c["id"] for c in chunks} == {b.id} and {c["object"] for c in chunks} == {
        "text_completion"}
    by_index = {}
    for c in chunks:
        (choice,) = c["choices"]
        by_index.setdefault(choice["index"], []).append(choice)
        assert c["usage"] is None
    assert sorted(by_index) == [0, 1, 2, 3]  # prompt-major: index = prompt * n + sample
    for choices in by_index.values():
        assert [c["finish_reason"] is not None for c in choices] == [False] * (
            len(choices) - 1) + [True]
    assert "".join(c["text"] for c in by_index[0]) == "xz"
    usage = b.usage_chunk()
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
    final = b.response()
    assert [c["text"] for c in final["choices"]] == ["xz", "y", "p", "q"]
    assert [c["finish_reason"] for c in final["choices"]] == ["length", "length", "stop", "stop"]


def test_chat_stream_opens_each_choice_with_the_assistant_role(tok):
    req = chat(tok, messages=[{"role": "user", "content": "x"}], n=2, stream=True)
    b = ResponseBuilder(req, "m", tok, ["r0"])
    start = b.start_chunks()
    assert [c["choices"][0]["delta"] for c in start] == [{"role": "assistant", "content": ""}] * 2
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in start)
    chunks = b.update(delta("r0", (0, "hi", [7], None, "stop"), (1, "", [8], None, "stop"),
                            finished=True))
    assert [c["choices"][0]["delta"] for c in chunks] == [{"content": "hi"}, {}]
    assert b.response()["choices"][0]["message"] == {"role": "assistant", "content": "hi"}


def test_echo_prepends_the_prompt_text(tok):
    ids = tok.encode("Hello")
    b = ResponseBuilder(completion(tok, prompt=[ids], echo=True), "m", tok, ["r0"])
    assert b.start_chunks()[0]["choices"][0]["text"] == "Hello"
    b.update(delta("r0", (0, " you", [7], None, "length"), finished=True))
    assert b.response()["choices"][0]["text"] == "Hello you"


def test_completion_logprobs_list_tokens_top_alternatives_and_text_offsets(tok):
    a, bb = tok.encode("ab", add_bos=False)[0], tok.encode(" the", add_bos=False)[0]
    byte = next(i for i in range(VOCAB) if tok.byte_value(i) == 0xE2)
    b = ResponseBuilder(completion(tok, prompt="x", logprobs=1), "m", tok, ["r0"])
    b.update(delta("r0", (0, "..", [a, byte], [{a: -0.5, bb: -1.0}, {byte: -math.inf}], None)))
    b.update(delta("r0", (0, ".", [bb], [{bb: -0.1}], "length"), finished=True))
    lp = b.response()["choices"][0]["logprobs"]
    a_text, b_text = tok.id_to_piece(a), tok.id_to_piece(bb).replace("\u2581", " ")
    assert lp["tokens"] == [a_text, "bytes:\\xe2", b_text]
    assert lp["token_logprobs"] == [-0.5, LOGPROB_FLOOR, -0.1]
    assert lp["top_logprobs"][0] == {a_text: -0.5, b_text: -1.0}
    assert lp["text_offset"] == [0, len(a_text), len(a_text) + len("bytes:\\xe2")]


def test_a_byte_piece_that_is_a_whole_character_is_listed_as_that_character(tok):
    dot, lead = (next(i for i in range(VOCAB) if tok.byte_value(i) == b) for b in (0x2E, 0xE2))
    for req in (completion(tok, prompt="x", logprobs=0),
                chat(tok, messages=[{"role": "user", "content": "x"}], logprobs=True)):
        b = ResponseBuilder(req, "m", tok, ["r0"])
        b.update(delta("r0", (0, ".", [dot, lead], [{dot: -0.1}, {lead: -0.2}], "length"),
                       finished=True))
        lp = b.response()["choices"][0]["logprobs"]
        tokens = lp["tokens"] if "tokens" in lp else [i["token"] for i in lp["content"]]
        assert tokens == [".", "bytes:\\xe2"]
        if "content" in lp:
            assert [i["bytes"] for i in lp["content"]] == [[0x2E], [0xE2]]


def test_chat_logprobs_carry_bytes_and_exactly_top_logprobs_alternatives(tok):
    a, bb, c = (tok.encode(s, add_bos=False)[0] for s in ("ab", " the", "x"))
    req = chat(tok, messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=1)
    b = ResponseBuilder(req, "m", tok, ["r0"])
    # the chosen token c is not among the top 1: the engine adds it to the entry
    chunks = b.update(delta("r0", (0, "x", [c], [{a: -0.2, bb: -0.9, c: -3.0}], "stop"),
                            finished=True))
    (item,) = chunks[0]["choices"][0]["logprobs"]["content"]
    c_text = tok.id_to_piece(c)
    assert (item["token"], item["logprob"], item["bytes"]) == (c_text, -3.0,
                                                               list(c_text.encode()))
    assert [t["logprob"] for t in item["top_logprobs"]] == [-0.2]
    assert b.response()["choices"][0]["logprobs"]["content"] == [item]
