"""Tiny engines for tests: fp32 random-weight Gemma 2 / Gemma 3 models, built once per process."""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpage.config import EngineConfig
from jaxpage.demo import temper_random_weights
from jaxpage.engine import LLMEngine, OutputKind
from jaxpage.models.config import get_config
from jaxpage.models.gemma import Gemma
from jaxpage.sampling_params import SamplingParams


@functools.cache
def tiny_model(family: str, sliding_window: int | None = None) -> Gemma:
    """gemma2-tiny / gemma3-tiny with fixed random fp32 weights (scaled so greedy outputs vary)."""
    config = get_config(f"{family}-tiny")
    if sliding_window is not None:
        config = dataclasses.replace(config, sliding_window=sliding_window)
    return temper_random_weights(Gemma(config, dtype=jnp.float32, rngs=nnx.Rngs(1234)))


def make_engine(family: str, *, sliding_window: int | None = None, **config) -> LLMEngine:
    defaults = dict(page_size=4, num_pages=96, max_num_seqs=8, max_num_batched_tokens=64,
                    attention_backend="xla", max_model_len=160, precompile=False)
    return LLMEngine(tiny_model(family, sliding_window),
                     config=EngineConfig(**(defaults | config)))


def random_requests(seed: int, n: int, *, vocab: int = 512, max_prompt: int = 40,
                    max_output: int = 20) -> list[tuple[list[int], int]]:
    """n (prompt token ids, max_tokens) pairs with varied lengths."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(3, vocab, size=int(rng.integers(1, max_prompt + 1))).tolist(),
             int(rng.integers(1, max_output + 1))) for _ in range(n)]


def run_all(engine: LLMEngine, requests, params_for=None, *, abort=()) -> dict[str, list[int]]:
    """Submit every request at once, step to completion; output token ids by request id."""
    for i, (prompt, max_tokens) in enumerate(requests):
        params = params_for(i) if params_for else SamplingParams(temperature=0.0, max_tokens=max_tokens)
        engine.add_request(f"r{i}", prompt_token_ids=prompt, params=params,
                           output_kind=OutputKind.FINAL_ONLY)
    for rid in abort:
        engine.abort_request(rid)
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
    return results


def run_alone(engine: LLMEngine, requests, params_for=None) -> dict[str, list[int]]:
    """Each request on its own, one after the other, through the same engine."""
    results = {}
    for i, req in enumerate(requests):
        out = run_all(engine, [req], (lambda _: params_for(i)) if params_for else None)
        results[f"r{i}"] = out["r0"]
    return results
