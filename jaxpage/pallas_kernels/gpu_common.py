"""Building blocks shared by the Pallas GPU (Triton lowering) attention kernels.

Kernels see every array whole (no BlockSpecs) as flat 2-D row views -- q as [T*Hq, D], the KV
pages as [Hkv*P*page_size, D] -- and gather the rows they need by index, so one gather per
key block pulls several pages named by the block table. Every row gather and scatter is
masked: masked lanes neither read nor write memory, and read as 0, which is what keeps NaN in
pages a sequence does not own out of the result.

A layer's pages may come as a tuple of head shards (kv_cache.init_kv_cache), each under 4 GiB.
The Triton lowering computes a ref's offsets in 64 bits when the ref is larger, and the decode
kernel then ran 29 % slower on the H200 (benchmarks/NOTES.md, session 5). The attention kernels
take one launch per shard, all writing into one output; one launch that picked its shard per
program ran as slowly as the 64-bit one (a loop inside a branch, or masked loads of every shard:
session 9). The write kernel, which has no loop, writes every shard in one launch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxpage import compat

# Initial running max of the online softmax: finite, so a row that has seen only masked keys
# (logit -inf) gets exp(-inf - NEG_INIT) = 0 instead of exp(-inf + inf) = NaN.
NEG_INIT = -1e30
LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class AttnParams:
    """Static attention parameters of one call."""

    sm_scale: float
    soft_cap: float | None
    sliding_window: int | None
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    num_pages: int

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def group_pad(self) -> int:
        """Q heads per kv head, padded to a power of two (Triton tensor shapes)."""
        return next_power_of_2(self.group)


def as_shards(pages) -> tuple[jax.Array, ...]:
    """The head shards of a layer's pages: a tuple of [Hkv / n, P, ps, D] arrays, or one array."""
    return tuple(pages) if isinstance(pages, (tuple, list)) else (pages,)


def same_form(like, shards: Sequence[jax.Array]):
    """`shards` as a tuple if `like` (a layer's pages) is one, else its single array."""
    return tuple(shards) if isinstance(like, (tuple, list)) else shards[0]


def pages_shape(k_shards: Sequence[jax.Array]) -> tuple[int, int, int, int]:
    """[Hkv, P, page_size, D] of the cache the head shards make up together (all the same)."""
    shapes = {s.shape for s in k_shards}
    if len(shapes) != 1 or len(k_shards[0].shape) != 4:
        raise ValueError(f"head shards must be [kv_heads, pages, page_size, head_dim] arrays of "
                         f"one shape, got {sorted(shapes)}")
    heads, num_pages, page_size, head_dim = k_shards[0].shape
    return heads * len(k_shards), num_pages, page_size, head_dim


def flat_rows(pages: jax.Array) -> jax.Array:
    """The [Hkv * P * page_size, D] row view of a [Hkv, P, page_size, D] pages array."""
    return pages.reshape(-1, pages.shape[-1])


def launch_per_shard(k_pages, v_pages, launch: Callable) -> list:
    """Outputs of one launch per head shard, chained: `launch(k_rows, v_rows, head_first,
    shard_heads, outs)` gets the shard's flat pages, its first kv head and head count, and the
    previous launch's outputs (empty for the first) to alias and write its own rows into."""
    k_shards, v_shards = as_shards(k_pages), as_shards(v_pages)
    shard_heads = k_shards[0].shape[0]
    outs: list = []
    for i, (k, v) in enumerate(zip(k_shards, v_shards, strict=True)):
        outs = list(launch(flat_rows(k), flat_rows(v), i * shard_heads, shard_heads, outs))
    return outs


def on_head_shard(kv_head, heads_per_shard: int, k_refs: Sequence, v_refs: Sequence,
                  fn: Callable):
    """fn(k_ref, v_ref, head within the shard) on the head shard that holds `kv_head`, one
    branch per shard (uniform across a program). For code without loops: the loads of a loop
    inside a branch are not pipelined."""
    if len(k_refs) == 1:
        return fn(k_refs[0], v_refs[0], kv_head)
    branches = [functools.partial(fn, k, v) for k, v in zip(k_refs, v_refs, strict=True)]
    return jax.lax.switch(kv_head // heads_per_shard, branches, kv_head % heads_per_shard)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def interpret_mode() -> bool:
    """Run the kernels in Pallas interpret mode unless the default device is an NVIDIA GPU."""
    return jax.default_backend() not in ("gpu", "cuda")


def dot_precision(dtype) -> jax.lax.Precision:
    """fp32 operands get true fp32 products (not TF32); bf16/f16 use the tensor cores as is."""
    if jnp.dtype(dtype) == jnp.float32:
        return jax.lax.Precision.HIGHEST
    return jax.lax.Precision.DEFAULT


def load_rows(ref, rows: jax.Array, mask: jax.Array | None,
              cols: jax.Array | None = None) -> jax.Array:
    """ref[rows, cols] of a [N, D] ref as [len(rows), len(cols)] (cols: all D columns in order
    by default); rows where `mask` is False read 0.

    mask=None: every row is valid (a plain gather, no predicates).
    """
    if cols is None:
        cols = jnp.arange(ref.shape[1], dtype=jnp.int32)
    if mask is None:
        return compat.triton_load(ref.at[rows[:, None], cols[None, :]])
    safe = jnp.where(mask, rows, 0)
    return compat.triton_load(ref.at[safe[:, None], cols[None, :]], mask=mask[:, None], other=0)


def store_rows(ref, rows: jax.Array, value: jax.Array, mask: jax.Array) -> None:
    """ref[rows, :] = value for the rows where `mask` is True; other rows are left alone."""
    cols = jnp.arange(ref.shape[1], dtype=jnp.int32)
    # Masked lanes point past the end: nothing is written there, and under interpret mode an
    # out-of-bounds scatter lane is dropped instead of racing with a real one.
    safe = jnp.where(mask, rows, ref.shape[0])
    compat.triton_store(ref.at[safe[:, None], cols[None, :]], value.astype(ref.dtype),
                        mask=mask[:, None])


def store_vector(ref, idx: jax.Array, value: jax.Array, mask: jax.Array) -> None:
    """ref[idx] = value for the lanes where `mask` is True (1-D ref)."""
    safe = jnp.where(mask, idx, ref.shape[0])
    compat.triton_store(ref.at[safe], value.astype(ref.dtype), mask=mask)


def kv_rows(block_table_ref, seq, kv_head, tokens: jax.Array, visible: jax.Array | None,
            p: AttnParams) -> jax.Array:
    """Row of each token of sequence `seq` in the flat [Hkv*P*page_size, D] page view.

    Tokens where `visible` is False map to page 0; visible=None: all tokens are real.
    """
    if visible is None:
        page = compat.triton_load(block_table_ref.at[seq, tokens // p.page_size])
    else:
        page = compat.triton_load(
            block_table_ref.at[seq, jnp.where(visible, tokens // p.page_size, 0)],
            mask=visible, other=0)
    return (kv_head * p.num_pages + page) * p.page_size + tokens % p.page_size


def tanh(x: jax.Array) -> jax.Array:
    """fp32 tanh from one exp2 (cheaper than libdevice tanhf; absolute error ~1e-7)."""
    t = jnp.exp2((-2.0 * LOG2E) * jnp.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return jnp.where(x < 0, -y, y)


def attend_block(carry, q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array | None,
                 p: AttnParams):
    """One online-softmax step: fold keys k/values v [BK, D] into (m, l, acc) of q [M, D].

    `visible` [M, BK] (or broadcastable) says which query row sees which key (None: all of
    them, and every row has a finite logit). Statistics and
    accumulation are fp32; logits and the running max m are kept in log2 units (exp2 is one
    hardware instruction, exp is not).
    """
    m, l, acc = carry
    precision = dot_precision(q.dtype)
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)
    if p.soft_cap is None:
        s = s * (p.sm_scale * LOG2E)
    else:
        s = (p.soft_cap * LOG2E) * tanh(s * (p.sm_scale / p.soft_cap))
    if visible is not None:
        s = jnp.where(visible, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    probs = jnp.exp2(s - m_new[:, None])
    pv = jax.lax.dot_general(probs.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
    return m_new, l * alpha + probs.sum(axis=1), acc * alpha[:, None] + pv


def init_carry(rows: int, head_dim: int):
    """(running max, running sum, accumulator) before the first key block."""
    return (jnp.full((rows,), NEG_INIT, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))


def normalize(l: jax.Array, acc: jax.Array) -> jax.Array:
    """acc / l per row; rows that saw no key (l == 0) give 0."""
    return jnp.where(l[:, None] > 0, acc / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
