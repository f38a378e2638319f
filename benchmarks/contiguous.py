"""Contiguous-cache baseline: what a typical research sampler does, at jaxpage's KV memory budget.

The same model, a dense cache of max_len tokens reserved for every sequence of a static batch
(jaxpage.generate lays each sequence's cache out as one contiguous run), shapes fixed to the
workload's longest prompt and output so it compiles once, every row decoded until the batch's
longest output is done. The batch size is what the KV budget allows at max_len per sequence.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpage.benchmarks import common
from jaxpage.generation import generate
from jaxpage.models.gemma import Gemma


def batch_size_for(config, kv_budget_bytes: int, max_len: int, dtype=jnp.bfloat16) -> int:
    per_token = sum(common.kv_bytes_per_token(config, dtype).values())
    return max(1, kv_budget_bytes // (max_len * per_token))


def run_contiguous(model: Gemma, lengths: list[tuple[int, int]], prompts: list[list[int]], *,
                   kv_budget_bytes: int, backend: str, max_batch: int = 1024) -> dict:
    """Throughput of static batches over the workload (compile excluded, reported apart), at the
    batch the KV budget allows, halved until the rest of the step (one-shot prefill
    activations) fits in device memory too."""
    max_in = max(i for i, _ in lengths)
    max_out = max(o for _, o in lengths)
    kv_budget_batch = batch_size_for(model.config, kv_budget_bytes, max_in + max_out)
    batch = min(kv_budget_batch, max_batch, len(lengths))
    too_big = []
    while True:
        try:
            return {**_run_static_batches(model, lengths, prompts, batch, backend),
                    "kv_budget_batch": kv_budget_batch, "out_of_memory_at": too_big}
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e) or batch == 1:
                raise
            too_big.append(batch)
            batch //= 2
            print(f"contiguous baseline: out of memory at batch {too_big[-1]}, trying {batch}",
                  flush=True)


def _run_static_batches(model: Gemma, lengths: list[tuple[int, int]], prompts: list[list[int]],
                        batch: int, backend: str) -> dict:
    max_in = max(i for i, _ in lengths)
    max_out = max(o for _, o in lengths)
    graphdef, state = nnx.split(model)  # the weights are an argument, not baked-in constants
    run = jax.jit(lambda state, tok, lens, key: generate(
        (graphdef, state), tok, key, prompt_lengths=lens, max_new_tokens=max_out,
        temperature=1.0, page_size=16, attention_backend=backend))

    def batch_arrays(chunk):
        tok = np.zeros((batch, max_in), np.int32)
        lens = np.ones((batch,), np.int32)
        for row, (p, _) in enumerate(chunk):
            tok[row, :len(p)] = p
            lens[row] = len(p)
        return jnp.asarray(tok), jnp.asarray(lens)

    requests = list(zip(prompts, (o for _, o in lengths)))
    t0 = time.perf_counter()
    jax.block_until_ready(run(state, *batch_arrays(requests[:batch]), jax.random.key(0)))
    compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for start in range(0, len(requests), batch):
        out = run(state, *batch_arrays(requests[start:start + batch]), jax.random.key(start))
    jax.block_until_ready(out)
    elapsed = time.perf_counter() - t0
    in_tokens = sum(i for i, _ in lengths)
    out_tokens = sum(o for _, o in lengths)
    return {"system": "contiguous", "batch": batch, "seconds": elapsed,
            "requests_per_s": len(lengths) / elapsed, "output_tokens_per_s": out_tokens / elapsed,
            "total_tokens_per_s": (in_tokens + out_tokens) / elapsed, "compile_s": compile_s}
