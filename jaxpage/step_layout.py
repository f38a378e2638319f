"""The packed step buffer: every input of one step, in one flat int32 array (one transfer).

The host fills named views of a zeroed buffer (`PackedLayout.new_buffer`); the compiled step
slices the same names back out (`PackedLayout.unpack`). Token counts are bucketed
(`token_buckets`) so a few layouts, and executables, serve every step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np


def token_buckets(max_num_batched_tokens: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest`, ending exactly at max_num_batched_tokens."""
    buckets, t = [], smallest
    while t < max_num_batched_tokens:
        buckets.append(t)
        t *= 2
    return tuple(buckets) + (max_num_batched_tokens,)


Field = tuple[str, tuple[int, ...], str]  # (name, shape, dtype name)


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Named arrays packed back to back into one flat int32 buffer (float32 fields bit-cast)."""

    fields: tuple[Field, ...]

    @functools.cached_property
    def offsets(self) -> dict[str, tuple[int, tuple[int, ...], str]]:
        """name -> (start, shape, dtype) in the flat buffer."""
        out, pos = {}, 0
        for name, shape, dtype in self.fields:
            out[name] = (pos, shape, dtype)
            pos += int(np.prod(shape))
        return out

    @functools.cached_property
    def size(self) -> int:
        return sum(int(np.prod(shape)) for _, shape, _ in self.fields)

    def unpack(self, packed: jax.Array) -> dict[str, jax.Array]:
        """Device side: static slices of the buffer, float fields bit-cast back."""
        out = {}
        for name, (start, shape, dtype) in self.offsets.items():
            x = jax.lax.slice(packed, (start,), (start + int(np.prod(shape)),)).reshape(shape)
            out[name] = x if dtype == "int32" else jax.lax.bitcast_convert_type(x, jnp.dtype(dtype))
        return out

    def new_buffer(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Host side: a zeroed buffer and writable views of every field into it."""
        buf = np.zeros(self.size, np.int32)
        views = {}
        for name, (start, shape, dtype) in self.offsets.items():
            view = buf[start:start + int(np.prod(shape))].reshape(shape)
            views[name] = view if dtype == "int32" else view.view(np.dtype(dtype))
        return buf, views


def step_fields(num_tokens: int, num_seqs: int, max_pages: int,
                groups: Seq[str]) -> tuple[Field, ...]:
    """Model inputs of one step: token_ids[T], positions[T], query_start_loc[S+1], kv_lens[S],
    logits_indices[S] (packed row each sampling row reads), num_steps[S] (a burst's steps per
    sequence) and a [S, max_pages] block table per layer group."""
    t, s = num_tokens, num_seqs
    return (("token_ids", (t,), "int32"), ("positions", (t,), "int32"),
            ("query_start_loc", (s + 1,), "int32"), ("kv_lens", (s,), "int32"),
            ("logits_indices", (s,), "int32"), ("num_steps", (s,), "int32"),
            *((f"block_table.{g}", (s, max_pages), "int32") for g in groups))
