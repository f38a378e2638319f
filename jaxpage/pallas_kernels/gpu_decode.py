"""Decode path of the GPU kernel: no sequence has more than one new token (split-KV decoding).

Grid (sequence, kv head, kv split). A program takes the single query token of its sequence
with all q heads of its kv head (padded to a dot-friendly tile), walks its share of the
sequence's visible pages, `block_k` tokens (several pages) per step, and keeps fp32 online
softmax statistics. With one split it writes the normalized output; with several, each split
writes unnormalized partials (acc, running max, running sum) that `combine_splits` merges, so a
small batch of long sequences still fills the GPU. Pages split into head shards take one launch
per shard, each writing its heads' rows of the same output buffers. Outputs are indexed by the
query's packed token row, so the merge is the only work after the kernel (rows of padding
tokens, which no program writes, are zeroed in the same pass).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxpage import compat
from jaxpage.pallas_kernels import gpu_common as gc


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Tile and launch parameters of the decode kernel."""

    block_k: int = 64        # keys per step (a power of two; may span several pages)
    num_splits: int = 1      # kv splits per (sequence, kv head)
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.block_k < 16 or self.block_k & (self.block_k - 1):
            raise ValueError(
                f"DecodeConfig.block_k must be a power of two >= 16, got {self.block_k}")
        if self.num_splits < 1:
            raise ValueError(f"DecodeConfig.num_splits must be >= 1, got {self.num_splits}")


def tile_rows(p: gc.AttnParams) -> int:
    """Rows of the q tile: the q heads of one kv head, padded to >= 16 (tensor-core dot minimum)."""
    return max(16, p.group_pad)


def _decode_kernel(qsl_ref, kv_lens_ref, bt_ref, q_ref, k_ref, v_ref, *refs,
                   p: gc.AttnParams, cfg: DecodeConfig, head_first: int):
    out_refs = refs[-_num_outputs(cfg):]  # after the previous shard's outputs, aliased to them
    seq, shard_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kv_head = head_first + shard_head
    q_row = qsl_ref[seq]
    has_query = qsl_ref[seq + 1] > q_row
    hi = jnp.where(has_query, kv_lens_ref[seq], 0)  # the query at position hi-1 sees keys < hi
    lo = jnp.maximum(hi - p.sliding_window, 0) if p.sliding_window is not None else 0

    # Skip whole pages below the window, then split the remaining key blocks evenly.
    first_token = (lo // p.page_size) * p.page_size
    num_blocks = pl.cdiv(hi - first_token, cfg.block_k)
    per_split = pl.cdiv(num_blocks, cfg.num_splits)
    block_lo = split * per_split
    block_hi = jnp.minimum(block_lo + per_split, num_blocks)

    g = jnp.arange(tile_rows(p), dtype=jnp.int32)
    head_ok = g < p.group
    heads = kv_head * p.group + g
    q = gc.load_rows(q_ref, q_row * p.num_q_heads + heads, head_ok & has_query)

    def load_block(b):
        tokens = first_token + b * cfg.block_k + jnp.arange(cfg.block_k, dtype=jnp.int32)
        visible = (tokens >= lo) & (tokens < hi)
        rows = gc.kv_rows(bt_ref, seq, shard_head, tokens, visible, p)
        return gc.load_rows(k_ref, rows, visible), gc.load_rows(v_ref, rows, visible), visible

    def body(b, carry):
        k, v, visible = load_block(b)
        return gc.attend_block(carry, q, k, v, visible[None, :], p)

    m, l, acc = jax.lax.fori_loop(block_lo, block_hi, body, gc.init_carry(tile_rows(p), p.head_dim))

    # A sequence without a query owns no row (its q_row is the next sequence's): store nothing.
    store = head_ok & has_query
    if cfg.num_splits == 1:
        (o_ref,) = out_refs
        gc.store_rows(o_ref, q_row * p.num_q_heads + heads, gc.normalize(l, acc), store)
    else:
        o_ref, m_ref, l_ref = out_refs
        rows = (q_row * cfg.num_splits + split) * p.num_q_heads + heads
        gc.store_rows(o_ref, rows, acc, store)
        gc.store_vector(m_ref, rows, m, store)
        gc.store_vector(l_ref, rows, l, store)


def _num_outputs(cfg: DecodeConfig) -> int:
    return 1 if cfg.num_splits == 1 else 3  # the output, or partials (acc, max, sum)


def combine_splits(o: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Merge per-split partials o [T, splits, Hq, D], m/l [T, splits, Hq] into [T, Hq, D].

    m is the running max in log2 units (see gpu_common.attend_block).
    """
    m_max = m.max(axis=1, keepdims=True)
    w = jnp.exp2(m - m_max)
    l_sum = (l * w).sum(axis=1)
    o_sum = (o * w[..., None]).sum(axis=1)
    return jnp.where(l_sum[..., None] > 0, o_sum / jnp.where(l_sum > 0, l_sum, 1.0)[..., None], 0.0)


def decode_attention(q: jax.Array, k_pages, v_pages, kv_lens: jax.Array,
                     block_tables: jax.Array, query_start_loc: jax.Array, p: gc.AttnParams,
                     cfg: DecodeConfig, interpret: bool) -> jax.Array:
    """Attention for a batch where no sequence has more than one new token; returns [T, Hq, D].
    The pages are arrays or tuples of head shards (gpu_common.as_shards)."""
    num_tokens = q.shape[0]
    num_seqs = kv_lens.shape[0]
    rows = num_tokens * cfg.num_splits * p.num_q_heads
    if cfg.num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((rows, p.head_dim), q.dtype)]
    else:
        out_shape = [jax.ShapeDtypeStruct((rows, p.head_dim), jnp.float32),
                     jax.ShapeDtypeStruct((rows,), jnp.float32),
                     jax.ShapeDtypeStruct((rows,), jnp.float32)]

    def launch(k_rows, v_rows, head_first: int, shard_heads: int, outs: list):
        return pl.pallas_call(
            functools.partial(_decode_kernel, p=p, cfg=cfg, head_first=head_first),
            grid=(num_seqs, shard_heads, cfg.num_splits),
            out_shape=out_shape,
            input_output_aliases={6 + j: j for j in range(len(outs))},
            compiler_params=compat.triton_compiler_params(num_warps=cfg.num_warps,
                                                          num_stages=cfg.num_stages),
            interpret=interpret,
            name=f"jaxpage_decode_bk{cfg.block_k}_s{cfg.num_splits}",
        )(query_start_loc, kv_lens, block_tables, q.reshape(-1, p.head_dim), k_rows, v_rows,
          *outs)

    outs = gc.launch_per_shard(k_pages, v_pages, launch)
    if cfg.num_splits == 1:
        out = outs[0].reshape(q.shape)
    else:
        o, m, l = outs
        shape = (num_tokens, cfg.num_splits, p.num_q_heads)
        out = combine_splits(o.reshape(*shape, p.head_dim), m.reshape(shape), l.reshape(shape))
    # Rows past the last sequence's token are padding that no program wrote.
    written = jnp.arange(num_tokens) < query_start_loc[num_seqs]
    return jnp.where(written[:, None, None], out, 0).astype(q.dtype)
