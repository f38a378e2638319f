"""Pallas GPU (Triton lowering) kernel that writes a step's new K/V rows into their page slots.

The same job as `jaxpage.attention.write_kv` (an XLA scatter), as a row-copy kernel: grid
(token block, kv head), each program gathers `block_t` new rows of one kv head and stores them
at their slots. The caches are aliased to the outputs, so with a donated cache it writes in
place. Padding tokens go to slot 0 of the null page, as in write_kv.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxpage import compat
from jaxpage.pallas_kernels import gpu_common as gc
from jaxpage.pallas_kernels import reference

_BLOCK_T = 32


def _write_kernel(slot_ref, k_ref, v_ref, k_cache_in, v_cache_in, k_cache, v_cache, *,
                  num_tokens: int, num_kv_heads: int, slots_per_head: int):
    del k_cache_in, v_cache_in  # aliased to k_cache / v_cache
    block, kv_head = pl.program_id(0), pl.program_id(1)
    t = block * _BLOCK_T + jnp.arange(_BLOCK_T, dtype=jnp.int32)
    ok = t < num_tokens
    slot = compat.triton_load(slot_ref.at[jnp.where(ok, t, 0)], mask=ok, other=0)
    src = t * num_kv_heads + kv_head
    dst = kv_head * slots_per_head + slot
    gc.store_rows(k_cache, dst, gc.load_rows(k_ref, src, ok), ok)
    gc.store_rows(v_cache, dst, gc.load_rows(v_ref, src, ok), ok)


@functools.partial(jax.jit, static_argnames=("interpret",))
def write_kv_pages(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
                   query_start_loc: jax.Array, kv_lens: jax.Array, block_table: jax.Array, *,
                   interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """Write k/v [T, Hkv, D] into the pages [Hkv, P, page_size, D]; returns the new pages."""
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    num_tokens = k.shape[0]
    if k.shape != (num_tokens, num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k and v must be [T, Hkv={num_kv_heads}, D={head_dim}]; got k {k.shape}, "
                         f"v {v.shape}")
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two for the GPU kernel, got {head_dim}")
    interpret = gc.interpret_mode() if interpret is None else interpret
    slots = reference.token_slots(query_start_loc, kv_lens, block_table, num_tokens, page_size)
    flat = (num_kv_heads * num_pages * page_size, head_dim)
    kernel = functools.partial(_write_kernel, num_tokens=num_tokens, num_kv_heads=num_kv_heads,
                               slots_per_head=num_pages * page_size)
    k_out, v_out = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(num_tokens, _BLOCK_T), num_kv_heads),
        out_shape=[jax.ShapeDtypeStruct(flat, k_pages.dtype)] * 2,
        input_output_aliases={3: 0, 4: 1},
        compiler_params=compat.triton_compiler_params(num_warps=4, num_stages=1),
        interpret=interpret,
        name="jaxpage_write_kv",
    )(slots, k.reshape(-1, head_dim).astype(k_pages.dtype),
      v.reshape(-1, head_dim).astype(v_pages.dtype), k_pages.reshape(flat), v_pages.reshape(flat))
    return k_out.reshape(k_pages.shape), v_out.reshape(v_pages.shape)
