"""Pallas GPU (Triton lowering) kernel that writes a step's new K/V rows into their page slots.

The same job as `jaxpage.attention.write_kv` (an XLA scatter), as a row-copy kernel: grid
(token block, kv head), each program gathers `block_t` new rows of one kv head and stores them
at their slots. The caches are aliased to the outputs, so with a donated cache it writes in
place. Padding tokens go to slot 0 of the null page, as in write_kv.

Given a layer's `QKTransform`, the same program also applies qk-norm and RoPE to the keys it
writes and to the q heads of its kv head, which saves the model the separate norm and rotation
kernels of every layer (four small launches per layer in a Gemma 3 decode step).
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
# Tokens per program when q and k are also transformed: a 32-token tile of several fp32 [T, D]
# operands took 23 us per gemma3-4b layer at 64 tokens on the H200 (8 programs, register-bound),
# against 2 us for the plain copy; two tokens per program give 128 small programs instead.
_BLOCK_T_TRANSFORM = 2


def _write_kernel(slot_ref, k_ref, v_ref, k_cache_in, v_cache_in, *refs, num_tokens: int,
                  num_kv_heads: int, slots_per_head: int, block_t: int, transform: bool,
                  norm: bool, eps: float):
    del k_cache_in, v_cache_in  # aliased to k_cache / v_cache
    if transform:  # inputs q, cos, sin[, q_scale, k_scale]; outputs k_cache, v_cache, q_out
        q_ref, cos_ref, sin_ref, *refs = refs
        q_scale_ref, k_scale_ref, k_cache, v_cache, q_out = refs if norm else (None, None, *refs)
    else:
        k_cache, v_cache = refs
    block, kv_head = pl.program_id(0), pl.program_id(1)
    t = block * block_t + jnp.arange(block_t, dtype=jnp.int32)
    ok = t < num_tokens
    slot = compat.triton_load(slot_ref.at[jnp.where(ok, t, 0)], mask=ok, other=0)
    src = t * num_kv_heads + kv_head
    dst = kv_head * slots_per_head + slot
    if transform:
        cos, sin = (_angle_rows(ref, t, ok, k_ref.shape[1]) for ref in (cos_ref, sin_ref))
        k = _norm_and_rotate(k_ref, src, ok, cos, sin, k_scale_ref, eps)
        group = q_ref.shape[0] // (num_tokens * num_kv_heads)
        for g in range(group):  # the q heads that share this kv head
            rows = (t * num_kv_heads + kv_head) * group + g
            q = _norm_and_rotate(q_ref, rows, ok, cos, sin, q_scale_ref, eps)
            gc.store_rows(q_out, rows, q, ok)
    else:
        k = gc.load_rows(k_ref, src, ok)
    gc.store_rows(k_cache, dst, k, ok)
    gc.store_rows(v_cache, dst, gc.load_rows(v_ref, src, ok), ok)


def _angle_rows(ref, t: jax.Array, ok: jax.Array, head_dim: int) -> jax.Array:
    """[len(t), D] of a [T, D/2] cos or sin table, each half repeated (both halves rotate by the
    same angles)."""
    return gc.load_rows(ref, t, ok, jnp.arange(head_dim, dtype=jnp.int32) % (head_dim // 2))


def _norm_and_rotate(ref, rows: jax.Array, ok: jax.Array, cos: jax.Array, sin: jax.Array,
                     scale_ref, eps: float) -> jax.Array:
    """QKTransform.apply on rows of a [N, D] ref: RMSNorm with (1 + scale) (rounded to the ref's
    dtype, as the unfused model rounds it), then the split-halves rotation, in fp32.

    The rotation needs each element's partner in the other half: the rows are loaded a second
    time with the halves swapped rather than shuffled in registers."""
    d = ref.shape[1]
    cols = jnp.arange(d, dtype=jnp.int32)
    swapped = (cols + d // 2) % d
    x = gc.load_rows(ref, rows, ok).astype(jnp.float32)
    xs = gc.load_rows(ref, rows, ok, swapped).astype(jnp.float32)
    if scale_ref is not None:
        r = jax.lax.rsqrt(jnp.sum(x * x, axis=1) / d + eps)[:, None]
        w = 1.0 + compat.triton_load(scale_ref.at[cols]).astype(jnp.float32)
        ws = 1.0 + compat.triton_load(scale_ref.at[swapped]).astype(jnp.float32)
        x = (x * r * w[None, :]).astype(ref.dtype).astype(jnp.float32)
        xs = (xs * r * ws[None, :]).astype(ref.dtype).astype(jnp.float32)
    sign = jnp.where(cols < d // 2, -1.0, 1.0).astype(jnp.float32)
    return x * cos + (sign[None, :] * xs) * sin


@functools.partial(jax.jit, static_argnames=("interpret",))
def write_kv_pages(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
                   query_start_loc: jax.Array, kv_lens: jax.Array, block_table: jax.Array, *,
                   q: jax.Array | None = None, qk=None, interpret: bool | None = None):
    """Write k/v [T, Hkv, D] into the pages [Hkv, P, page_size, D]; returns the new pages.

    With `qk` (an attention.QKTransform) k is normed and rotated on its way into the pages and
    q [T, Hq, D] likewise: returns (k_pages, v_pages, transformed q); without, (k_pages,
    v_pages, q).
    """
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    num_tokens = k.shape[0]
    if k.shape != (num_tokens, num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k and v must be [T, Hkv={num_kv_heads}, D={head_dim}]; got k {k.shape}, "
                         f"v {v.shape}")
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two for the GPU kernel, got {head_dim}")
    transform = qk is not None
    if transform and (q is None or q.shape[0] != num_tokens or q.shape[1] % num_kv_heads
                      or q.shape[2] != head_dim):
        raise ValueError(f"q must be [T={num_tokens}, a multiple of {num_kv_heads} heads, "
                         f"D={head_dim}] to be transformed, got {None if q is None else q.shape}")
    norm = transform and qk.q_scale is not None
    interpret = gc.interpret_mode() if interpret is None else interpret
    slots = reference.token_slots(query_start_loc, kv_lens, block_table, num_tokens, page_size)
    flat = (num_kv_heads * num_pages * page_size, head_dim)
    block_t = _BLOCK_T_TRANSFORM if transform else _BLOCK_T
    kernel = functools.partial(_write_kernel, num_tokens=num_tokens, num_kv_heads=num_kv_heads,
                               slots_per_head=num_pages * page_size, block_t=block_t,
                               transform=transform, norm=norm, eps=qk.eps if transform else 0.0)
    inputs = [slots, k.reshape(-1, head_dim).astype(k_pages.dtype),
              v.reshape(-1, head_dim).astype(v_pages.dtype), k_pages.reshape(flat),
              v_pages.reshape(flat)]
    out_shape = [jax.ShapeDtypeStruct(flat, k_pages.dtype)] * 2
    if transform:
        inputs += [q.reshape(-1, head_dim), qk.cos, qk.sin]
        inputs += [qk.q_scale, qk.k_scale] if norm else []
        out_shape.append(jax.ShapeDtypeStruct((q.shape[0] * q.shape[1], head_dim), q.dtype))
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(num_tokens, block_t), num_kv_heads),
        out_shape=out_shape,
        input_output_aliases={3: 0, 4: 1},
        compiler_params=compat.triton_compiler_params(num_warps=2 if transform else 4,
                                                      num_stages=1),
        interpret=interpret,
        name="jaxpage_write_kv" + ("_qk" if transform else ""),
    )(*inputs)
    pages = outs[0].reshape(k_pages.shape), outs[1].reshape(v_pages.shape)
    return (*pages, outs[2].reshape(q.shape) if transform else q)
