"""The physical floor of an offline workload: how fast any engine could run it on this device.

A workload is a list of (input, output) lengths. Its work is fixed whatever the engine does:
- FLOPs: every weight matrix multiplies every token that goes through the model (the prompt and
  all output tokens but the last, which is sampled and never fed back), the output projection
  runs once per sampled token, and prefill attention computes 4 * Hq * D FLOPs per visible
  (query, key) pair (causal; sliding-window layers see at most their window);
- bytes: each decode token reads the keys and values it attends to once (prefill attention is
  counted as FLOPs, decode attention as bytes: each is the resource that bounds it).
A lower bound on the time is the larger of
- work: FLOPs at the measured dense matmul rate plus decode KV bytes at the measured copy
  bandwidth (the two kinds of kernel run one after the other in a step), and
- serial: the longest request's prefill FLOPs plus one weight read per decode step it needs
  (its tokens come one step at a time, and no step takes less than reading the weights).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from jaxpage.benchmarks.common import kv_bytes_per_token
from jaxpage.models.config import GemmaConfig


def matmul_rate(n: int = 8192, reps: int = 20, dtype=jnp.bfloat16) -> float:
    """Dense matmul FLOP/s of this device, measured now on [n, n] x [n, n] in `dtype`."""
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = mm(a, b)
    out.block_until_ready()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def matmul_params(config: GemmaConfig) -> int:
    """Weights every token multiplies through the decoder layers (q, k, v, o, gate, up, down)."""
    attn = config.d_model * config.head_dim * (2 * config.num_heads + 2 * config.num_kv_heads)
    ffw = 3 * config.d_model * config.ffw_hidden
    return config.num_layers * (attn + ffw)


def visible_keys(config: GemmaConfig, num_tokens: int) -> int:
    """(query, key) pairs causal attention over a prompt of `num_tokens` computes, summed over
    the layers (a sliding-window layer's query sees at most `sliding_window` keys)."""
    full = num_tokens * (num_tokens + 1) // 2
    w = min(config.sliding_window, num_tokens)
    windowed = w * (w + 1) // 2 + (num_tokens - w) * w
    return sum(full if t == "global" else windowed for t in config.layer_types)


def _sum_capped(first: int, end: int, cap: int | None) -> int:
    """sum(min(c, cap) for c in range(first, end)); no cap when cap is None."""
    cap = end if cap is None else cap
    below = max(0, min(end, cap + 1) - first)  # terms c <= cap
    return below * (2 * first + below - 1) // 2 + max(0, end - first - below) * cap


@dataclasses.dataclass(frozen=True)
class RequestCost:
    """The work one request costs any engine."""

    prefill_flops: int    # prompt tokens through the layers, prefill attention, first logits
    decode_flops: int     # each later token through the layers, and its logits
    kv_read_bytes: int    # what decode attention reads

    @property
    def flops(self) -> int:
        return self.prefill_flops + self.decode_flops


def request_cost(config: GemmaConfig, num_in: int, num_out: int) -> RequestCost:
    """The fixed work of one request of `num_in` prompt and `num_out` >= 1 output tokens: the
    first output token is sampled from the prefill, each later one costs a decode step whose
    query sees the context so far (window layers at most their window)."""
    per_token = 2 * matmul_params(config)
    logits = 2 * config.vocab_size * config.d_model
    attention = 4 * config.num_heads * config.head_dim * visible_keys(config, num_in)
    decodes = num_out - 1
    kv = sum(per * _sum_capped(num_in + 1, num_in + num_out, config.window_of(group))
             for group, per in kv_bytes_per_token(config).items())
    return RequestCost(prefill_flops=per_token * num_in + attention + logits,
                       decode_flops=(per_token + logits) * decodes, kv_read_bytes=kv)


def workload_floor(config: GemmaConfig, lengths: list[tuple[int, int]], *, flops_per_s: float,
                   bytes_per_s: float, weight_bytes: int) -> dict:
    """Seconds no engine can beat on this workload (module docstring), with its parts."""
    costs = [request_cost(config, i, o) for i, o in lengths]
    flops = sum(c.flops for c in costs)
    kv_bytes = sum(c.kv_read_bytes for c in costs)
    work_s = flops / flops_per_s + kv_bytes / bytes_per_s
    serial_s = max(c.prefill_flops / flops_per_s + (o - 1) * weight_bytes / bytes_per_s
                   for c, (_, o) in zip(costs, lengths))
    floor_s = max(work_s, serial_s)
    return {"floor_s": floor_s, "work_s": work_s, "serial_s": serial_s,
            "floor_output_tokens_per_s": sum(o for _, o in lengths) / floor_s,
            "prefill_pflop": sum(c.prefill_flops for c in costs) / 1e15,
            "decode_pflop": sum(c.decode_flops for c in costs) / 1e15,
            "decode_kv_read_TB": kv_bytes / 1e12}
