"""Tokenizer, streaming detokenizer, stop strings and the Gemma chat template."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import jaxpage.tokenizer as tokmod
from jaxpage.demo import build_demo_tokenizer
from jaxpage.tokenizer import (
    ChatPrompt, IncrementalDetokenizer, StopChecker, Tokenizer, apply_chat_template, find_stop,
    render_chat_template, truncate_at_stop)

SETTINGS = settings(max_examples=60, deadline=None)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    """The demo tokenizer: Gemma-like (no dummy-prefix space, byte fallback, Gemma special ids)."""
    return Tokenizer(build_demo_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


@pytest.fixture(scope="module")
def llama_style_tok(tmp_path_factory) -> Tokenizer:
    """Same corpus, but SentencePiece adds a dummy-prefix space (as Llama's tokenizer does): a
    piece "▁river" decodes to "river" at the start of a text and to " river" after other text."""
    path = tmp_path_factory.mktemp("tok") / "dummy_prefix.model"
    return Tokenizer(build_demo_tokenizer(path, add_dummy_prefix=True, vocab_size=800))


def byte_ids(tok: Tokenizer, data: bytes) -> list[int]:
    return [tok.piece_to_id(f"<0x{b:02X}>") for b in data]


# Any id of the demo vocabulary, with extra weight on bytes that start or continue a character.
UTF8_BYTES = bytes([0xC2, 0xC3, 0xE2, 0xF0, 0x80, 0x82, 0x98, 0x9F, 0xA9, 0xAC])
any_id = st.one_of(st.integers(0, 1023), st.sampled_from(UTF8_BYTES).map(lambda b: 6 + b))


def stream(detok: IncrementalDetokenizer, ids) -> list[str]:
    return [detok.step(i) for i in ids] + [detok.flush()]


# -- Tokenizer ------------------------------------------------------------------------------------

def test_tokenizer_exposes_gemma_special_ids(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.id_to_piece(tok.start_of_turn_id) == "<start_of_turn>"
    assert tok.id_to_piece(tok.end_of_turn_id) == "<end_of_turn>"
    assert tok.stop_ids == (tok.eos_id, tok.end_of_turn_id)
    assert tok.special_ids == {0, 1, 2, 3, tok.start_of_turn_id, tok.end_of_turn_id}
    assert tok.vocab_size == 1024
    assert all(tok.byte_value(6 + b) == b for b in range(256))  # bytes follow the 6 special pieces
    assert tok.byte_value(tok.bos_id) is None


def test_encode_puts_exactly_one_bos_first(tok):
    plain = tok.encode("Hello world", add_bos=False)
    assert tok.bos_id not in plain
    assert tok.encode("Hello world") == [tok.bos_id] + plain
    assert tok.encode("<bos>Hello world") == [tok.bos_id] + plain
    assert tok.encode("<bos>Hello world", add_bos=False) == [tok.bos_id] + plain
    assert tok.encode("") == [tok.bos_id]


def test_encode_turns_spelled_out_special_tokens_into_their_ids(tok):
    ids = tok.encode("a<eos>b<start_of_turn>", add_bos=False)
    assert ids == (tok.encode("a", add_bos=False) + [tok.eos_id] + tok.encode("b", add_bos=False)
                   + [tok.start_of_turn_id])


@pytest.mark.parametrize("text", [
    "Hello, world!", "  leading and  double spaces\tand tabs\n\nnewlines ",
    "€ 100 — naïve café, Ωmega ß", "日本語のテキスト, 中文, 한국어",
    "emoji 😀🦜🎉 and ZWJ 👩‍👩‍👧 and flags 🇫🇷",
    "combining e\u0301 and \u200b zero width", "digits 1234567890 and 3.14159",
])
def test_decode_of_encode_is_the_text(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == "<bos>" + text


@SETTINGS
@given(st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\u2581"),
               max_size=40))
def test_any_text_round_trips_through_byte_fallback(tok, text):
    # U+2581 is SentencePiece's own spelling of a space, so it reads back as " " (as in Gemma).
    ids = tok.encode(text, add_bos=False)
    assert tok.unk_id not in ids or "<unk>" in text
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_decode_skips_special_tokens_only_when_asked(tok):
    ids = [tok.bos_id, tok.start_of_turn_id] + tok.encode("hi", add_bos=False) + [
        tok.end_of_turn_id, tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "hi"
    shown = tok.decode(ids, skip_special_tokens=False)
    assert shown == "<bos><start_of_turn>hi<end_of_turn><eos><pad>"


def test_decode_keeps_spaces_around_special_tokens_with_dummy_prefix_tokenizers(llama_style_tok):
    t = llama_style_tok
    word = t.piece_to_id("\u2581river")
    assert t.decode([word]) == "river"  # SentencePiece drops the dummy space at the very start
    assert t.decode([word, t.eos_id, word], skip_special_tokens=False) == "river<eos> river"
    assert t.decode([t.bos_id, word], skip_special_tokens=False) == "<bos>river"


def test_bad_ids_and_missing_files_are_clear_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="token id 1024 is out of range"):
        tok.decode([5, 1024])
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="integers"):
        tok.decode(["a"])
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="not valid Unicode: surrogates not allowed at position 2"):
        tok.encode("ab\ud800")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.piece_to_id("<no such piece>")
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer(tmp_path / "missing.model")


# -- IncrementalDetokenizer -----------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(ids=st.lists(any_id, max_size=30), skip=st.booleans())
def test_streamed_deltas_concatenate_to_decode_of_all_ids(tok, ids, skip):
    deltas = stream(IncrementalDetokenizer(tok, skip_special_tokens=skip), ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


@settings(max_examples=150, deadline=None)
@given(prompt=st.lists(any_id, max_size=12), ids=st.lists(any_id, max_size=20), skip=st.booleans())
@example(prompt=[6 + 0xC2, 6 + 0xC2], ids=[6 + 0x80], skip=True)  # prompt ends in broken bytes
def test_prompt_context_does_not_change_the_generated_text(tok, prompt, ids, skip):
    # This tokenizer has no dummy-prefix space, so generated text is decode(generated ids) alone.
    deltas = stream(IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip), ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


def test_multi_byte_characters_are_held_until_complete(tok):
    detok = IncrementalDetokenizer(tok)
    assert [detok.step(i) for i in byte_ids(tok, "€".encode())] == ["", "", "€"]
    assert [detok.step(i) for i in byte_ids(tok, "🦜".encode())] == ["", "", "", "🦜"]


@pytest.mark.parametrize("text", ["Ωmega ∑ 🦜🧬 ÆØÅ ᚠᛇᚻ", "€😀 naïve", "ok 👩‍👩‍👧 ok"])
def test_no_delta_ever_holds_a_partial_character(tok, text):
    ids = tok.encode(text, add_bos=False)
    assert any(tok._sp.is_byte(i) for i in ids)  # the text really goes through byte pieces
    deltas = stream(IncrementalDetokenizer(tok), ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_an_invalid_byte_sequence_is_emitted_once_it_cannot_complete(tok):
    detok = IncrementalDetokenizer(tok)
    held = [detok.step(i) for i in byte_ids(tok, b"\xe2\x82")]
    assert held == ["", ""]
    assert detok.step(tok.piece_to_id("a")) == tok.decode(byte_ids(tok, b"\xe2\x82") + [
        tok.piece_to_id("a")])
    assert detok.step(byte_ids(tok, b"\xe2")[0]) == ""
    assert detok.flush() == "\ufffd"


def test_bytes_that_can_no_longer_complete_are_not_held(tok):
    detok = IncrementalDetokenizer(tok)
    lead = byte_ids(tok, b"\xe2")[0]
    assert [detok.step(lead) for _ in range(4)] == ["", "\ufffd", "\ufffd", "\ufffd"]
    assert detok.flush() == "\ufffd"


def test_first_token_keeps_its_leading_space_after_a_prompt(llama_style_tok):
    t = llama_style_tok
    river = t.piece_to_id("\u2581river")
    assert t.decode([river]) == "river"
    detok = IncrementalDetokenizer(t, t.encode("The long"))
    assert detok.step(river) == " river"
    detok = IncrementalDetokenizer(t, [t.bos_id])  # nothing before it: the start of the text
    assert detok.step(river) == "river"


def test_special_tokens_stream_only_when_not_skipped(tok):
    ids = tok.encode("Hi", add_bos=False) + [tok.end_of_turn_id, tok.eos_id]
    assert "".join(stream(IncrementalDetokenizer(tok), ids)) == "Hi"
    shown = stream(IncrementalDetokenizer(tok, skip_special_tokens=False), ids)
    assert "".join(shown) == "Hi<end_of_turn><eos>"


def test_each_step_decodes_only_a_short_window(tok, monkeypatch):
    ids = tok.encode("The river begins as a small spring high in the hills. " * 40, add_bos=False)
    detok = IncrementalDetokenizer(tok, ids[:20])
    expected = tok.decode(ids)
    sizes = []
    real = Tokenizer.decode
    monkeypatch.setattr(Tokenizer, "decode",
                        lambda self, x, **kw: sizes.append(len(x)) or real(self, x, **kw))
    text = "".join(detok.step(i) for i in ids)
    assert text == expected and len(ids) > 400
    assert max(sizes) <= tokmod.PROMPT_CONTEXT_TOKENS + 1
    # Long runs of skipped special tokens or of broken bytes do not widen the window either.
    sizes.clear()
    for i in [tok.pad_id] * 300 + byte_ids(tok, b"\xe2" * 300 + b"\x82" * 300):
        detok.step(i)
    assert max(sizes) <= 4


# -- stop strings ---------------------------------------------------------------------------------

def test_find_stop_returns_the_stop_that_appears_first():
    assert find_stop("say hello world", ["world", "hello"]) == tokmod.StopMatch("hello", 4, 9)
    assert find_stop("nothing here", ["stop"]) is None


def test_overlapping_stops_resolve_to_the_one_completed_first():
    # "bc" is complete before "abcd" is, whatever the order of the list.
    assert find_stop("xabcde", ["abcd", "bc"]).stop == "bc"
    # Both complete at the same character: the one starting earlier wins.
    assert find_stop("abc", ["c", "bc"]) == tokmod.StopMatch("bc", 1, 3)


def test_truncate_at_stop_excludes_or_includes_the_stop_string():
    assert truncate_at_stop("Hello. Bye. Later.", ["Bye", "."]) == ("Hello", ".")
    assert truncate_at_stop("one two three", ["two"]) == ("one ", "two")
    assert truncate_at_stop("one two three", ["two"], include_stop_str_in_output=True) == (
        "one two", "two")
    assert truncate_at_stop("one", ["two"]) == ("one", None)


def test_stop_split_across_deltas_is_found_and_cut():
    checker = StopChecker(["o wor"])
    shown = [checker.update(d) for d in ["Hell", "o", " w", "orld"]]
    assert shown == ["Hell", "", "", ""]
    assert checker.stop == "o wor" and checker.text == "Hell"
    assert checker.update("more") == "" and checker.finish() == ""


def test_held_tail_is_released_when_it_stops_matching_or_at_finish():
    checker = StopChecker(["STOP"])
    assert checker.update("go ST") == "go "
    assert checker.update("OP") == "" and checker.stop == "STOP"
    checker = StopChecker(["STOP"])
    assert checker.update("go ST") == "go "
    assert checker.update("ay") == "STay"
    assert checker.update(" S") == " "
    assert checker.finish() == "S" and checker.stop is None and checker.text == "go STay S"


def test_included_stop_string_is_shown_and_nothing_is_held():
    checker = StopChecker(["</s>"], include_stop_str_in_output=True)
    assert checker.update("a</") == "a</"
    assert checker.update("s>tail") == "s>"
    assert checker.stop == "</s>" and checker.text == "a</s>"


def test_stops_completed_while_stopping_is_not_allowed_are_ignored():
    checker = StopChecker(["x"])
    assert checker.update("ax", can_stop=False) == "ax"
    assert checker.update("bxc") == "b" and checker.stop == "x" and checker.text == "axb"


def test_empty_stop_strings_are_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopChecker(["ok", ""])
    with pytest.raises(ValueError, match="non-empty"):
        truncate_at_stop("text", [""])


@settings(max_examples=300, deadline=None)
@given(text=st.text("ab c", max_size=30), stops=st.lists(st.text("ab c", min_size=1, max_size=5),
       max_size=3), cuts=st.lists(st.integers(0, 30), max_size=10), include=st.booleans())
@example(text="aaaa", stops=["aaaa"], cuts=[2], include=False)  # a stop longer than the first delta
def test_streaming_any_chunking_gives_the_one_shot_result(text, stops, cuts, include):
    expected_text, expected_stop = truncate_at_stop(text, stops, include_stop_str_in_output=include)
    checker = StopChecker(stops, include_stop_str_in_output=include)
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    shown, received = "", ""
    for lo, hi in zip(bounds, bounds[1:]):
        shown += checker.update(text[lo:hi])
        received += text[lo:hi]
        # What was shown stays in the final output: never a stop-string prefix that completes.
        assert expected_text.startswith(shown)
        if checker.stopped:
            break
        longest = max(map(len, stops), default=1)
        assert len(received) - len(shown) < (1 if include else longest)
    shown += checker.finish()
    assert (shown, checker.stop) == (expected_text, expected_stop)
    assert checker.text == expected_text


def test_stop_search_looks_only_at_the_new_text_and_a_short_tail(monkeypatch):
    windows = []
    real = tokmod.find_stop
    monkeypatch.setattr(tokmod, "find_stop",
                        lambda text, *a: windows.append(len(text)) or real(text, *a))
    checker = StopChecker(["END", "STOP"])
    for _ in range(500):
        checker.update("some words ")
    assert checker.update("and STOP") == "and " and checker.stop == "STOP"
    assert max(windows) <= len("STOP") - 1 + len("some words ")


# -- chat template --------------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"}]
CHAT_TEXT = ("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
             "<start_of_turn>user\nHow are you?<end_of_turn>\n<start_of_turn>model\n")


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_chat_template_renders_gemma_turns_and_opens_a_model_turn(family):
    assert render_chat_template(CHAT, family) == ChatPrompt(CHAT_TEXT, add_bos=True)
    closed = render_chat_template(CHAT, family, add_generation_prompt=False).text
    assert closed == CHAT_TEXT.removesuffix("<start_of_turn>model\n")


def test_chat_template_strips_contents_and_joins_text_parts():
    messages = [{"role": "user", "content": [{"type": "text", "text": " Look: "},
                                             {"type": "text", "text": "here\n"}]},
                {"role": "assistant", "content": "\n Yes.  "}, {"role": "user", "content": "ok"}]
    assert render_chat_template(messages, "gemma3").text == (
        "<start_of_turn>user\nLook:here<end_of_turn>\n<start_of_turn>model\nYes.<end_of_turn>\n"
        "<start_of_turn>user\nok<end_of_turn>\n<start_of_turn>model\n")


def test_gemma3_folds_the_system_message_into_the_first_user_turn():
    messages = [{"role": "system", "content": "Be brief."}] + CHAT
    assert render_chat_template(messages, "gemma3").text == CHAT_TEXT.replace(
        "user\nHi", "user\nBe brief.\n\nHi", 1)


def test_gemma2_rejects_a_system_message():
    with pytest.raises(ValueError, match="Gemma 2 does not support a system message"):
        render_chat_template([{"role": "system", "content": "x"}] + CHAT, "gemma2")


@pytest.mark.parametrize("messages, match", [
    ([], "empty"),
    ([{"role": "system", "content": "x"}], "followed by a user message"),
    ([{"role": "assistant", "content": "x"}], r"messages\[0\] has role 'assistant' where 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must alternate"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}], r"messages\[1\]"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "'tool'"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "only text parts"),
    ([{"role": "user", "content": 5}], "string or a list"),
])
def test_malformed_chats_are_rejected_with_a_clear_error(messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat_template(messages, "gemma3")


def test_unknown_family_is_rejected():
    with pytest.raises(ValueError, match="unknown model family 'llama'"):
        render_chat_template(CHAT, "llama")


def test_chat_token_ids_have_exactly_one_bos(tok):
    ids = apply_chat_template(CHAT, "gemma3", tok)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids.count(tok.start_of_turn_id) == 4 and ids.count(tok.end_of_turn_id) == 3
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>" + CHAT_TEXT
    # The same text with the template's literal <bos> in front still encodes to one BOS.
    assert tok.encode("<bos>" + CHAT_TEXT) == ids
