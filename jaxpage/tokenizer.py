"""Text <-> token ids: SentencePiece tokenizer, streaming detokenizer, stop strings, chat format."""

from __future__ import annotations

import dataclasses
import operator
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sentencepiece as spm

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
REPLACEMENT_CHAR = "\ufffd"  # what SentencePiece decodes an incomplete UTF-8 byte sequence to
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens the detokenizer decodes with, for leading-space handling


class Tokenizer:
    """A SentencePiece `tokenizer.model` with Gemma's conventions (BOS first, control tokens)."""

    def __init__(self, model_path: str | os.PathLike):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {os.fspath(model_path)!r}")
        self.model_path = os.fspath(model_path)
        self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        sp = self._sp
        self.vocab_size: int = sp.get_piece_size()
        self.bos_id: int | None = _defined(sp.bos_id())
        self.eos_id: int | None = _defined(sp.eos_id())
        self.pad_id: int | None = _defined(sp.pad_id())
        self.unk_id: int | None = _defined(sp.unk_id())
        self.start_of_turn_id: int | None = self._piece_id(START_OF_TURN)
        self.end_of_turn_id: int | None = self._piece_id(END_OF_TURN)
        # Control pieces (and <unk>) decode to nothing/" ⁇ "; SentencePiece never produces them
        # from text, so encode() recognises their literal spelling ("<bos>") itself.
        control = [i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)]
        self._control_ids = frozenset(control)
        self._control_literals = {sp.id_to_piece(i): i for i in control}
        literals = sorted(self._control_literals, key=len, reverse=True)
        self._control_pattern = re.compile("|".join(map(re.escape, literals))) if literals else None
        turn_ids = {i for i in (self.start_of_turn_id, self.end_of_turn_id) if i is not None}
        self.special_ids: frozenset[int] = self._control_ids | turn_ids
        self._dummy_prefix = sp.encode("a", out_type=str)[0].startswith("\u2581")
        self._byte_values = {i: int(sp.id_to_piece(i)[3:5], 16)
                             for i in range(self.vocab_size) if sp.is_byte(i)}

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generated turn: <eos>, and <end_of_turn> when the vocabulary has it."""
        return tuple(i for i in (self.eos_id, self.end_of_turn_id) if i is not None)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(self._check_ids([token_id])[0])

    def byte_value(self, token_id: int) -> int | None:
        """The byte a byte-fallback piece ("<0xE2>") stands for; None for other pieces."""
        return self._byte_values.get(token_id)

    def piece_to_id(self, piece: str) -> int:
        """Id of an exact vocabulary piece; ValueError if the vocabulary has no such piece."""
        token_id = self._piece_id(piece)
        if token_id is None:
            raise ValueError(f"piece {piece!r} is not in the vocabulary")
        return token_id

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, with <bos> first when add_bos (never twice: a literal leading
        "<bos>" in the text already is the BOS). Spelled-out control tokens ("<eos>") become ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            why = f"{e.reason} at position {e.start}"
            raise ValueError(f"text is not valid Unicode: {why}") from None
        ids: list[int] = []
        pos = 0
        matches = self._control_pattern.finditer(text) if self._control_pattern else ()
        for match in matches:
            if match.start() > pos:
                ids.extend(self._sp.encode(text[pos:match.start()]))
            ids.append(self._control_literals[match.group()])
            pos = match.end()
        if pos < len(text):
            ids.extend(self._sp.encode(text[pos:]))
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Special ids (control, <unk>, turn markers) are dropped when
        skip_special_tokens, else shown as their piece ("<bos>")."""
        ids = self._check_ids(ids)
        if skip_special_tokens:
            return self._sp.decode([i for i in ids if i not in self.special_ids])
        out: list[str] = []
        run: list[int] = []
        after_text = False
        for i in ids + [None]:
            if i is not None and i not in self._control_ids:
                run.append(i)
                continue
            if run:
                text = self._sp.decode(run)
                # SentencePiece drops the dummy-prefix space of the first piece it decodes;
                # only text at the very start (control tokens aside) should lose it.
                starts_with_space = self._sp.id_to_piece(run[0]).startswith("\u2581")
                if after_text and self._dummy_prefix and starts_with_space:
                    text = " " + text
                out.append(text)
                after_text = after_text or bool(text)
                run = []
            if i is not None:
                out.append(self._sp.id_to_piece(i))
        return "".join(out)

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        checked = []
        for i in ids:
            try:
                i = operator.index(i)
            except TypeError:
                raise TypeError(f"token ids must be integers, got {i!r}") from None
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is out of range for a vocabulary of "
                                 f"{self.vocab_size}")
            checked.append(i)
        return checked

    def _piece_id(self, piece: str) -> int | None:
        token_id = self._sp.piece_to_id(piece)
        return token_id if self._sp.id_to_piece(token_id) == piece else None


def _defined(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None


# -- streaming detokenization ---------------------------------------------------------------------

class IncrementalDetokenizer:
    """Turns generated ids, fed one at a time, into text deltas whose concatenation is the text.

    Each step decodes only a short window: the ids since the start of the previous delta (plus a
    few prompt ids at first, so a first token's leading space comes out as it would in context).
    Byte-fallback pieces that begin a UTF-8 character not yet complete are held back until it
    completes or cannot any more; `flush()` at the end of the sequence returns anything held.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), *,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = tokenizer._check_ids(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        if skip_special_tokens:  # they decode to nothing, so leaving them out changes nothing
            context = [i for i in context if i not in tokenizer.special_ids]
        # A prompt cut inside a character: don't let generated bytes mend it.
        while unfinished := self._unfinished_char_len(context):
            context = context[:-unfinished]
        self._ids = context
        self._prefix_offset = 0  # start of the window that is re-decoded each step
        self._read_offset = len(self._ids)  # ids before this are already in emitted text

    def step(self, token_id: int) -> str:
        """Append one generated id; returns the text it completes ("" while held back)."""
        (token_id,) = self.tokenizer._check_ids([token_id])
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Everything still held back (e.g. a dangling partial character at the end)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        text = self._decode(self._ids[self._prefix_offset:])
        read_to = len(self._ids)
        held = 0 if final else self._unfinished_char_len(self._ids)
        if held:
            # SentencePiece shows each byte of an unfinished character as one U+FFFD.
            if not text.endswith(REPLACEMENT_CHAR * held):
                return ""
            text, read_to = text[:-held], read_to - held
        if len(text) <= len(prefix):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, read_to
        return text[len(prefix):]

    def _unfinished_char_len(self, ids: list[int]) -> int:
        """How many trailing ids are byte pieces forming the start of an unfinished character."""
        tail = []
        for i in reversed(ids[-3:]):
            b = self.tokenizer.byte_value(i)
            if b is None:
                break
            tail.insert(0, b)
        for n in range(1, len(tail) + 1):
            lead, rest = tail[-n], tail[len(tail) - n + 1:]
            if n < _utf8_length(lead) and all(0x80 <= b <= 0xBF for b in rest):
                return n
        return 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def _utf8_length(lead: int) -> int:
    """Length of the UTF-8 sequence a lead byte starts (0: not a lead byte of a longer one)."""
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


# -- stop strings ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StopMatch:
    """A stop string found in a text at text[start:end]."""

    stop: str
    start: int
    end: int


def find_stop(text: str, stops: Sequence[str], search_from: int = 0) -> StopMatch | None:
    """The stop string that appears first as `text` grows: smallest end, then smallest start.

    Only matches ending after `search_from` are considered (earlier text was already checked).
    """
    best: StopMatch | None = None
    for stop in stops:
        start = text.find(stop, max(0, search_from - len(stop) + 1))
        if start < 0:
            continue
        match = StopMatch(stop, start, start + len(stop))
        if best is None or (match.end, match.start) < (best.end, best.start):
            best = match
    return best


def truncate_at_stop(text: str, stops: Sequence[str], *,
                     include_stop_str_in_output: bool = False) -> tuple[str, str | None]:
    """(text cut at the first stop string, that stop string) or (text, None) if none occurs."""
    match = find_stop(text, _check_stops(stops))
    if match is None:
        return text, None
    return text[:match.end if include_stop_str_in_output else match.start], match.stop


class StopChecker:
    """Applies stop strings to a stream of text deltas.

    `update(delta)` returns the part that is safe to show now: when the stop string itself is
    not to be shown, a tail that could be the beginning of a stop string is held back until it
    either completes (and is cut) or cannot be one any more. After a stop, `stop` tells which
    string matched and `text` is the output cut there. When the sequence ends for another
    reason, `finish()` returns the held tail. Work per update is O(len(delta) + stop lengths).

    With an IncrementalDetokenizer: `update(detok.step(id))` per token; at the end
    `update(detok.flush())` then `finish()`.
    """

    def __init__(self, stops: Sequence[str] = (), *, include_stop_str_in_output: bool = False):
        self.stops = _check_stops(stops)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stop: str | None = None
        # How far back into earlier text a match completed by a new delta can start.
        self._keep = max((len(s) for s in self.stops), default=1) - 1
        self._received = 0   # length of all text received
        self._recent = ""    # its last `_keep` characters, for matches that straddle deltas
        self._pending = ""   # received but not yet returned (a possible stop-string prefix)
        self._parts: list[str] = []

    @property
    def stopped(self) -> bool:
        return self.stop is not None

    @property
    def text(self) -> str:
        """All text returned so far (after a stop: the final output)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def update(self, delta: str, *, can_stop: bool = True) -> str:
        """Feed new text; returns what may be shown now. With can_stop=False (e.g. before
        min_tokens) stop strings completed by this delta are ignored."""
        if self.stopped or not delta:
            return ""
        if not self.stops:
            return self._out(delta)
        window = self._recent + delta
        window_start = self._received - len(self._recent)
        match = find_stop(window, self.stops, len(self._recent)) if can_stop else None
        self._received += len(delta)
        self._recent = window[-self._keep:] if self._keep else ""
        unsent = self._pending + delta
        if match is not None:
            self.stop = match.stop
            cut = window_start + (match.end if self.include_stop_str_in_output else match.start)
            self._pending = ""
            return self._out(unsent[:cut - (self._received - len(unsent))])
        hold = 0 if self.include_stop_str_in_output else self._stop_prefix_len(window)
        hold = min(hold, len(unsent))
        self._pending = unsent[len(unsent) - hold:]
        return self._out(unsent[:len(unsent) - hold])

    def finish(self) -> str:
        """The held-back tail, once no more text will come."""
        if self.stopped:
            return ""
        tail, self._pending = self._pending, ""
        return self._out(tail)

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _out(self, text: str) -> str:
        if text:
            self._parts.append(text)
        return text


def _check_stops(stops: Sequence[str]) -> list[str]:
    if isinstance(stops, str):
        stops = [stops]
    stops = list(stops)
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
    return stops


# -- chat template --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ChatPrompt:
    """A rendered chat prompt. `text` has no <bos>; tokens are tokenizer.encode(text, add_bos)."""

    text: str
    add_bos: bool = True

    def token_ids(self, tokenizer: Tokenizer) -> list[int]:
        return tokenizer.encode(self.text, add_bos=self.add_bos)


def render_chat_template(messages: Sequence[Mapping[str, Any]], family: str, *,
                         add_generation_prompt: bool = True) -> ChatPrompt:
    """Gemma's chat format: alternating user/model turns, the next model turn opened.

    Roles are "user" and "assistant" (written "model"); a leading "system" message is folded
    into the first user turn on Gemma 3 and rejected on Gemma 2. Contents are stripped, as the
    official template does. Content may be a string or a list of {"type": "text", "text": ...}.
    """
    if family not in ("gemma2", "gemma3"):
        raise ValueError(f"unknown model family {family!r}; expected 'gemma2' or 'gemma3'")
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} objects")
    messages = list(messages)
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
    system_prefix = ""
    if messages and messages[0]["role"] == "system":
        if family == "gemma2":
            raise ValueError("Gemma 2 does not support a system message; put it in the first user "
                             "message instead")
        system_prefix = _content_text(messages[0]["content"], 0, strip=False) + "\n\n"
        messages = messages[1:]
        if not messages:
            raise ValueError("a system message must be followed by a user message")
    if not messages:
        raise ValueError("messages is empty; a chat needs at least one user message")
    offset = 1 if system_prefix else 0
    parts = []
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"messages[{i + offset}] has role {m['role']!r} where {expected!r} is "
                             "expected: roles must alternate user/assistant/user/..., starting "
                             "with user (after one optional system message)")
        role = "model" if m["role"] == "assistant" else "user"
        text = _content_text(m["content"], i + offset, strip=True)
        prefix = system_prefix if i == 0 else ""
        parts.append(f"{START_OF_TURN}{role}\n{prefix}{text}{END_OF_TURN}\n")
    if add_generation_prompt:
        parts.append(f"{START_OF_TURN}model\n")
    return ChatPrompt("".join(parts), add_bos=True)


def apply_chat_template(messages: Sequence[Mapping[str, Any]], family: str, tokenizer: Tokenizer, *,
                        add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the Gemma chat prompt for `messages`, with exactly one <bos> first."""
    prompt = render_chat_template(messages, family, add_generation_prompt=add_generation_prompt)
    return prompt.token_ids(tokenizer)


def _content_text(content: Any, index: int, *, strip: bool) -> str:
    if isinstance(content, str):
        return content.strip() if strip else content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                raise ValueError(f"messages[{index}].content: only text parts "
                                 f"({{'type': 'text', 'text': ...}}) are supported, got {part!r}")
            texts.append(part["text"].strip() if strip else part["text"])
        return "".join(texts)
    raise ValueError(f"messages[{index}].content must be a string or a list of text parts, "
                     f"got {type(content).__name__}")
