"""Ragged paged attention as a Pallas Mosaic TPU kernel (`attention_backend="pallas_tpu"`).

Same signature and semantics as `reference.ragged_paged_attention` (see its docstring). On a host
without a TPU the kernel runs in Pallas TPU interpret mode, which simulates VMEM, DMAs and
semaphores on the CPU.

Work decomposition. The packed query rows are cut into fixed blocks of `bq` rows; the grid is
(kv head, query block). One grid step computes the output of every query head that shares kv
head `h` (GQA: the `group` q heads are stacked into one [group * bq, D] matmul operand) for rows
r0 .. r0+bq-1. Those rows may belong to several sequences (a decode batch puts bq sequences in
one block; a long prefill chunk spans several blocks), so the step walks the sequences that own
rows of the block -- their range is precomputed per block in XLA and scalar-prefetched -- and, for
each, the kv blocks of `pages_per_block` pages that its rows can see: from the page holding the
first key inside the sliding window of the block's first row, to the page holding the last
row's own position. Pages outside that span are never copied. Every page is one fixed-size DMA
(HBM [Hkv, P, ps, D] -> VMEM) whose page id comes from the scalar-prefetched block table; the
copies of a kv block land in one of two VMEM slots, and the next kv block (of this sequence or
of the next one) is in flight while the current one is computed. Rows of other sequences,
keys past a row's position, keys outside its window and the stale or NaN tail of a block are
masked with selects (V rows are zeroed too, since 0 * NaN is NaN). Softmax statistics are kept
online in fp32 per (row, head) in VMEM scratch; rows owned by no sequence come out as zeros.

Each grid step starts and drains its own copies, so both grid axes are independent ("parallel":
a megacore chip may split them between its cores); the price is one exposed page-block copy at
the start of every step. The flattened block table lives in SMEM, which bounds
sequences x max_pages (about 256K entries on current chips).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxpage import compat
from jaxpage.pallas_kernels import reference

_MAX_QUERIES_PER_BLOCK = 128
_MAX_ROWS_PER_BLOCK = 512  # q heads of one kv head x query rows in one matmul operand
_KEYS_PER_BLOCK = 256


def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    query_start_loc: jax.Array,
    *,
    sm_scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    max_query_len: int | None = None,
    pages_per_block: int | None = None,
    queries_per_block: int | None = None,
    interpret: pltpu.InterpretParams | bool | None = None,
) -> jax.Array:
    """Attention of packed ragged queries over their sequences' pages (see the module docstring).

    `pages_per_block` / `queries_per_block` override the kv / query tile sizes. `interpret`:
    None runs the compiled kernel on a TPU and TPU interpret mode elsewhere; True / an
    `InterpretParams` forces interpret mode, False forces compilation.
    """
    _check_inputs(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc,
                  soft_cap=soft_cap, sliding_window=sliding_window, max_query_len=max_query_len)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    max_pages = block_tables.shape[1]
    bq = queries_per_block
    if bq is None:
        bq = _default_queries_per_block(num_tokens, group, max_query_len, q.dtype)
    ppb = pages_per_block
    if ppb is None:
        ppb = max(1, min(max_pages, _KEYS_PER_BLOCK // page_size))
    _check_tiles(bq, ppb, q.dtype)
    if num_tokens == 0:
        return jnp.zeros_like(q)

    num_q_blocks = -(-num_tokens // bq)
    padded = num_q_blocks * bq
    # [T, Hq, D] -> [Hkv, group, T_padded, D]: the q heads of one kv head form one tile.
    q_tiles = jnp.pad(q, ((0, padded - num_tokens), (0, 0), (0, 0)))
    q_tiles = q_tiles.reshape(padded, num_kv_heads, group, head_dim).transpose(1, 2, 0, 3)
    query_start_loc = query_start_loc.astype(jnp.int32)
    first_seq, end_seq = _block_sequence_ranges(query_start_loc, num_q_blocks, bq)

    kernel = functools.partial(
        _kernel, sm_scale=float(sm_scale), soft_cap=soft_cap, sliding_window=sliding_window,
        max_pages=max_pages)
    tile = pl.BlockSpec((None, group, bq, head_dim), lambda h, i, *_: (h, 0, i, 0))
    kv_buffer = pltpu.VMEM((2, ppb, page_size, head_dim), k_pages.dtype)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(num_kv_heads, num_q_blocks),
        in_specs=[tile, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=tile,
        scratch_shapes=[
            kv_buffer, kv_buffer,
            pltpu.SemaphoreType.DMA((2, 2)),  # (k or v, buffer slot)
            pltpu.VMEM((group * bq, 1), jnp.float32),  # running max
            pltpu.VMEM((group * bq, 1), jnp.float32),  # running denominator
            pltpu.VMEM((group * bq, head_dim), jnp.float32),  # running numerator
        ],
    )
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    if interpret is True:
        interpret = pltpu.InterpretParams()
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q_tiles.shape, q.dtype),
        compiler_params=compat.tpu_compiler_params(("parallel", "parallel")),
        interpret=interpret,
    )(first_seq, end_seq, query_start_loc, kv_lens.astype(jnp.int32),
      block_tables.astype(jnp.int32).reshape(-1), q_tiles, k_pages, v_pages)
    out = out.transpose(2, 0, 1, 3).reshape(padded, num_q_heads, head_dim)
    return out[:num_tokens]


def _block_sequence_ranges(query_start_loc: jax.Array, num_blocks: int,
                           bq: int) -> tuple[jax.Array, jax.Array]:
    """Per query block, the sequences [first, end) that may own rows of it."""
    starts, ends = query_start_loc[:-1], query_start_loc[1:]
    block_start = jnp.arange(num_blocks, dtype=jnp.int32) * bq
    block_end = jnp.minimum(block_start + bq, query_start_loc[-1])
    first = jnp.searchsorted(ends, block_start, side="right")
    end = jnp.searchsorted(starts, block_end, side="left")
    return first.astype(jnp.int32), end.astype(jnp.int32)


class _Span(NamedTuple):
    """Rows of one sequence inside the current query block, and the pages they can see."""

    seq: jax.Array          # sequence index
    row_lo: jax.Array       # first packed row of the sequence inside the block
    row_hi: jax.Array       # one past its last row inside the block
    first_pos: jax.Array    # position of packed row r of the sequence is r + first_pos
    first_page: jax.Array   # logical page holding the first key any of these rows can see
    last_page: jax.Array    # logical page holding the last such key (the last row's own)
    num_blocks: jax.Array   # kv blocks of pages_per_block pages from first_page to last_page


def _kernel(first_seq_ref, end_seq_ref, qsl_ref, kv_lens_ref, tables_ref,  # scalar prefetch
            q_ref, k_hbm, v_hbm,  # inputs: q tile in VMEM, kv pages in HBM
            o_ref,  # output tile
            k_buf, v_buf, sems, m_ref, l_ref, acc_ref,  # scratch
            *, sm_scale: float, soft_cap: float | None, sliding_window: int | None,
            max_pages: int):
    head, q_block = pl.program_id(0), pl.program_id(1)
    group, bq, head_dim = q_ref.shape
    _, ppb, page_size, _ = k_buf.shape
    block_keys = ppb * page_size
    r0 = q_block * bq
    end = end_seq_ref[q_block]
    last_seq = kv_lens_ref.shape[0] - 1

    def span(seq) -> _Span:
        q_start, q_end = qsl_ref[seq], qsl_ref[seq + 1]
        row_lo, row_hi = jnp.maximum(r0, q_start), jnp.minimum(r0 + bq, q_end)
        first_pos = kv_lens_ref[seq] - q_end
        first_page = jnp.int32(0)
        if sliding_window is not None:
            first_page = lax.div(jnp.maximum(first_pos + row_lo - sliding_window + 1, 0), page_size)
        last_page = lax.div(first_pos + row_hi - 1, page_size)
        num_blocks = lax.div(last_page - first_page + ppb, ppb)
        return _Span(seq, row_lo, row_hi, first_pos, first_page, last_page, num_blocks)

    def next_busy_seq(seq):
        """The first sequence from `seq` on with query rows here (sequences in [first, end) that
        have any query rows all have rows in this block), or `end`."""
        def idle(s):
            s = jnp.minimum(s, last_seq)  # `&` does not short-circuit: keep the reads in bounds
            return qsl_ref[s] == qsl_ref[s + 1]
        return lax.while_loop(lambda s: (s < end) & idle(s), lambda s: s + 1, seq)

    def start_copies(sp: _Span, blk, slot):
        for i in range(ppb):
            page = sp.first_page + blk * ppb + i

            @pl.when(page <= sp.last_page)
            def _():
                page_id = tables_ref[sp.seq * max_pages + jnp.minimum(page, max_pages - 1)]
                pltpu.make_async_copy(k_hbm.at[head, page_id], k_buf.at[slot, i],
                                      sems.at[0, slot]).start()
                pltpu.make_async_copy(v_hbm.at[head, page_id], v_buf.at[slot, i],
                                      sems.at[1, slot]).start()

    def wait_copies(sp: _Span, blk, slot):
        for i in range(ppb):
            @pl.when(sp.first_page + blk * ppb + i <= sp.last_page)
            def _():
                # A wait needs only the destination, semaphore and size: any page is a source.
                pltpu.make_async_copy(k_hbm.at[head, 0], k_buf.at[slot, i], sems.at[0, slot]).wait()
                pltpu.make_async_copy(v_hbm.at[head, 0], v_buf.at[slot, i], sems.at[1, slot]).wait()

    def compute(sp: _Span, blk, slot):
        key0 = (sp.first_page + blk * ppb) * page_size
        q = q_ref[...].reshape(group * bq, head_dim)
        k = k_buf[slot].reshape(block_keys, head_dim)
        v = v_buf[slot].reshape(block_keys, head_dim)
        precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        row = r0 + lax.broadcasted_iota(jnp.int32, (bq, block_keys), 0)
        key = key0 + lax.broadcasted_iota(jnp.int32, (bq, block_keys), 1)
        pos = row + sp.first_pos
        visible = (row >= sp.row_lo) & (row < sp.row_hi) & (key <= pos)
        if sliding_window is not None:
            visible &= key > pos - sliding_window
        s = s.reshape(group, bq, block_keys)  # the same mask for every q head of the group
        s = jnp.where(visible[None], s, -jnp.inf).reshape(group * bq, block_keys)

        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe)
        alpha = jnp.exp(m_prev - m_safe)
        # Keys past the last row's position (page tails, pages not copied) may hold NaN.
        key_col = key0 + lax.broadcasted_iota(jnp.int32, (block_keys, 1), 0)
        v = jnp.where(key_col <= sp.first_pos + sp.row_hi - 1, v, jnp.zeros_like(v))
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)
        m_ref[...] = m_new
        l_ref[...] = alpha * l_ref[...] + p.sum(axis=1, keepdims=True)
        acc_ref[...] = alpha * acc_ref[...] + pv

    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    seq0 = next_busy_seq(first_seq_ref[q_block])

    @pl.when(seq0 < end)
    def _():
        start_copies(span(seq0), 0, 0)

    def seq_body(carry):
        seq, step = carry
        sp = span(seq)
        following = next_busy_seq(seq + 1)
        sp_following = span(jnp.minimum(following, last_seq))

        def block_body(blk, step):
            slot = lax.rem(step, 2)
            wait_copies(sp, blk, slot)
            # Prefetch the next kv block: this sequence's, else the following sequence's first.
            last = blk + 1 == sp.num_blocks
            nxt = jax.tree.map(lambda f, c: jnp.where(last, f, c), sp_following, sp)

            @pl.when(jnp.logical_not(last) | (following < end))
            def _():
                start_copies(nxt, jnp.where(last, 0, blk + 1), 1 - slot)

            compute(sp, blk, slot)
            return step + 1

        return following, lax.fori_loop(0, sp.num_blocks, block_body, step)

    lax.while_loop(lambda c: c[0] < end, seq_body, (seq0, jnp.int32(0)))

    l = l_ref[...]
    out = jnp.where(l > 0, acc_ref[...] / jnp.where(l > 0, l, 1.0), 0.0)
    o_ref[...] = out.reshape(group, bq, head_dim).astype(o_ref.dtype)


def _default_queries_per_block(num_tokens: int, group: int, max_query_len: int | None,
                               dtype) -> int:
    sublanes = 32 // jnp.dtype(dtype).itemsize
    longest = num_tokens if max_query_len is None else max(1, min(max_query_len, num_tokens))
    cap = max(sublanes, min(_MAX_QUERIES_PER_BLOCK, _MAX_ROWS_PER_BLOCK // group))
    return min(-(-longest // sublanes) * sublanes, cap // sublanes * sublanes)


def _check_tiles(bq: int, ppb: int, dtype) -> None:
    sublanes = 32 // jnp.dtype(dtype).itemsize
    if bq < 1 or bq % sublanes:
        raise ValueError(f"queries_per_block must be a positive multiple of {sublanes} for "
                         f"{jnp.dtype(dtype)}, got {bq}")
    if ppb < 1:
        raise ValueError(f"pages_per_block must be positive, got {ppb}")


def _check_inputs(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc, *,
                  soft_cap, sliding_window, max_query_len) -> None:
    """Raise ValueError naming the first malformed argument."""
    reference.check_inputs(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc)
    page_size = k_pages.shape[2]
    sublanes = 32 // k_pages.dtype.itemsize  # rows of one native (sublane x lane) VMEM tile
    if page_size % sublanes:
        raise ValueError(f"page_size must be a multiple of {sublanes} for {k_pages.dtype}, "
                         f"got {page_size}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap must be positive or None, got {soft_cap}")
    if sliding_window is not None and not sliding_window > 0:
        raise ValueError(f"sliding_window must be positive or None, got {sliding_window}")
    if max_query_len is not None and max_query_len < 1:
        raise ValueError(f"max_query_len must be positive or None, got {max_query_len}")
