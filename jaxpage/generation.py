"""`generate`: pure, jit-compatible batched generation for notebooks and training loops.

No engine, no host loop: the batch gets its own paged KV cache (a contiguous run of pages per
sequence), the ragged prompts are prefilled in one model call, and a `lax.while_loop` decodes one
token per sequence per step with the on-device sampler until every row has hit eos or
`max_new_tokens`. Shapes are static, so the whole call compiles once per shape.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpage import sampler
from jaxpage.attention import AttentionMetadata, max_cache_array_elements, resolve_backend
from jaxpage.kv_cache import NULL_PAGE, init_kv_cache
from jaxpage.pallas_kernels.reference import token_positions


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """tokens i32[B, max_new_tokens] (pad_id after a row's eos); lengths i32[B] (eos included)."""

    tokens: jax.Array
    lengths: jax.Array


def generate(
    model: nnx.Module | tuple[nnx.GraphDef, nnx.State],
    prompt_tokens: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    prompt_lengths: jax.Array | None = None,
    temperature: float | jax.Array = 0.0,
    top_k: int | jax.Array = 0,
    top_p: float | jax.Array = 1.0,
    min_p: float | jax.Array = 0.0,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int = 0,
    page_size: int = 16,
    attention_backend: str = "xla",
) -> GenerateOutput:
    """Generate up to `max_new_tokens` tokens after each prompt.

    model: a Gemma nnx Module, or its (graphdef, state) from nnx.split.
    prompt_tokens: i32[B, L], right-padded; prompt_lengths: i32[B] in [1, L] (default: all L).
    key: a PRNG key (typed, jax.random.key); the same key gives the same tokens. Row b's token at
        step i is drawn with fold_in(split(key, B)[b], i).
    temperature 0 is greedy; top_k 0 and top_p 1 are off; min_p 0 is off (vLLM semantics, see
        jaxpage.sampler). Sampling settings may be traced; top_k/top_p that are not concrete
        switch on the (exact, sorting) filter path.
    eos_id: id(s) that end a row (kept as its last token); later tokens are pad_id.
    """
    graphdef, state = _split(model)
    prompt_tokens = jnp.asarray(prompt_tokens)
    if prompt_tokens.ndim != 2 or not jnp.issubdtype(prompt_tokens.dtype, jnp.integer):
        raise ValueError(f"prompt_tokens must be an integer array [batch, length], got "
                         f"{prompt_tokens.dtype}{list(prompt_tokens.shape)}")
    batch, length = prompt_tokens.shape
    if batch < 1 or length < 1:
        raise ValueError(f"prompt_tokens must have a non-empty batch and length, got "
                         f"{list(prompt_tokens.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    if prompt_lengths is None:
        prompt_lengths = jnp.full((batch,), length, jnp.int32)
    prompt_lengths = jnp.asarray(prompt_lengths)
    if prompt_lengths.shape != (batch,):
        raise ValueError(f"prompt_lengths must have shape [{batch}], got "
                         f"{list(prompt_lengths.shape)}")
    concrete = _concrete(prompt_lengths)
    if concrete is not None and not ((concrete >= 1) & (concrete <= length)).all():
        raise ValueError(f"prompt_lengths must be in [1, {length}], got {concrete.tolist()}")
    _check_sampling(temperature, top_k, top_p, min_p)
    eos_ids = _eos_tuple(eos_id)

    settings = {name: jnp.full((batch,), value, dtype) for name, value, dtype in (
        ("temperature", temperature, jnp.float32), ("min_p", min_p, jnp.float32),
        ("top_k", top_k, jnp.int32), ("top_p", top_p, jnp.float32))}
    filtering = not (_concrete(top_k) == 0 and _concrete(top_p) == 1.0)
    return _generate(graphdef, state, prompt_tokens.astype(jnp.int32),
                     prompt_lengths.astype(jnp.int32), key, settings,
                     max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=int(pad_id),
                     page_size=page_size, backend=resolve_backend(attention_backend),
                     filtering=filtering)


@functools.partial(jax.jit, static_argnums=0, static_argnames=(
    "max_new_tokens", "eos_ids", "pad_id", "page_size", "backend", "filtering"))
def _generate(graphdef, state, prompt_tokens, prompt_lengths, key, settings, *, max_new_tokens,
              eos_ids, pad_id, page_size, backend, filtering) -> GenerateOutput:
    batch, length = prompt_tokens.shape
    model = nnx.merge(graphdef, state)
    config = model.config
    # Sequence b owns pages 1 + b * pages_per_seq ...; the last sampled token is never written.
    pages_per_seq = -(-(length + max_new_tokens - 1) // page_size)
    tables = NULL_PAGE + 1 + jnp.arange(batch * pages_per_seq, dtype=jnp.int32).reshape(
        batch, pages_per_seq)
    block_tables = {group: tables for group in config.layer_groups}
    caches = init_kv_cache(config, {g: 1 + batch * pages_per_seq for g in config.layer_groups},
                           page_size, model.embedder.embedding[...].dtype,
                           max_array_elements=max_cache_array_elements(backend))

    plan = sampler.SamplerPlan(num_rows=batch, filtering=filtering)
    row_keys = jax.random.split(key, batch)

    def sample(logits, step):
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
        return sampler.sample_with_keys(logits, settings, plan, keys).token_ids

    def is_eos(tokens):
        return functools.reduce(jnp.logical_or, [tokens == e for e in eos_ids],
                                jnp.zeros(tokens.shape, jnp.bool_))

    # Prefill: every prompt packed back to back in one ragged call.
    query_start = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(prompt_lengths)])
    seq, pos, valid = token_positions(query_start, prompt_lengths, batch * length)
    packed = jnp.where(valid, prompt_tokens[seq, pos], pad_id)
    metadata = AttentionMetadata(query_start, prompt_lengths, block_tables, backend, length)
    hidden, caches = model(packed, pos, caches, metadata)
    first = sample(model.logits(hidden[query_start[1:] - 1]), 0)

    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = is_eos(first)
    num_generated = jnp.ones((batch,), jnp.int32)

    def keep_going(carry):
        step, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode(carry):
        step, last, tokens, done, num_generated, caches = carry
        model = nnx.merge(graphdef, state)
        metadata = AttentionMetadata(jnp.arange(batch + 1, dtype=jnp.int32),
                                     prompt_lengths + step, block_tables, backend, 1)
        hidden, caches = model(last, prompt_lengths + step - 1, caches, metadata)
        new = jnp.where(done, pad_id, sample(model.logits(hidden), step))
        tokens = jax.lax.dynamic_update_slice(tokens, new[:, None], (0, step))
        num_generated = num_generated + ~done
        return step + 1, new, tokens, done | is_eos(new), num_generated, caches

    init = (jnp.int32(1), first, tokens, done, num_generated, caches)
    _, _, tokens, _, num_generated, _ = jax.lax.while_loop(keep_going, decode, init)
    return GenerateOutput(tokens, num_generated)


def _split(model) -> tuple[nnx.GraphDef, nnx.State]:
    if isinstance(model, nnx.Module):
        return nnx.split(model)
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nnx.GraphDef):
        return model
    raise TypeError(f"model must be an nnx Module or a (graphdef, state) pair from nnx.split, "
                    f"got {type(model).__name__}")


def _concrete(value) -> np.ndarray | None:
    """The value as numpy if it is known at trace time, else None."""
    try:
        return np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_sampling(temperature, top_k, top_p, min_p) -> None:
    checks = (("temperature", temperature, lambda v: v >= 0, "must be non-negative"),
              ("top_k", top_k, lambda v: v >= 0, "must be 0 (off) or positive"),
              ("top_p", top_p, lambda v: (v > 0) & (v <= 1), "must be in (0, 1]"),
              ("min_p", min_p, lambda v: (v >= 0) & (v <= 1), "must be in [0, 1]"))
    for name, value, ok, why in checks:
        concrete = _concrete(value)
        if concrete is not None and (concrete.ndim or not ok(concrete)):
            raise ValueError(f"{name} {why} (a scalar), got {value!r}")


def _eos_tuple(eos_id) -> tuple[int, ...]:
    if eos_id is None:
        return ()
    ids = (eos_id,) if isinstance(eos_id, (int, np.integer)) else tuple(eos_id)
    if not all(isinstance(i, (int, np.integer)) and i >= 0 for i in ids):
        raise ValueError(f"eos_id must be None, a token id or a sequence of token ids, got "
                         f"{eos_id!r}")
    return tuple(int(i) for i in ids)
