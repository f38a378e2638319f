"""The OpenAI API's shapes: request bodies in, responses and stream chunks out, error bodies.

parse_completion_request / parse_chat_request check a JSON body field by field (types, ranges,
what is not supported) and return a GenerationRequest: token-id prompts plus SamplingParams.
ResponseBuilder turns the engine's DELTA outputs of one API call into stream chunks and/or the
final response. Bad input raises APIError, which carries the HTTP status and the error body.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import uuid
from typing import Any

from jaxpage.outputs import RequestOutput
from jaxpage.sampling_params import SamplingParams
from jaxpage.tokenizer import Tokenizer, render_chat_template

log = logging.getLogger(__name__)

MAX_N = 128                  # choices per prompt (OpenAI's limit)
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 200        # characters per stop string
MAX_STOP_TOKEN_IDS = 128
LOGPROB_FLOOR = -9999.0      # stands for -inf, which JSON cannot carry

_SAMPLING_FIELDS = {
    "model", "n", "best_of", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "max_tokens", "min_tokens", "stop",
    "stop_token_ids", "seed", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
    "stream", "stream_options", "user", "logit_bias", "logprobs"}
COMPLETION_FIELDS = _SAMPLING_FIELDS | {"prompt", "echo", "suffix"}
CHAT_FIELDS = _SAMPLING_FIELDS | {
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
    "response_format", "parallel_tool_calls", "add_generation_prompt"}

_KINDS = {  # kind -> (check, how the error message names it)
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "string": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "list": (lambda v: isinstance(v, list), "an array"),
}


class APIError(Exception):
    """An error answered with `status` and {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def to_json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def parse_json_body(data: bytes) -> dict:
    """The request body as a JSON object; APIError 400 for anything else."""
    def no_constants(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(data, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_json_type(body)}")
    return body


@dataclasses.dataclass
class GenerationRequest:
    """A checked completion or chat request, ready for the engine."""

    chat: bool
    model: str | None
    prompts: list[tuple[str | None, list[int]]]  # (text, token ids) per prompt
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: bool = False   # return logprobs
    top_logprobs: int = 0    # alternatives per token (chat)


def parse_completion_request(body: dict, tokenizer: Tokenizer,
                             vocab_size: int) -> GenerationRequest:
    """A /v1/completions body, checked; APIError 400 for anything a client must fix."""
    f = _Fields(body, COMPLETION_FIELDS, "/v1/completions")
    if f.get("suffix", "string") is not None:
        raise APIError(400, "'suffix' is not supported", param="suffix")
    echo = f.get("echo", "bool", False)
    logprobs = f.get("logprobs", "int")
    if echo and logprobs is not None:
        raise APIError(400, "'echo' together with 'logprobs' is not supported (prompt logprobs "
                            "are not computed)", param="echo")
    params = _sampling_params(f, vocab_size, max_tokens=f.get("max_tokens", "int", 16),
                              logprobs=logprobs)
    prompts = _completion_prompts(body.get("prompt"), tokenizer)
    return GenerationRequest(False, f.get("model", "string"), prompts, params, *_stream(f),
                             echo=echo, logprobs=logprobs is not None)


def parse_chat_request(body: dict, tokenizer: Tokenizer, vocab_size: int,
                       family: str) -> GenerationRequest:
    """A /v1/chat/completions body, checked; the prompt is the Gemma chat template of the
    messages, and <end_of_turn> ends the generated turn."""
    f = _Fields(body, CHAT_FIELDS, "/v1/chat/completions")
    if f.get("tools", "list"):
        raise APIError(400, "'tools' are not supported", param="tools")
    if body.get("tool_choice") not in (None, "none"):
        raise APIError(400, "'tool_choice' is not supported", param="tool_choice")
    response_format = f.get("response_format", "object")
    if response_format is not None and response_format.get("type") != "text":
        raise APIError(400, "only response_format {'type': 'text'} is supported",
                       param="response_format")
    logprobs = f.get("logprobs", "bool", False)
    top_logprobs = f.get("top_logprobs", "int")
    if top_logprobs is not None and not logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    max_tokens = f.get("max_completion_tokens", "int", f.get("max_tokens", "int"))
    eot = [tokenizer.end_of_turn_id] if tokenizer.end_of_turn_id is not None else []
    params = _sampling_params(f, vocab_size, max_tokens=max_tokens,
                              logprobs=(top_logprobs or 0) if logprobs else None,
                              extra_stop_token_ids=eot, logprobs_field="top_logprobs")
    messages = f.get("messages", "list")
    if messages is None:
        raise APIError(400, "'messages' is required", param="messages")
    try:
        chat = render_chat_template(messages, family, add_generation_prompt=f.get(
            "add_generation_prompt", "bool", True))
        ids = chat.token_ids(tokenizer)
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e), param="messages") from None
    return GenerationRequest(True, f.get("model", "string"), [(chat.text, ids)], params,
                             *_stream(f), logprobs=logprobs, top_logprobs=top_logprobs or 0)


class _Fields:
    """Typed reads of a request body's fields; logs the fields it does not know."""

    def __init__(self, body: dict, known: set[str], route: str):
        self.body = body
        unknown = sorted(set(body) - known)
        if unknown:
            log.info("%s: ignoring unknown fields %s", route, ", ".join(map(repr, unknown)))

    def get(self, name: str, kind: str, default: Any = None) -> Any:
        value = self.body.get(name)
        if value is None:
            return default
        check, described = _KINDS[kind]
        if not check(value):
            raise APIError(400, f"'{name}' must be {described}, got {_json_type(value)}",
                           param=name)
        return value


def _stream(f: _Fields) -> tuple[bool, bool]:
    stream = f.get("stream", "bool", False)
    options = f.get("stream_options", "object")
    if options is None:
        return stream, False
    if not stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true",
                       param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise APIError(400, "'stream_options.include_usage' must be a boolean",
                       param="stream_options")
    return stream, include_usage


def _sampling_params(f: _Fields, vocab_size: int, *, max_tokens: int | None,
                     logprobs: int | None, extra_stop_token_ids: list[int] = (),
                     logprobs_field: str = "logprobs") -> SamplingParams:
    n = f.get("n", "int", 1)
    if not 1 <= n <= MAX_N:
        raise APIError(400, f"'n' must be in [1, {MAX_N}], got {n}", param="n")
    best_of = f.get("best_of", "int")
    if best_of is not None and best_of != n:
        raise APIError(400, "'best_of' different from 'n' is not supported", param="best_of")
    if f.get("logit_bias", "object"):
        raise APIError(400, "'logit_bias' is not supported", param="logit_bias")
    seed = f.get("seed", "int")
    if seed is not None and not -2**63 <= seed < 2**64:
        raise APIError(400, f"'seed' must be a 64-bit integer, got {seed}", param="seed")
    top_k = f.get("top_k", "int", 0)
    stop_token_ids = _stop_token_ids(f, vocab_size)
    stop_token_ids += [t for t in extra_stop_token_ids if t not in stop_token_ids]
    kwargs = dict(
        n=n, temperature=f.get("temperature", "number", 1.0), top_p=f.get("top_p", "number", 1.0),
        top_k=0 if top_k >= vocab_size else top_k,  # keeping the whole vocabulary is "off"
        min_p=f.get("min_p", "number", 0.0),
        presence_penalty=f.get("presence_penalty", "number", 0.0),
        frequency_penalty=f.get("frequency_penalty", "number", 0.0),
        repetition_penalty=f.get("repetition_penalty", "number", 1.0),
        max_tokens=max_tokens, min_tokens=f.get("min_tokens", "int", 0), stop=_stop_strings(f),
        stop_token_ids=stop_token_ids, ignore_eos=f.get("ignore_eos", "bool", False), seed=seed,
        logprobs=logprobs, skip_special_tokens=f.get("skip_special_tokens", "bool", True),
        include_stop_str_in_output=f.get("include_stop_str_in_output", "bool", False))
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        message = str(e).removeprefix("SamplingParams.")
        field = message.split(" ", 1)[0]
        if field == "logprobs":
            field, message = logprobs_field, logprobs_field + message[len(field):]
        raise APIError(400, message, param=field) from None


def _stop_strings(f: _Fields) -> list[str]:
    stop = f.body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "'stop' must be a non-empty string or an array of them", param="stop")
    if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stops):
        raise APIError(400, f"'stop' may hold at most {MAX_STOP_STRINGS} strings of at most "
                            f"{MAX_STOP_LENGTH} characters", param="stop")
    return stops


def _stop_token_ids(f: _Fields, vocab_size: int) -> list[int]:
    ids = f.get("stop_token_ids", "list", [])
    if len(ids) > MAX_STOP_TOKEN_IDS or not all(
            _KINDS["int"][0](t) and 0 <= t < vocab_size for t in ids):
        raise APIError(400, f"'stop_token_ids' must be at most {MAX_STOP_TOKEN_IDS} token ids in "
                            f"[0, {vocab_size})", param="stop_token_ids")
    return list(dict.fromkeys(ids))


def _completion_prompts(prompt: Any, tokenizer: Tokenizer) -> list[tuple[str | None, list[int]]]:
    """'prompt' as a string, array of strings, array of token ids, or array of such arrays."""
    def is_id(v):
        return _KINDS["int"][0](v)

    if prompt is None:
        raise APIError(400, "'prompt' is required", param="prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise APIError(400, "'prompt' must be a string, an array of strings, an array of token "
                            "ids or an array of arrays of token ids, and not empty", param="prompt")
    if all(is_id(t) for t in prompt):
        return [(None, list(prompt))]
    if all(isinstance(p, list) and all(is_id(t) for t in p) for p in prompt):
        return [(None, list(p)) for p in prompt]
    if not all(isinstance(p, str) for p in prompt):
        raise APIError(400, "'prompt' must not mix strings, token ids and arrays", param="prompt")
    try:
        return [(p, tokenizer.encode(p)) for p in prompt]
    except ValueError as e:
        raise APIError(400, f"'prompt': {e}", param="prompt") from None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for kind in ("bool", "int", "number", "string", "object", "list"):
        if _KINDS[kind][0](value):
            return {"int": "integer", "list": "array", "bool": "boolean"}.get(kind, kind)
    return type(value).__name__


# -- responses ------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Choice:
    index: int
    text: list[str] = dataclasses.field(default_factory=list)
    num_tokens: int = 0
    logprobs: list = dataclasses.field(default_factory=list)  # formatted, one item per token
    text_offset: int = 0
    finish_reason: str | None = None


class ResponseBuilder:
    """Builds the OpenAI response of one API call from its engine outputs (DELTA).

    `update(out)` records an output and returns the stream chunks it makes; `response()` is the
    whole (non-streamed) answer; `start_chunks()` open a stream, `usage_chunk()` ends it.
    """

    def __init__(self, req: GenerationRequest, model: str, tokenizer: Tokenizer,
                 request_ids: list[str]):
        self.req, self.model, self.tokenizer = req, model, tokenizer
        self.id = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._prompt_of = {rid: i for i, rid in enumerate(request_ids)}
        self._n = req.params.n
        self.choices = [_Choice(i) for i in range(len(req.prompts) * self._n)]
        self.prompt_tokens = sum(len(ids) for _, ids in req.prompts)
        self._echo = [""] * len(req.prompts)
        if req.echo:
            self._echo = [text if text is not None else tokenizer.decode(ids)
                          for text, ids in req.prompts]
            for c in self.choices:
                c.text_offset = len(self._echo[c.index // self._n])
        self._token_text_cache: dict[int, str] = {}

    @property
    def object(self) -> str:
        return "chat.completion" if self.req.chat else "text_completion"

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.req.chat else "text_completion"

    def start_chunks(self) -> list[dict]:
        """Chat: the assistant role per choice; completions with echo: the prompt per choice."""
        if self.req.chat:
            return [self._chunk(c, {"role": "assistant", "content": ""}, None)
                    for c in self.choices]
        if self.req.echo:
            return [self._chunk(c, self._echo[c.index // self._n], None) for c in self.choices]
        return []

    def update(self, out: RequestOutput) -> list[dict]:
        chunks = []
        base = self._prompt_of[out.request_id] * self._n
        for c in out.outputs:
            choice = self.choices[base + c.index]
            if choice.finish_reason is not None:  # finished and reported already
                continue
            items = self._logprob_items(choice, c.token_ids, c.logprobs or [])
            choice.text.append(c.text)
            choice.num_tokens += len(c.token_ids)
            choice.logprobs += items
            choice.finish_reason = c.finish_reason
            if c.text or c.finish_reason or items:
                delta: Any = c.text
                if self.req.chat:
                    delta = {"content": c.text} if c.text or items else {}
                chunks.append(self._chunk(choice, delta, self._logprobs(items)))
        return chunks

    def usage(self) -> dict:
        completion = sum(c.num_tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": self._chunk_object, "created": self.created,
                "model": self.model, "choices": [], "usage": self.usage()}

    def response(self) -> dict:
        choices = []
        for c in self.choices:
            text = "".join(c.text)
            entry = {"index": c.index}
            if self.req.chat:
                entry["message"] = {"role": "assistant", "content": text}
            else:
                entry["text"] = self._echo[c.index // self._n] + text
            entry["logprobs"] = self._logprobs(c.logprobs)
            entry["finish_reason"] = c.finish_reason
            choices.append(entry)
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.model, "choices": choices, "usage": self.usage()}

    def _chunk(self, choice: _Choice, delta: Any, logprobs: dict | None) -> dict:
        entry = {"index": choice.index}
        entry["delta" if self.req.chat else "text"] = delta
        entry["logprobs"] = logprobs
        entry["finish_reason"] = choice.finish_reason
        chunk = {"id": self.id, "object": self._chunk_object, "created": self.created,
                 "model": self.model, "choices": [entry]}
        if self.req.include_usage:
            chunk["usage"] = None
        return chunk

    def _logprobs(self, items: list) -> dict | None:
        if not self.req.logprobs:
            return None
        if self.req.chat:
            return {"content": items}
        return {"tokens": [i[0] for i in items], "token_logprobs": [i[1] for i in items],
                "top_logprobs": [i[2] for i in items], "text_offset": [i[3] for i in items]}

    def _logprob_items(self, choice: _Choice, token_ids: list[int],
                       entries: list[dict[int, float]]) -> list:
        if not self.req.logprobs:
            return []
        items = []
        for token, entry in zip(token_ids, entries):
            text = self._token_text(token)
            logprob = _finite(entry.get(token, -math.inf))
            ranked = sorted(entry.items(), key=lambda kv: -kv[1])
            if self.req.chat:
                items.append({"token": text, "logprob": logprob, "bytes": self._bytes(token),
                              "top_logprobs": [
                                  {"token": self._token_text(t), "logprob": _finite(lp),
                                   "bytes": self._bytes(t)}
                                  for t, lp in ranked[:self.req.top_logprobs]]})
            else:
                top = {self._token_text(t): _finite(lp) for t, lp in ranked}
                items.append((text, logprob, top, choice.text_offset))
                choice.text_offset += len(text)
        return items

    def _token_text(self, token: int) -> str:
        """A token as logprobs list it: its piece with spaces for U+2581; a byte piece as its
        character if the byte is one alone (ASCII), else as OpenAI's "bytes:\\xNN"."""
        text = self._token_text_cache.get(token)
        if text is None:
            byte = self.tokenizer.byte_value(token)
            if byte is None:
                text = self.tokenizer.id_to_piece(token).replace("\u2581", " ")
            else:
                text = chr(byte) if byte < 0x80 else f"bytes:\\x{byte:02x}"
            self._token_text_cache[token] = text
        return text

    def _bytes(self, token: int) -> list[int]:
        byte = self.tokenizer.byte_value(token)
        return [byte] if byte is not None else list(self._token_text(token).encode("utf-8"))


def _finite(logprob: float) -> float:
    return float(logprob) if math.isfinite(logprob) else LOGPROB_FLOOR


def model_list(name: str, max_model_len: int, created: int) -> dict:
    return {"object": "list", "data": [model_card(name, max_model_len, created)]}


def model_card(name: str, max_model_len: int, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "jaxpage",
            "root": name, "max_model_len": max_model_len}
