"""Pure-JAX (XLA) ragged paged attention: gather pages, mask, soft-cap, fp32 softmax.

This is the `attention_backend="xla"` implementation and the semantic reference for the Pallas
kernels. Every backend implements the same signature:

    ragged_paged_attention(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc,
                           *, sm_scale, soft_cap, sliding_window, max_query_len) -> out

Layouts:
    q              [T, Hq, D]       new query tokens of all sequences, packed back to back
    k_pages        [Hkv, P, ps, D]  paged key cache of one layer (same for v_pages)
    kv_lens        [S]              tokens in the cache of each sequence, new ones included
    block_tables   [S, max_pages]   page ids of each sequence, logical page order
    query_start_loc[S+1]            sequence s owns q rows query_start_loc[s]:query_start_loc[s+1]
Sequence s with q_len = query_start_loc[s+1] - query_start_loc[s] has its queries at positions
kv_len - q_len ... kv_len - 1. Query i sees key j iff j <= i and (no window or i - W < j).
Padding sequences have q_len = kv_len = 0; rows past query_start_loc[S] are padding (output 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Bound on the per-chunk gather (tokens x chunk keys x kv heads x head_dim elements).
_CHUNK_ELEMENTS = 1 << 26


def token_seq_ids(query_start_loc: jax.Array, num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Sequence index of every packed token, and whether the token is real (not padding)."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    # compare_all: no device loop (XLA:GPU runs a while loop's condition on the host, which
    # would make every step wait for the one before it)
    seq = jnp.searchsorted(query_start_loc[1:], t, side="right", method="compare_all")
    seq = seq.astype(jnp.int32)
    valid = t < query_start_loc[-1]
    num_seqs = query_start_loc.shape[0] - 1
    return jnp.minimum(seq, num_seqs - 1), valid


def token_positions(query_start_loc: jax.Array, kv_lens: jax.Array,
                    num_tokens: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sequence id, absolute position, valid) of every packed token."""
    seq, valid = token_seq_ids(query_start_loc, num_tokens)
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    pos = kv_lens[seq] - q_lens[seq] + (t - query_start_loc[seq])
    return seq, jnp.where(valid, pos, 0), valid


def token_slots(query_start_loc: jax.Array, kv_lens: jax.Array, block_table: jax.Array,
                num_tokens: int, page_size: int, *, distinct_padding_from: int | None = None
                ) -> jax.Array:
    """Flat cache slot (page * page_size + offset) of every packed token.

    Padding tokens go to slot 0 (the null page), or, with `distinct_padding_from=N`, to distinct
    slots N + t past the end of the cache, so a scatter can drop them and keep indices unique.
    """
    seq, pos, valid = token_positions(query_start_loc, kv_lens, num_tokens)
    page = block_table[seq, jnp.minimum(pos // page_size, block_table.shape[1] - 1)]
    padding = 0 if distinct_padding_from is None else distinct_padding_from + jnp.arange(num_tokens)
    return jnp.where(valid, page * page_size + pos % page_size, padding).astype(jnp.int32)


def check_inputs(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc) -> None:
    """Raise ValueError naming the first argument that breaks the layouts above (for kernels
    whose own checks add what their tiling needs)."""
    if q.ndim != 3:
        raise ValueError(f"q must be [tokens, q_heads, head_dim], got shape {q.shape}")
    if k_pages.ndim != 4:
        raise ValueError(
            f"k_pages must be [kv_heads, pages, page_size, head_dim], got shape {k_pages.shape}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages shape {v_pages.shape} differs from k_pages {k_pages.shape}")
    if not q.dtype == k_pages.dtype == v_pages.dtype:
        raise ValueError(f"q, k_pages, v_pages must share a dtype, got "
                         f"{q.dtype}, {k_pages.dtype}, {v_pages.dtype}")
    num_kv_heads, _, _, head_dim = k_pages.shape
    if q.shape[2] != head_dim:
        raise ValueError(f"q head_dim {q.shape[2]} differs from the cache's {head_dim}")
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads ({num_kv_heads})")
    if block_tables.ndim != 2:
        raise ValueError(f"block_tables must be [seqs, max_pages], got shape {block_tables.shape}")
    num_seqs = block_tables.shape[0]
    if kv_lens.shape != (num_seqs,):
        raise ValueError(f"kv_lens shape {kv_lens.shape} must be ({num_seqs},) like block_tables")
    if query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"query_start_loc shape {query_start_loc.shape} must be ({num_seqs + 1},)")
    for name, a in (("kv_lens", kv_lens), ("block_tables", block_tables),
                    ("query_start_loc", query_start_loc)):
        if not jnp.issubdtype(a.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array, got {a.dtype}")


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
) -> jax.Array:
    """Attention of packed ragged queries over their sequences' pages (see module docstring)."""
    del max_query_len  # the XLA path does not specialise on it
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    max_pages = block_tables.shape[1]

    seq, pos, valid = token_positions(query_start_loc, kv_lens, num_tokens)
    kv_len = jnp.where(valid, kv_lens[seq], 0)
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32)

    per_page = max(1, num_tokens * page_size * num_kv_heads * head_dim)
    pages_per_chunk = max(1, min(max_pages, _CHUNK_ELEMENTS // per_page))
    num_chunks = -(-max_pages // pages_per_chunk)
    padded_tables = jnp.pad(block_tables, ((0, 0), (0, num_chunks * pages_per_chunk - max_pages)))
    chunk_tables = padded_tables.reshape(-1, num_chunks, pages_per_chunk).transpose(1, 0, 2)

    def step(carry, xs):
        m, l, acc = carry
        chunk_idx, table = xs  # table: [S, pages_per_chunk]
        pages = table[seq]  # [T, C]
        k = k_pages[:, pages].astype(jnp.float32)  # [Hkv, T, C, ps, D]
        v = v_pages[:, pages].astype(jnp.float32)
        k = k.reshape(num_kv_heads, num_tokens, -1, head_dim)
        v = v.reshape(num_kv_heads, num_tokens, -1, head_dim)
        key_pos = chunk_idx * pages_per_chunk * page_size + jnp.arange(k.shape[2])
        visible = (key_pos[None, :] <= pos[:, None]) & (key_pos[None, :] < kv_len[:, None])
        if sliding_window is not None:
            visible &= key_pos[None, :] > pos[:, None] - sliding_window
        s = jnp.einsum("tngd,ntkd->tngk", qg, k) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        vis = visible[:, None, None, :]
        s = jnp.where(vis, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.where(vis, jnp.exp(s - m_safe[..., None]), 0.0)
        alpha = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
        v = jnp.where(visible[None, :, :, None], v, 0.0)  # unowned slots may hold NaN
        acc = acc * alpha[..., None] + jnp.einsum("tngk,ntkd->tngd", p, v)
        return (m_new, l * alpha + p.sum(-1), acc), None

    init = (
        jnp.full((num_tokens, num_kv_heads, group), -jnp.inf, jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group), jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group, head_dim), jnp.float32),
    )
    (_, l, acc), _ = jax.lax.scan(step, init, (jnp.arange(num_chunks), chunk_tables))
    out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
