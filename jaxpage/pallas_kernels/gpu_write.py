"""Pallas GPU (Triton lowering) kernel that writes a step's new K/V rows into their page slots.

The same job as `jaxpage.attention.write_kv` (an XLA scatter), as a row-copy kernel: grid
(token block, kv head), each program gathers `block_t` new rows of one kv head from the layer's
q/k/v projection output and stores them at their slots. The caches are aliased to the outputs,
so with a donated cache it writes in place. Padding tokens go to slot 0 of the null page, as in
write_kv. Pages split into head shards are written in the same launch (gpu_common.on_head_shard).

Given a layer's `QKTransform`, the same program also applies qk-norm and RoPE to the keys it
writes and to the q heads of its kv head, which saves the model the separate norm and rotation
kernels of every layer (four small launches per layer in a Gemma 3 decode step).
"""

from __future__ import annotations

import dataclasses
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


def _write_kernel(slot_ref, qkv_ref, *refs, num_tokens: int, heads: "_Heads",
                  num_shards: int, slots_per_head: int, block_t: int, transform: bool,
                  norm: bool, eps: float):
    refs = refs[2 * num_shards:]  # the cache inputs: aliased to the cache outputs
    if transform:  # inputs cos, sin[, q_scale, k_scale]
        cos_ref, sin_ref, *refs = refs
        q_scale_ref, k_scale_ref, *refs = refs if norm else (None, None, *refs)
    n = num_shards  # outputs: the k shards, the v shards[, q]
    k_caches, v_caches, q_out = refs[:n], refs[n:2 * n], refs[2 * n:]
    block, kv_head = pl.program_id(0), pl.program_id(1)
    t = block * block_t + jnp.arange(block_t, dtype=jnp.int32)
    ok = t < num_tokens
    slot = compat.triton_load(slot_ref.at[jnp.where(ok, t, 0)], mask=ok, other=0)
    token_row = t * heads.per_token  # first row of each token in the flat [T * heads, D] view
    k_rows, v_rows = token_row + heads.k_row(kv_head), token_row + heads.v_row(kv_head)
    if transform:
        cos, sin = (_angle_rows(ref, t, ok, qkv_ref.shape[1]) for ref in (cos_ref, sin_ref))
        k = _norm_and_rotate(qkv_ref, k_rows, ok, cos, sin, k_scale_ref, eps)
    else:
        k = gc.load_rows(qkv_ref, k_rows, ok)
    v = gc.load_rows(qkv_ref, v_rows, ok)
    for g in range(heads.group if q_out else 0):  # the q heads that share this kv head
        q_rows = token_row + heads.q_row(kv_head, g)
        if transform:
            q = _norm_and_rotate(qkv_ref, q_rows, ok, cos, sin, q_scale_ref, eps)
        else:
            q = gc.load_rows(qkv_ref, q_rows, ok)
        gc.store_rows(q_out[0], (t * heads.num_kv_heads + kv_head) * heads.group + g, q, ok)

    def store(k_cache, v_cache, shard_head):
        dst = shard_head * slots_per_head + slot
        gc.store_rows(k_cache, dst, k, ok)
        gc.store_rows(v_cache, dst, v, ok)

    gc.on_head_shard(kv_head, heads.num_kv_heads // num_shards, k_caches, v_caches, store)


@dataclasses.dataclass(frozen=True)
class _Heads:
    """Where the heads sit among the per_token = Hq + 2 * Hkv heads of each token of a
    [T, q heads | k heads | v heads, D] array (the `group` q heads of each kv head together)."""

    num_q_heads: int
    num_kv_heads: int

    @property
    def per_token(self) -> int:
        return self.num_q_heads + 2 * self.num_kv_heads

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    def q_row(self, kv_head, g: int):
        return kv_head * self.group + g

    def k_row(self, kv_head):
        return self.num_q_heads + kv_head

    def v_row(self, kv_head):
        return self.num_q_heads + self.num_kv_heads + kv_head


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


@functools.partial(jax.jit, static_argnames=("num_q_heads", "interpret"))
def write_kv_pages(k_pages, v_pages, qkv: jax.Array, query_start_loc: jax.Array,
                   kv_lens: jax.Array, block_table: jax.Array, *, num_q_heads: int, qk=None,
                   interpret: bool | None = None):
    """Write the new keys/values of `qkv` [T, Hq + 2 * Hkv, D] (q heads, then k heads, then v
    heads) into the pages [Hkv, P, page_size, D] (or tuples of head shards [Hkv / n, P, ps, D]);
    returns (k_pages, v_pages, q), the pages in the form they came in.

    q [T, Hq, D] is the q heads, normed and rotated along with k when `qk` (an
    attention.QKTransform) is given, else copied; None when num_q_heads is 0. Reading the
    projection's one output array directly saves the separate slices of q, k and v a split
    would cost (one XLA fusion each per layer).
    """
    k_shards, v_shards = gc.as_shards(k_pages), gc.as_shards(v_pages)
    pages_heads, num_pages, page_size, head_dim = gc.pages_shape(k_shards)
    num_tokens, per_token = qkv.shape[:2]
    num_kv_heads = (per_token - num_q_heads) // 2
    if (qkv.ndim != 3 or qkv.shape[2] != head_dim or num_kv_heads < 1
            or per_token != num_q_heads + 2 * num_kv_heads or num_q_heads % num_kv_heads
            or num_kv_heads != pages_heads or gc.pages_shape(v_shards) != (
                pages_heads, num_pages, page_size, head_dim)):
        raise ValueError(
            f"qkv must be [T, num_q_heads={num_q_heads} + 2 * Hkv, D={head_dim}] with Hkv a "
            f"divisor of the q heads and the {pages_heads} kv heads of the pages "
            f"{[s.shape for s in k_shards]} / {[s.shape for s in v_shards]}; got qkv {qkv.shape}")
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two for the GPU kernel, got {head_dim}")
    heads = _Heads(num_q_heads, num_kv_heads)
    transform = qk is not None
    if transform and not num_q_heads:
        raise ValueError("a QKTransform needs the q heads in qkv (num_q_heads > 0)")
    norm = transform and qk.q_scale is not None
    interpret = gc.interpret_mode() if interpret is None else interpret
    slots = reference.token_slots(query_start_loc, kv_lens, block_table, num_tokens, page_size)
    n = len(k_shards)
    block_t = _BLOCK_T_TRANSFORM if transform else _BLOCK_T
    kernel = functools.partial(_write_kernel, num_tokens=num_tokens, heads=heads, num_shards=n,
                               slots_per_head=num_pages * page_size, block_t=block_t,
                               transform=transform, norm=norm, eps=qk.eps if transform else 0.0)
    caches = [gc.flat_rows(s) for s in k_shards + v_shards]
    inputs = [slots, qkv.reshape(-1, head_dim), *caches]
    inputs += [qk.cos, qk.sin] if transform else []
    inputs += [qk.q_scale, qk.k_scale] if norm else []
    out_shape = [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches]
    if num_q_heads:
        out_shape.append(jax.ShapeDtypeStruct((num_tokens * num_q_heads, head_dim), qkv.dtype))
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(num_tokens, block_t), num_kv_heads),
        out_shape=out_shape,
        input_output_aliases={2 + i: i for i in range(2 * n)},
        compiler_params=compat.triton_compiler_params(num_warps=2 if transform else 4,
                                                      num_stages=1),
        interpret=interpret,
        name="jaxpage_write_kv" + ("_qk" if transform else ""),
    )(*inputs)
    shape = k_shards[0].shape
    ks = [o.reshape(shape) for o in outs[:n]]
    vs = [o.reshape(shape) for o in outs[n:2 * n]]
    q = outs[2 * n].reshape(num_tokens, num_q_heads, head_dim) if num_q_heads else None
    return gc.same_form(k_pages, ks), gc.same_form(k_pages, vs), q
