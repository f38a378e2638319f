"""Random ragged paged-attention batches and a plain float64 reference, shared by kernel tests."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class RaggedCase:
    """One ragged batch: inputs of `ragged_paged_attention` as numpy arrays."""

    q: np.ndarray             # [T, Hq, D]
    k_pages: np.ndarray       # [Hkv, P, ps, D]
    v_pages: np.ndarray
    kv_lens: np.ndarray       # [S]
    block_tables: np.ndarray  # [S, max_pages]
    query_start_loc: np.ndarray  # [S+1]
    q_lens: list[int]
    max_query_len: int


def make_case(rng: np.random.Generator, *, q_lens, kv_lens, num_q_heads: int, num_kv_heads: int,
              head_dim: int, page_size: int, num_seq_slots: int | None = None,
              num_tokens: int | None = None, extra_pages: int = 3, nan_unowned: bool = True,
              dtype=np.float32, max_pages: int | None = None) -> RaggedCase:
    """Sequences with the given (q_len, kv_len); pages drawn in random order from a shared pool.

    Slots past len(q_lens) (up to num_seq_slots) are padding sequences (q_len = kv_len = 0);
    rows past sum(q_lens) (up to num_tokens) are padding tokens. With `nan_unowned`, every page
    slot a sequence does not own -- unowned pages, the tail of its last page, the null page --
    holds NaN, so a kernel that reads them without masking fails.
    """
    q_lens, kv_lens = list(q_lens), list(kv_lens)
    assert all(0 <= q <= kv for q, kv in zip(q_lens, kv_lens))
    num_seqs = len(q_lens)
    slots = num_seq_slots or num_seqs
    pages_per_seq = [-(-kv // page_size) for kv in kv_lens]
    max_pages = max_pages or max(1, max(pages_per_seq, default=1))
    total_pages = 1 + sum(pages_per_seq) + extra_pages  # page 0 = null page
    perm = rng.permutation(np.arange(1, total_pages))
    tables = np.zeros((slots, max_pages), np.int32)
    fill = np.nan if nan_unowned else 0.0
    k_pages = np.full((num_kv_heads, total_pages, page_size, head_dim), fill, np.float64)
    v_pages = np.full_like(k_pages, fill)
    used = 0
    for s, kv in enumerate(kv_lens):
        own = perm[used:used + pages_per_seq[s]]
        used += pages_per_seq[s]
        tables[s, :len(own)] = own
        for j in range(kv):
            p, o = own[j // page_size], j % page_size
            k_pages[:, p, o] = rng.standard_normal((num_kv_heads, head_dim))
            v_pages[:, p, o] = rng.standard_normal((num_kv_heads, head_dim))
    total = sum(q_lens)
    num_tokens = num_tokens or max(total, 1)
    q = rng.standard_normal((num_tokens, num_q_heads, head_dim))
    qsl = np.concatenate([[0], np.cumsum(q_lens), np.full(slots - num_seqs, total)]).astype(np.int32)
    kv_arr = np.array(kv_lens + [0] * (slots - num_seqs), np.int32)
    return RaggedCase(q=q.astype(dtype), k_pages=k_pages.astype(dtype), v_pages=v_pages.astype(dtype),
                      kv_lens=kv_arr, block_tables=tables, query_start_loc=qsl, q_lens=q_lens,
                      max_query_len=max(q_lens, default=1))


def reference_attention(case: RaggedCase, *, sm_scale: float, soft_cap: float | None = None,
                        sliding_window: int | None = None) -> np.ndarray:
    """Plain float64 loops over sequences and heads: the semantics every backend must match."""
    q = case.q.astype(np.float64)
    k_pages, v_pages = case.k_pages.astype(np.float64), case.v_pages.astype(np.float64)
    num_q_heads, group = q.shape[1], q.shape[1] // k_pages.shape[0]
    page_size = k_pages.shape[2]
    out = np.zeros_like(q)
    for s, q_len in enumerate(case.q_lens):
        kv_len, start = int(case.kv_lens[s]), int(case.query_start_loc[s])
        if q_len == 0:
            continue
        idx = np.arange(kv_len)
        pages = case.block_tables[s][idx // page_size]
        k = k_pages[:, pages, idx % page_size]  # [Hkv, kv_len, D]
        v = v_pages[:, pages, idx % page_size]
        for i in range(q_len):
            pos = kv_len - q_len + i
            visible = idx <= pos
            if sliding_window is not None:
                visible &= idx > pos - sliding_window
            for h in range(num_q_heads):
                kh, vh = k[h // group][visible], v[h // group][visible]
                logits = kh @ q[start + i, h] * sm_scale
                if soft_cap is not None:
                    logits = soft_cap * np.tanh(logits / soft_cap)
                p = np.exp(logits - logits.max())
                out[start + i, h] = (p / p.sum()) @ vh
    return out


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    """||out - ref|| / ||ref|| over real rows; NaN anywhere counts as failure (inf)."""
    out = np.asarray(out, np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
