"""The Flask app in-process (demo model, Flask's test client): what happens when the engine dies,
and how `jaxpage serve` refuses bad flags before starting anything."""

from __future__ import annotations

import argparse
import json

import pytest

from jaxpage import cli
from jaxpage.checkpoint import load_checkpoint
from jaxpage.config import EngineConfig
from jaxpage.demo import demo_checkpoint_dir
from jaxpage.engine import LLMEngine
from jaxpage.engine_client import EngineClient
from jaxpage.server import add_arguments, create_app, served_model_name
from jaxpage.tokenizer import Tokenizer

STEPS_BEFORE_FAILURE = 4


@pytest.fixture(scope="module")
def dying_app():
    """An app whose engine raises on its 5th step, as if the device was lost."""
    checkpoint = demo_checkpoint_dir()
    _, model = load_checkpoint(checkpoint, dtype="float32")
    tokenizer = Tokenizer(checkpoint / "tokenizer.model")

    def build() -> LLMEngine:
        engine = LLMEngine(model, tokenizer=tokenizer, config=EngineConfig(
            max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64, num_pages=16,
            attention_backend="xla", precompile=False))
        step, calls = engine.step, []

        def step_then_fail():
            calls.append(1)
            if len(calls) > STEPS_BEFORE_FAILURE:
                raise RuntimeError("device lost")
            return step()

        engine.step = step_then_fail
        return engine

    client = EngineClient(build, max_queued_requests=2)
    client.start()
    yield create_app(client, "demo", keepalive_interval=0.2).test_client()
    client.shutdown()


def test_an_engine_failure_mid_stream_is_an_in_band_error_then_done_and_health_turns_503(
        dying_app):
    assert dying_app.get("/health").status_code == 200
    r = dying_app.post("/v1/completions", json={"model": "demo", "prompt": "Hi", "stream": True,
                                                "max_tokens": 40, "ignore_eos": True})
    assert r.status_code == 200
    events = [e for e in r.get_data(as_text=True).split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: "):])["error"]
    assert error["code"] == "engine_dead" and "device lost" in error["message"]
    chunks = [json.loads(e[6:])["choices"][0]["text"] for e in events[:-2]
              if e.startswith("data: ")]
    assert len(chunks) >= 1  # it did stream before the failure
    health = dying_app.get("/health")
    assert health.status_code == 503 and health.json["error"]["code"] == "engine_dead"
    late = dying_app.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert late.status_code == 503 and late.json["error"]["type"] == "server_error"


@pytest.mark.parametrize("flags,message", [
    (["--checkpoint", "/nonexistent/ckpt"], "is not a directory"),
    (["--page-size", "3"], "page_size"),
    (["--max-num-seqs", "0"], "max_num_seqs"),
    (["--attention-backend", "cuda"], "attention_backend"),
    (["--max-queued-requests", "-1"], "--max-queued-requests"),
    (["--keepalive-interval", "0"], "--keepalive-interval"),
])
def test_serve_refuses_bad_flags_before_starting(flags, message, capsys):
    assert cli.main(["serve", *flags]) == 2
    assert message in capsys.readouterr().err


def test_serve_needs_a_tokenizer_next_to_a_checkpoint(tmp_path, capsys):
    assert cli.main(["serve", "--checkpoint", str(tmp_path)]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_the_served_model_name_defaults_to_the_checkpoint_directory_or_the_demo(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert served_model_name(parser.parse_args([])) == "jaxpage-demo"
    ckpt = tmp_path / "gemma3-1b-it"
    assert served_model_name(parser.parse_args(["--checkpoint", str(ckpt)])) == "gemma3-1b-it"
    assert served_model_name(parser.parse_args(["--checkpoint", str(ckpt),
                                                "--served-model-name", "g"])) == "g"
