"""Skinny GEMMs x @ W for decode-sized M: a split-K Pallas kernel and a fused GeGLU, Triton lowering.

For the M <= 128 projections of a decode step, where XLA's autotuned GEMMs run well below HBM
bandwidth (`jaxpage bench gemm` compares the two). `jaxpage.projections` runs the q|k|v
projection (split_k = 1: no reduce, no concatenate) and `geglu_matmul` on small GPU steps.

Layout: W is taken as the model stores it, contracted axis first, through free reshapes only:
[K, N] (q_proj [d, Hq, D] -> [d, Hq*D]; o_proj [Hq, D, d] -> [Hq*D, d]; the FFW gating
[d, 2, F] -> [d, 2F]; down [F, d]), or [G, K, Ng] (kv_proj [2, d, Hkv, D] -> [2, d, Hkv*D]:
output columns g-major, i.e. einsum("mk,gkn->mgn") flattened), or a tuple of those, whose
outputs are concatenated along N by one launch (q_proj and kv_proj give the model's q|k|v row).

Grid (N // block_n, split_k): program (j, s) walks its K / split_k share in block_k steps with
an fp32 accumulator. split_k == 1 writes x.dtype directly; split_k > 1 writes fp32 partials
[split_k, M, N], which `skinny_matmul` sums in XLA and `split_k_partials` hands to a consumer
that sums them itself (gpu_norm.add_rms_norm). M is padded to a power of two >= 16 (Triton tiles).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxpage import compat
from jaxpage.pallas_kernels import gpu_common as gc

MAX_M = 128


@dataclasses.dataclass(frozen=True)
class _Segment:
    """The programs of one weight: blocks [first, first + groups * blocks) of the N grid axis."""

    first: int   # first program along N (also first output column // block_n)
    groups: int  # G (1 for a [K, N] weight)
    blocks: int  # N blocks per group


def _weight_tile(w_ref, g, k, n, block_k: int, block_n: int) -> jax.Array:
    if len(w_ref.shape) == 3:
        return w_ref[g, pl.ds(k, block_k), pl.ds(n, block_n)]
    return w_ref[pl.ds(k, block_k), pl.ds(n, block_n)]


def _matmul_kernel(x_ref, *refs, segments: tuple[_Segment, ...], block_n: int, block_k: int,
                   steps: int):
    *w_refs, o_ref = refs
    j, s = pl.program_id(0), pl.program_id(1)
    k_first = s * (steps * block_k)
    precision = gc.dot_precision(x_ref.dtype)

    def run(w_ref, seg: _Segment):
        local = j - seg.first
        g = local // seg.blocks
        n = pl.multiple_of((local % seg.blocks) * block_n, block_n)

        def body(i, acc):
            k = pl.multiple_of(k_first + i * block_k, block_k)
            x = x_ref[:, pl.ds(k, block_k)]
            w = _weight_tile(w_ref, g, k, n, block_k, block_n)
            return acc + jax.lax.dot(x, w, precision=precision,
                                     preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, steps, body,
                                jnp.zeros((x_ref.shape[0], block_n), jnp.float32))
        col = pl.multiple_of(j * block_n, block_n)  # = (first + g * blocks + n-block) * block_n
        if len(o_ref.shape) == 3:
            o_ref[s, :, pl.ds(col, block_n)] = acc
        else:
            o_ref[:, pl.ds(col, block_n)] = acc.astype(o_ref.dtype)

    if len(segments) == 1:
        run(w_refs[0], segments[0])
        return
    for w_ref, seg in zip(w_refs, segments):
        mine = (j >= seg.first) & (j < seg.first + seg.groups * seg.blocks)
        pl.when(mine)(functools.partial(run, w_ref, seg))


def output_columns(w: jax.Array | Sequence[jax.Array]) -> int:
    """N of x @ w for a weight (or tuple of weights) in the layouts this module takes."""
    ws = (w,) if isinstance(w, jax.Array) else tuple(w)
    return sum(a.shape[-1] * (a.shape[0] if a.ndim == 3 else 1) for a in ws)


# Kernel entry points are jitted: a model calls each with the same shapes in every layer, and a
# jitted callee is traced and lowered once per module instead of once per call (Pallas lowering
# costs ~15 ms a call; benchmarks/NOTES.md, session 11).
@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "split_k", "num_warps",
                                             "num_stages", "interpret"))
def split_k_partials(x: jax.Array, w: jax.Array | Sequence[jax.Array], *, block_n: int = 64,
                     block_k: int = 128, split_k: int = 1, num_warps: int = 4,
                     num_stages: int = 3, interpret: bool | None = None) -> jax.Array:
    """x [M, K] @ w unreduced: [split_k, M', N] fp32 partial products (the K slices' sums),
    or [1, M', N] in x.dtype with split_k = 1. M' >= M: rows past M are padding (zero x rows).

    For a consumer that sums the slices itself (gpu_norm.add_rms_norm); `skinny_matmul` takes
    the same tiles and returns the sum.
    """
    ws = (w,) if isinstance(w, jax.Array) else tuple(w)
    m, k = x.shape
    if not 1 <= m <= MAX_M:
        raise ValueError(f"skinny_matmul is for 1 <= M <= {MAX_M} rows, got M={m}")
    for b, name in ((block_n, "block_n"), (block_k, "block_k")):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b}")
    if split_k < 1 or k % (split_k * block_k):
        raise ValueError(f"split_k * block_k = {split_k} * {block_k} must divide K={k}")
    segments, first = [], 0
    for a in ws:
        if a.ndim not in (2, 3) or a.shape[-2] != k or a.dtype != x.dtype:
            raise ValueError(f"weight {a.shape} {a.dtype}: expected [K, N] or [G, K, N] with "
                             f"K={k} and dtype {x.dtype}")
        if a.shape[-1] % block_n:
            raise ValueError(f"block_n={block_n} must divide the weight's N={a.shape[-1]}")
        groups = a.shape[0] if a.ndim == 3 else 1
        segments.append(_Segment(first, groups, a.shape[-1] // block_n))
        first += groups * segments[-1].blocks
    n = first * block_n
    m_pad = max(16, gc.next_power_of_2(m))
    x_in = jnp.pad(x, ((0, m_pad - m), (0, 0))) if m_pad != m else x
    if split_k == 1:
        out_shape = jax.ShapeDtypeStruct((m_pad, n), x.dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((split_k, m_pad, n), jnp.float32)
    kernel = functools.partial(_matmul_kernel, segments=tuple(segments), block_n=block_n,
                               block_k=block_k, steps=k // (split_k * block_k))
    out = pl.pallas_call(
        kernel,
        grid=(first, split_k),
        out_shape=out_shape,
        compiler_params=compat.triton_compiler_params(num_warps=num_warps,
                                                      num_stages=num_stages),
        interpret=gc.interpret_mode() if interpret is None else interpret,
        name=f"jaxpage_gemm_n{block_n}_k{block_k}_s{split_k}",
    )(x_in, *ws)
    return out.reshape(split_k, m_pad, n)


def skinny_matmul(x: jax.Array, w: jax.Array | Sequence[jax.Array], **tiles) -> jax.Array:
    """x [M, K] @ w -> [M, N] in x.dtype (fp32 accumulation); w: see the module docstring.

    Tiles (`split_k_partials`' keywords): block_n must divide every weight's last axis,
    split_k * block_k must divide K; block sizes are powers of two >= 16 (Triton dot tiles).
    """
    partials = split_k_partials(x, w, **tiles)[:, :x.shape[0]]
    if partials.shape[0] == 1:
        return partials[0]
    return partials.sum(axis=0).astype(x.dtype)


def _gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU, tanh approximation (jax.nn.gelu(approximate=True)), fp32."""
    return 0.5 * x * (1.0 + gc.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


def _geglu_kernel(x_ref, w_ref, o_ref, *, hidden: int, block_n: int, block_k: int, steps: int):
    n = pl.multiple_of(pl.program_id(0) * block_n, block_n)
    precision = gc.dot_precision(x_ref.dtype)

    def body(i, accs):
        k = pl.multiple_of(i * block_k, block_k)
        x = x_ref[:, pl.ds(k, block_k)]
        return tuple(acc + jax.lax.dot(x, w_ref[pl.ds(k, block_k), pl.ds(col, block_n)],
                                       precision=precision, preferred_element_type=jnp.float32)
                     for acc, col in zip(accs, (n, hidden + n)))

    zero = jnp.zeros((x_ref.shape[0], block_n), jnp.float32)
    gate, up = jax.lax.fori_loop(0, steps, body, (zero, zero))
    # round the projections to the activation dtype first, as the unfused model does
    gate, up = (a.astype(o_ref.dtype).astype(jnp.float32) for a in (gate, up))
    o_ref[:, pl.ds(n, block_n)] = (_gelu_tanh(gate) * up).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "num_warps", "num_stages",
                                             "interpret"))
def geglu_matmul(x: jax.Array, gating: jax.Array, *, block_n: int = 64, block_k: int = 64,
                 num_warps: int = 4, num_stages: int = 4,
                 interpret: bool | None = None) -> jax.Array:
    """gelu_tanh(x @ W_gate) * (x @ W_up) -> [M, F] in x.dtype for the FFW's gating weight
    [K, 2, F] (W_gate, W_up side by side) in one launch: each program reads the gate and up
    columns of its block, so the product never leaves registers."""
    m, k = x.shape
    if gating.ndim != 3 or gating.shape[:2] != (k, 2) or gating.dtype != x.dtype:
        raise ValueError(f"gating {gating.shape} {gating.dtype}: expected [{k}, 2, F] {x.dtype}")
    if not 1 <= m <= MAX_M:
        raise ValueError(f"geglu_matmul is for 1 <= M <= {MAX_M} rows, got M={m}")
    hidden = gating.shape[2]
    if hidden % block_n or k % block_k:
        raise ValueError(f"block_n={block_n} must divide F={hidden} and block_k={block_k} K={k}")
    m_pad = max(16, gc.next_power_of_2(m))
    x_in = jnp.pad(x, ((0, m_pad - m), (0, 0))) if m_pad != m else x
    out = pl.pallas_call(
        functools.partial(_geglu_kernel, hidden=hidden, block_n=block_n, block_k=block_k,
                          steps=k // block_k),
        grid=(hidden // block_n,),
        out_shape=jax.ShapeDtypeStruct((m_pad, hidden), x.dtype),
        compiler_params=compat.triton_compiler_params(num_warps=num_warps,
                                                      num_stages=num_stages),
        interpret=gc.interpret_mode() if interpret is None else interpret,
        name=f"jaxpage_geglu_n{block_n}_k{block_k}",
    )(x_in, gating.reshape(k, 2 * hidden))
    return out[:m]
