"""Prefill / mixed path of the GPU kernel: query tiles over the packed rows of each sequence.

The packed rows are cut into tiles of `block_q` rows that never straddle two sequences (a
schedule computed on device before the launch); rows past the last sequence form one more
"padding" segment whose tiles write zeros. Grid (tile, kv head): a program stacks its rows'
q heads of one kv head into an M = block_q * group_pad tile and walks only the key blocks that
some row of the tile can see -- pages below the sliding window and beyond the causal edge are
never loaded.
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
class PrefillConfig:
    """Tile and launch parameters of the prefill kernel."""

    block_m: int = 64    # rows of the q tile: block_q tokens x group_pad heads
    block_k: int = 64    # keys per step
    num_warps: int = 4
    num_stages: int = 2
    # Run the key blocks every row sees whole in a loop of their own with no masks. Off by
    # default: on the H200 it cost 45 % at D=256 (three pipelined loops, shared memory for each)
    # and gained 3.5 % at D=128 (benchmarks/NOTES.md, run 3).
    unmasked_full_blocks: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_k"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"PrefillConfig.{name} must be a power of two >= 16, got {size}")


def tile_schedule(query_start_loc: jax.Array, kv_lens: jax.Array, num_tokens: int, block_q: int,
                  max_query_len: int | None) -> tuple[jax.Array, int]:
    """Per tile [5, N] int32: (sequence, first row, rows, position of first row, kv_len).

    Segments are the S sequences plus the padding rows after them; each segment is cut into
    ceil(len / block_q) tiles. N is a static bound on the tile count; tiles past the real
    count have 0 rows.
    """
    num_seqs = kv_lens.shape[0]
    bound = num_tokens // block_q + num_seqs + 1
    if max_query_len is not None:
        per_seq = pl.cdiv(max_query_len, block_q)
        bound = min(bound, num_seqs * per_seq + pl.cdiv(num_tokens, block_q))
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    seg_len = jnp.concatenate([q_lens, (num_tokens - query_start_loc[-1])[None]])
    seg_kv = jnp.concatenate([kv_lens, jnp.zeros((1,), kv_lens.dtype)])
    seg_q = jnp.concatenate([q_lens, jnp.zeros((1,), q_lens.dtype)])
    tiles = (seg_len + block_q - 1) // block_q
    tile_end = jnp.cumsum(tiles)
    i = jnp.arange(bound, dtype=jnp.int32)
    seg = jnp.searchsorted(tile_end, i, side="right", method="compare_all")  # no device loop
    seg = jnp.minimum(seg, num_seqs).astype(jnp.int32)
    local = i - (tile_end[seg] - tiles[seg])
    nrows = jnp.where(i < tile_end[-1], jnp.clip(seg_len[seg] - local * block_q, 0, block_q), 0)
    row0 = query_start_loc[seg] + local * block_q
    qpos0 = seg_kv[seg] - seg_q[seg] + local * block_q
    seq = jnp.minimum(seg, num_seqs - 1)
    sched = jnp.stack([seq, row0, nrows, qpos0, seg_kv[seg]]).astype(jnp.int32)
    return sched, bound


def _prefill_kernel(sched_ref, bt_ref, q_ref, k_ref, v_ref, *refs, p: gc.AttnParams,
                    cfg: PrefillConfig, head_first: int):
    o_ref = refs[-1]  # after the aliased output of the previous head shard's launch, if any
    tile, shard_head = pl.program_id(0), pl.program_id(1)
    kv_head = head_first + shard_head
    seq, row0, nrows = sched_ref[0, tile], sched_ref[1, tile], sched_ref[2, tile]
    qpos0, kv_len = sched_ref[3, tile], sched_ref[4, tile]

    m_idx = jnp.arange(cfg.block_m, dtype=jnp.int32)
    r, g = m_idx // p.group_pad, m_idx % p.group_pad
    row_ok = (r < nrows) & (g < p.group)
    q_rows = (row0 + r) * p.num_q_heads + kv_head * p.group + g
    q = gc.load_rows(q_ref, q_rows, row_ok & (kv_len > 0))
    qpos = qpos0 + r

    # Keys some row of the tile sees: [lo, hi), lo rounded down to a page start.
    hi = jnp.where(nrows > 0, jnp.minimum(kv_len, qpos0 + nrows), 0)
    lo = jnp.maximum(qpos0 - p.sliding_window + 1, 0) if p.sliding_window is not None else 0
    first_token = (lo // p.page_size) * p.page_size
    num_blocks = jnp.maximum(pl.cdiv(hi - first_token, cfg.block_k), 0)

    def tokens_of(b):
        return first_token + b * cfg.block_k + jnp.arange(cfg.block_k, dtype=jnp.int32)

    def masked_body(b, carry):
        tokens = tokens_of(b)
        in_range = tokens < hi
        rows = gc.kv_rows(bt_ref, seq, shard_head, tokens, in_range, p)
        k = gc.load_rows(k_ref, rows, in_range)
        v = gc.load_rows(v_ref, rows, in_range)
        visible = (tokens[None, :] <= qpos[:, None]) & in_range[None, :]
        if p.sliding_window is not None:
            visible &= tokens[None, :] > qpos[:, None] - p.sliding_window
        return gc.attend_block(carry, q, k, v, visible, p)

    def full_body(b, carry):
        rows = gc.kv_rows(bt_ref, seq, shard_head, tokens_of(b), None, p)
        k, v = gc.load_rows(k_ref, rows, None), gc.load_rows(v_ref, rows, None)
        return gc.attend_block(carry, q, k, v, None, p)

    init = gc.init_carry(cfg.block_m, p.head_dim)
    if not cfg.unmasked_full_blocks:
        _, l, acc = jax.lax.fori_loop(0, num_blocks, masked_body, init)
    else:
        # Blocks [full_lo, full_hi) are seen whole by every row: at or before the first row's
        # causal edge and after the last row's window edge. They need no mask at all.
        full_hi = jnp.clip((qpos0 + 1 - first_token) // cfg.block_k, 0, num_blocks)
        full_lo = 0
        if p.sliding_window is not None:
            window_start = jnp.maximum(qpos0 + nrows - p.sliding_window - first_token, 0)
            full_lo = jnp.minimum(pl.cdiv(window_start, cfg.block_k), full_hi)
        carry = jax.lax.fori_loop(0, full_lo, masked_body, init)
        carry = jax.lax.fori_loop(full_lo, full_hi, full_body, carry)
        _, l, acc = jax.lax.fori_loop(full_hi, num_blocks, masked_body, carry)
    gc.store_rows(o_ref, q_rows, gc.normalize(l, acc), row_ok)


def prefill_attention(q: jax.Array, k_pages, v_pages, kv_lens: jax.Array,
                      block_tables: jax.Array, query_start_loc: jax.Array, p: gc.AttnParams,
                      cfg: PrefillConfig, max_query_len: int | None,
                      interpret: bool) -> jax.Array:
    """Attention for any ragged batch (prefill chunks and decode tokens); returns [T, Hq, D].
    The pages are arrays or tuples of head shards (gpu_common.as_shards): one launch per shard,
    each writing its heads' rows of the same output."""
    if cfg.block_m < max(16, p.group_pad):
        raise ValueError(f"prefill block_m={cfg.block_m} must be >= 16 and >= the q heads per kv "
                         f"head rounded up to a power of two ({p.group_pad})")
    num_tokens = q.shape[0]
    block_q = cfg.block_m // p.group_pad
    sched, num_tiles = tile_schedule(query_start_loc, kv_lens, num_tokens, block_q, max_query_len)

    def launch(k_rows, v_rows, head_first: int, shard_heads: int, outs: list):
        return [pl.pallas_call(
            functools.partial(_prefill_kernel, p=p, cfg=cfg, head_first=head_first),
            grid=(num_tiles, shard_heads),
            out_shape=jax.ShapeDtypeStruct((num_tokens * p.num_q_heads, p.head_dim), q.dtype),
            input_output_aliases={5: 0} if outs else {},
            compiler_params=compat.triton_compiler_params(num_warps=cfg.num_warps,
                                                          num_stages=cfg.num_stages),
            interpret=interpret,
            name=f"jaxpage_prefill_m{cfg.block_m}_bk{cfg.block_k}",
        )(sched, block_tables, q.reshape(-1, p.head_dim), k_rows, v_rows, *outs)]

    return gc.launch_per_shard(k_pages, v_pages, launch)[0].reshape(q.shape)
