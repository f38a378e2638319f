"""`jaxpage serve`: the OpenAI-compatible HTTP API over one engine thread.

    jaxpage serve                          # the built-in demo model on 127.0.0.1:8000
    jaxpage serve --checkpoint out/gemma3-1b --max-num-seqs 64

gunicorn runs the Flask app in ONE worker process (one process owns the accelerator) with a pool
of HTTP threads; the model is loaded in that worker, after the fork. Flask's own development
server is used only with --dev. Routes: /v1/completions, /v1/chat/completions, /v1/models,
/health, /metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import queue
import select
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from flask import Flask, Response, request
from gunicorn.app.base import BaseApplication
from werkzeug.exceptions import HTTPException

from jaxpage.config import EngineConfig
from jaxpage.engine import LLMEngine
from jaxpage.engine_client import EngineClient, EngineDeadError, QueueFullError, Submission
from jaxpage.metrics import ServerMetrics
from jaxpage.openai_protocol import (APIError, ResponseBuilder, error_body, model_card, model_list,
                                     parse_chat_request, parse_completion_request,
                                     parse_json_body, to_json)

log = logging.getLogger(__name__)

DEMO_MODEL_NAME = "jaxpage-demo"
TOKENIZER_FILE = "tokenizer.model"
RETRY_AFTER_S = 1
POLL_S = 0.25  # how often a handler waiting for tokens checks that its client is still there
MAX_BODY_BYTES = 32 << 20
KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The HTTP client closed its connection; its requests were aborted."""


# -- the Flask app --------------------------------------------------------------------------------

def create_app(client: EngineClient, model_name: str, *,
               keepalive_interval: float = 5.0) -> Flask:
    """The API over a started EngineClient."""
    app = Flask("jaxpage")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    engine = client.engine
    tokenizer, model_config = engine.tokenizer, engine.model_config
    if tokenizer is None:
        raise ValueError("the server needs an engine with a tokenizer")
    created = int(time.time())

    def generate(chat: bool) -> Response:
        body = parse_json_body(request.get_data(cache=False))
        if chat:
            req = parse_chat_request(body, tokenizer, model_config.vocab_size, model_config.family)
        else:
            req = parse_completion_request(body, tokenizer, model_config.vocab_size)
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves "
                                f"'{model_name}'.", param="model", code="model_not_found")
        sub = _submit(client, req.prompts, req.params)
        try:
            builder = ResponseBuilder(req, model_name, tokenizer, sub.request_ids)
        except BaseException:
            client.abort(sub)
            raise
        outputs = _outputs(client, sub, request.environ)
        if req.stream:
            response = Response(_sse(builder, outputs, req.include_usage, keepalive_interval),
                                mimetype="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            response.call_on_close(lambda: client.abort(sub))  # even if never iterated
            return response
        with contextlib.closing(outputs):
            try:
                for out in outputs:
                    if out is not None:
                        builder.update(out)
            except ClientGone:
                return Response(status=499)  # nobody reads it
            except EngineDeadError as e:
                raise APIError(503, str(e), type="server_error", code="engine_dead") from None
        return _json(builder.response())

    @app.post("/v1/completions")
    def completions():
        return generate(chat=False)

    @app.post("/v1/chat/completions")
    def chat_completions():
        return generate(chat=True)

    @app.get("/v1/models")
    def models():
        return _json(model_list(model_name, engine.max_model_len, created))

    @app.get("/v1/models/<path:model_id>")
    def model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"The model '{model_id}' does not exist.", param="model",
                           code="model_not_found")
        return _json(model_card(model_name, engine.max_model_len, created))

    @app.get("/health")
    def health():
        if client.alive:
            return _json({"status": "ok"})
        return _json(error_body("the engine is not running", "server_error", code="engine_dead"),
                     503)

    @app.get("/metrics")
    def metrics():
        text, content_type = client.metrics.render()
        return Response(text, content_type=content_type)

    @app.errorhandler(APIError)
    def api_error(e: APIError):
        return _json(e.body(), e.status, e.headers)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        kind = "invalid_request_error" if e.code < 500 else "server_error"
        return _json(error_body(e.description, kind, code=e.name.lower().replace(" ", "_")),
                     e.code)

    @app.errorhandler(Exception)
    def internal_error(e: Exception):
        log.exception("unexpected error while handling %s %s", request.method, request.path)
        return _json(error_body(f"internal server error: {type(e).__name__}", "server_error",
                                code="internal_error"), 500)

    return app


def _json(obj: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(to_json(obj), status=status, headers=headers, mimetype="application/json")


def _submit(client: EngineClient, prompts, params) -> Submission:
    try:
        return client.submit(prompts, params)
    except QueueFullError as e:
        raise APIError(503, str(e), type="server_error", code="server_overloaded",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except EngineDeadError as e:
        raise APIError(503, str(e), type="server_error", code="engine_dead") from None
    except ValueError as e:  # the engine's RequestError: a request it can never serve
        raise APIError(400, str(e), param=getattr(e, "param", None)) from None


def _outputs(client: EngineClient, sub: Submission, environ: dict) -> Iterator:
    """The submission's outputs until all its requests finished, None after each POLL_S of
    silence; raises ClientGone when the client hung up. Aborts what is left if not run to the
    end (client gone, generator closed because a write failed, engine error)."""
    remaining = set(sub.request_ids)
    checked = time.monotonic()
    try:
        while remaining:
            try:
                item = sub.outputs.get(timeout=POLL_S)
            except queue.Empty:
                item = None
            if time.monotonic() - checked >= POLL_S:
                if _client_gone(environ):
                    raise ClientGone()
                checked = time.monotonic()
            if item is None:
                yield None
                continue
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                remaining.discard(item.request_id)
            yield item
    finally:
        if remaining:
            client.abort(sub)


def _sse(builder: ResponseBuilder, outputs: Iterator, include_usage: bool,
         keepalive_interval: float) -> Iterator[bytes]:
    """Server-sent events: chunks, the usage chunk if asked, then [DONE]. An error after the
    stream began is sent in-band as an error event."""
    with contextlib.closing(outputs):
        last_write = time.monotonic()
        try:
            for chunk in builder.start_chunks():
                yield _event(chunk)
            for out in outputs:
                if out is None:
                    if time.monotonic() - last_write >= keepalive_interval:
                        last_write = time.monotonic()
                        yield KEEPALIVE
                    continue
                for chunk in builder.update(out):
                    yield _event(chunk)
                last_write = time.monotonic()
            if include_usage:
                yield _event(builder.usage_chunk())
        except ClientGone:
            return
        except EngineDeadError as e:
            yield _event(error_body(str(e), "server_error", code="engine_dead"))
        except Exception as e:  # noqa: BLE001 - the stream already said 200: report in-band
            log.exception("error while streaming %s", builder.id)
            yield _event(error_body(f"internal server error: {type(e).__name__}", "server_error",
                                    code="internal_error"))
        yield DONE


def _event(obj: dict) -> bytes:
    return b"data: " + to_json(obj).encode() + b"\n\n"


def _client_gone(environ: dict) -> bool:
    """True when the client's connection is closed (readable, and reading gives nothing)."""
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # closed socket, or TLS (no MSG_PEEK)
        return False


# -- command line ---------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--checkpoint", help="a directory made by `jaxpage convert` "
                                            "(default: the built-in demo model)")
    model.add_argument("--tokenizer", help="tokenizer.model (default: the checkpoint's)")
    model.add_argument("--served-model-name", help="the model name clients use (default: the "
                                                   f"checkpoint directory's name, or "
                                                   f"{DEMO_MODEL_NAME})")
    model.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    d = EngineConfig()
    engine = parser.add_argument_group("engine")
    engine.add_argument("--page-size", type=int, default=d.page_size)
    engine.add_argument("--num-pages", type=int, default=d.num_pages,
                        help="KV pages per layer group (default: from free device memory)")
    engine.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    engine.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    engine.add_argument("--max-model-len", type=int, default=d.max_model_len)
    engine.add_argument("--attention-backend", default=d.attention_backend)
    engine.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=d.enable_prefix_caching)
    engine.add_argument("--seed", type=int, default=d.seed)
    engine.add_argument("--num-decode-steps", type=int, default=d.num_decode_steps,
                        help="decode steps one launch may run when only decodes are running "
                             "(1: one step per launch)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--max-queued-requests", type=int, default=256,
                        help="sequences that may wait for a batch slot; beyond: 503")
    server.add_argument("--http-threads", type=int, default=None,
                        help="HTTP threads (default: max-num-seqs + max-queued-requests + 16)")
    server.add_argument("--stats-interval", type=float, default=5.0,
                        help="seconds between stats log lines")
    server.add_argument("--keepalive-interval", type=float, default=5.0,
                        help="seconds of silence after which a stream sends a keep-alive comment")
    server.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    server.add_argument("--access-log", action="store_true", help="log every HTTP request")
    server.add_argument("--dev", action="store_true",
                        help="use Flask's development server instead of gunicorn")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        page_size=args.page_size, num_pages=args.num_pages, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        attention_backend=args.attention_backend,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching, seed=args.seed,
        num_decode_steps=args.num_decode_steps)


def load_engine(args: argparse.Namespace) -> LLMEngine:
    """Load the checkpoint (or the demo) and build the engine; compiles every bucket."""
    from jaxpage.checkpoint import load_checkpoint  # noqa: PLC0415 - orbax is slow to import
    from jaxpage.demo import demo_checkpoint_dir  # noqa: PLC0415
    from jaxpage.tokenizer import Tokenizer  # noqa: PLC0415

    checkpoint = Path(args.checkpoint) if args.checkpoint else demo_checkpoint_dir()
    _, model = load_checkpoint(checkpoint, dtype=args.dtype)
    tokenizer = Tokenizer(args.tokenizer or checkpoint / TOKENIZER_FILE)
    return LLMEngine(model, tokenizer=tokenizer, config=engine_config(args))


def build_app(args: argparse.Namespace) -> Flask:
    """Start the engine thread (loading the model) and return the app; runs in the worker."""
    client = EngineClient(lambda: load_engine(args), max_queued_requests=args.max_queued_requests,
                          stats_interval=args.stats_interval, metrics=ServerMetrics())
    client.start()
    log.info("serving %r: max_model_len %d, at most %d sequences in flight",
             served_model_name(args), client.engine.max_model_len, client.capacity)
    return create_app(client, served_model_name(args), keepalive_interval=args.keepalive_interval)


def served_model_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    return Path(args.checkpoint).resolve().name if args.checkpoint else DEMO_MODEL_NAME


def run(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    problem = _check_args(args)
    if problem:
        print(f"jaxpage serve: error: {problem}", file=sys.stderr)
        return 2
    if args.dev:
        build_app(args).run(host=args.host, port=args.port, threaded=True, use_reloader=False)
        return 0
    threads = args.http_threads or args.max_num_seqs + args.max_queued_requests + 16
    host = f"[{args.host}]" if ":" in args.host else args.host
    options = {
        "bind": [f"{host}:{args.port}"], "workers": 1, "worker_class": "gthread",
        "threads": threads, "worker_connections": max(1000, threads + 64),
        "timeout": 0,  # loading and compiling may take minutes; one worker is never recycled
        "graceful_timeout": 10, "keepalive": 5, "loglevel": args.log_level, "errorlog": "-",
        "accesslog": "-" if args.access_log else None, "proc_name": "jaxpage-serve",
        "control_socket_disable": True,  # gunicorn >= 25: one shared path would clash
    }
    _GunicornApp(lambda: build_app(args), options).run()
    return 0


def _setup_logging(level: str) -> None:
    """jaxpage's own log lines to stderr, formatted like gunicorn's (the root logger is left to
    libraries: absl may already own it)."""
    logger = logging.getLogger("jaxpage")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(
            "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
            "%Y-%m-%d %H:%M:%S %z"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def _check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags, checked before any worker starts (None: nothing)."""
    try:
        engine_config(args)
    except ValueError as e:
        return str(e)
    if args.checkpoint and not Path(args.checkpoint).is_dir():
        return f"--checkpoint {args.checkpoint!r} is not a directory"
    tokenizer = args.tokenizer or (Path(args.checkpoint) / TOKENIZER_FILE if args.checkpoint
                                   else None)
    if tokenizer is not None and not Path(tokenizer).is_file():
        return f"no tokenizer at {str(tokenizer)!r}: give --tokenizer"
    if args.max_queued_requests < 0:
        return "--max-queued-requests must be >= 0"
    if args.http_threads is not None and args.http_threads < 1:
        return "--http-threads must be >= 1"
    if args.keepalive_interval <= 0 or args.stats_interval <= 0:
        return "--keepalive-interval and --stats-interval must be positive"
    return None


class _GunicornApp(BaseApplication):
    """gunicorn configured from a dict; `load` (in the worker, after the fork) builds the app."""

    def __init__(self, load_app, options: dict):
        self._load_app, self._options = load_app, options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            if key in self.cfg.settings:  # older gunicorns lack some settings
                self.cfg.set(key, value)

    def load(self):
        return self._load_app()
