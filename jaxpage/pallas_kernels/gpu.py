"""Ragged paged attention for NVIDIA GPUs: Pallas kernels through the Triton lowering.

`ragged_paged_attention` has the signature and semantics of reference.py (read its docstring).
`max_query_len == 1` (a pure decode step) takes the split-KV decode kernel (gpu_decode.py);
anything else takes the query-tiled prefill kernel (gpu_prefill.py). Off-GPU both run in Pallas
interpret mode, which is how CPU tests and CPU model runs exercise them. Tile sizes come from
`default_configs` and can be overridden per call (benchmarks, tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpage.pallas_kernels import gpu_common as gc
from jaxpage.pallas_kernels import reference
from jaxpage.pallas_kernels.gpu_decode import DecodeConfig, decode_attention
from jaxpage.pallas_kernels.gpu_prefill import PrefillConfig, prefill_attention

# Bytes of K plus V one decode step moves (several pages per step keeps the copies long).
_DECODE_STEP_BYTES = 32 * 1024
# Decode programs the GPU holds resident at once (H100/H200: 132 SMs x 4 programs of 4 warps).
# Splits fill this one wave and never spill into a second, partial one: in the H200 grid sweep
# (benchmarks/NOTES.md, session 3) 64 sequences x 4 kv heads ran fastest with 2 splits
# (512 programs), 3 splits (a wave and a half) 10 % slower than 2 or 4.
_DECODE_RESIDENT_PROGRAMS = 4 * 132
# At least this many splits: with one (and 64 keys per step), the gemma2-2b decode step at
# 128 x 2048 ran 6 % slower in the model than with 3, though the kernel benchmark had them equal.
_DECODE_MIN_SPLITS = 2
# No split gets fewer key blocks than this.
_DECODE_MIN_BLOCKS_PER_SPLIT = 4


def default_configs(p: gc.AttnParams, dtype, num_seqs: int, max_pages: int, interpret: bool,
                    launch_kv_heads: int | None = None) -> tuple[DecodeConfig, PrefillConfig]:
    """Tile sizes and kv splits for a call's static shapes (no splits in interpret mode);
    `launch_kv_heads`: the kv heads one decode launch covers (one head shard's; default all)."""
    itemsize = jnp.dtype(dtype).itemsize
    step_keys = _DECODE_STEP_BYTES // (2 * p.head_dim * itemsize)
    block_k = max(16, min(256, gc.next_power_of_2(step_keys)))
    max_blocks = max(1, -(-max_pages * p.page_size // block_k))
    heads = launch_kv_heads or p.num_kv_heads
    wanted = max(_DECODE_MIN_SPLITS, _DECODE_RESIDENT_PROGRAMS // (num_seqs * heads))
    splits = max(1, min(wanted, max_blocks // _DECODE_MIN_BLOCKS_PER_SPLIT))
    if interpret:
        splits = 1
    decode = DecodeConfig(block_k=block_k, num_splits=splits, num_warps=4, num_stages=2)
    # Prefill: 64-row q tiles, 32 keys per step, 3 stages: the best, or within 3 % of it, in the
    # final H200 sweep (D=128/256, 1 and 4 chunks of 512), except one D=128 chunk, where 64 keys
    # per step was 17 % faster (benchmarks/NOTES.md, run 4).
    prefill = PrefillConfig(block_m=max(64, p.group_pad), block_k=32, num_warps=4, num_stages=3)
    return decode, prefill


def _check_inputs(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc) -> None:
    k_shards, v_shards = gc.as_shards(k_pages), gc.as_shards(v_pages)
    if len(k_shards) != len(v_shards) or len({s.dtype for s in k_shards + v_shards}) != 1:
        raise ValueError(f"k_pages and v_pages must be head shards of one dtype in equal number, "
                         f"got {len(k_shards)} and {len(v_shards)}")
    whole = jax.ShapeDtypeStruct(gc.pages_shape(k_shards), k_shards[0].dtype)
    reference.check_inputs(q, whole, jax.ShapeDtypeStruct(gc.pages_shape(v_shards), whole.dtype),
                           kv_lens, block_tables, query_start_loc)
    _, _, page_size, head_dim = whole.shape
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(
            f"head_dim must be a power of two >= 16 for the GPU kernel, got {head_dim}")
    if page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two for the GPU kernel, got {page_size}")
    if kv_lens.shape[0] < 1:
        raise ValueError(f"kv_lens must be [S] with S >= 1, got shape {kv_lens.shape}")


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "sliding_window",
                                             "max_query_len", "decode_config", "prefill_config",
                                             "interpret"))
def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array | tuple[jax.Array, ...],
    v_pages: jax.Array | tuple[jax.Array, ...],
    kv_lens: jax.Array,
    block_tables: jax.Array,
    query_start_loc: jax.Array,
    *,
    sm_scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    max_query_len: int | None = None,
    decode_config: DecodeConfig | None = None,
    prefill_config: PrefillConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention of packed ragged queries over their sequences' pages (see reference.py).

    The pages may also be tuples of head shards [Hkv / n, P, ps, D] (kv_cache.init_kv_cache),
    one launch each. `decode_config` / `prefill_config` override the default tiles; `interpret`
    defaults to True off-GPU.
    """
    _check_inputs(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc)
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if soft_cap is not None and soft_cap <= 0:
        raise ValueError(f"soft_cap must be > 0 or None, got {soft_cap}")
    k_shards = gc.as_shards(k_pages)
    num_kv_heads, num_pages, page_size, head_dim = gc.pages_shape(k_shards)
    p = gc.AttnParams(sm_scale=float(sm_scale), soft_cap=soft_cap, sliding_window=sliding_window,
                      num_q_heads=q.shape[1], num_kv_heads=num_kv_heads, head_dim=head_dim,
                      page_size=page_size, num_pages=num_pages)
    interpret = gc.interpret_mode() if interpret is None else interpret
    decode_default, prefill_default = default_configs(p, q.dtype, kv_lens.shape[0],
                                                      block_tables.shape[1], interpret,
                                                      launch_kv_heads=k_shards[0].shape[0])
    args = (q, k_pages, v_pages, kv_lens.astype(jnp.int32), block_tables.astype(jnp.int32),
            query_start_loc.astype(jnp.int32), p)
    if max_query_len == 1:
        return decode_attention(*args, decode_config or decode_default, interpret)
    return prefill_attention(*args, prefill_config or prefill_default, max_query_len, interpret)
