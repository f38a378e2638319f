"""The end of a Gemma sublayer and the start of the next in one Pallas GPU (Triton) kernel.

A Gemma block closes each sublayer with `x + rms_norm(y, post)` (y: the output projection) and
opens the next with `rms_norm(x, pre)`. In a decode step XLA:GPU runs that as two or three
kernels per sublayer after its split-K output GEMM (the split sum, the post-norm with the
residual add, the next pre-norm), 2-5 us each at tens of rows: launch latency and dependent
row reductions, not bytes. Here one program per row sums the GEMM's split-K partials (still in
L2) and does all of it, with the rounding points of the unfused model: y, the post-normed y and
x are rounded to the activation dtype where the model rounds them.

Rows are whole: one program holds a row of width N padded to a power of two (Triton shapes),
the padding lanes masked (read as 0, never written).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxpage import compat
from jaxpage.pallas_kernels import gpu_common as gc


def _norm(v: jax.Array, scale: jax.Array, width: int, eps: float) -> jax.Array:
    """RMSNorm of fp32 rows v [1, W] with Gemma's (1 + scale); padding lanes are 0."""
    return v * jax.lax.rsqrt(jnp.sum(v * v, axis=1, keepdims=True) / width + eps) * (1.0 + scale)


def _add_rms_norm_kernel(partials_ref, residual_ref, post_ref, next_ref, x_ref, normed_ref, *,
                         splits: int, rows_per_split: int, width: int, eps: float):
    row = pl.program_id(0)
    cols = jnp.arange(gc.next_power_of_2(width), dtype=jnp.int32)
    ok = cols < width
    in_bounds = jnp.where(ok, cols, 0)[None, :]  # masked lanes read nothing, even in interpret mode

    def load_row(ref, r) -> jax.Array:  # row r of a 2-D ref as fp32 [1, W]
        index = ref.at[jnp.full((1, 1), r, jnp.int32), in_bounds]
        return compat.triton_load(index, mask=ok[None, :], other=0).astype(jnp.float32)

    def load_scale(ref) -> jax.Array:  # a [N] norm scale as fp32 [1, W]
        return compat.triton_load(ref.at[in_bounds[0]], mask=ok, other=0).astype(
            jnp.float32)[None, :]

    def store_row(ref, value) -> None:
        past_end = jnp.where(ok, cols, width)[None, :]  # masked lanes: nothing is written
        compat.triton_store(ref.at[jnp.full((1, 1), row, jnp.int32), past_end],
                            value.astype(ref.dtype), mask=ok[None, :])

    dtype = x_ref.dtype
    y = load_row(partials_ref, row)
    for s in range(1, splits):
        y += load_row(partials_ref, s * rows_per_split + row)
    y = y.astype(dtype).astype(jnp.float32)  # the projection's output
    post = _norm(y, load_scale(post_ref), width, eps).astype(dtype).astype(jnp.float32)
    x = (load_row(residual_ref, row) + post).astype(dtype)
    store_row(x_ref, x)
    store_row(normed_ref, _norm(x.astype(jnp.float32), load_scale(next_ref), width, eps))


def default_warps(width: int) -> int:
    """A warp per 256 lanes of the padded row, 4 to 16: on the H200 (64 rows of 2560, 4 and 8
    splits) 16 warps ran 2.7 / 4.4 us against 3.7 / 6.1 us with 4 (benchmarks/NOTES.md, s10)."""
    return max(4, min(16, gc.next_power_of_2(width) // 256))


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))  # lowered once
def add_rms_norm(partials: jax.Array, residual: jax.Array, post_scale: jax.Array,
                 next_scale: jax.Array, *, eps: float, num_warps: int | None = None,
                 interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """(x, rms_norm(x, next_scale)) for x = residual + rms_norm(y, post_scale), both [M, N] in
    residual.dtype, where y = sum(partials[:, :M], axis=0) rounded to residual.dtype.

    partials: [S, M', N] with M' >= M, a projection's split-K partials (split_k_partials).
    Norms: Gemma's RMSNorm with a (1 + scale) factor, statistics in fp32.
    """
    splits, rows_per_split, width = partials.shape
    m = residual.shape[0]
    if residual.shape != (m, width) or rows_per_split < m:
        raise ValueError(f"residual {residual.shape} must be [M, N] with N={width} and "
                         f"M <= {rows_per_split} (the partials' rows)")
    if post_scale.shape != (width,) or next_scale.shape != (width,):
        raise ValueError(f"norm scales {post_scale.shape}, {next_scale.shape}: expected [{width}]")
    kernel = functools.partial(_add_rms_norm_kernel, splits=splits,
                               rows_per_split=rows_per_split, width=width, eps=float(eps))
    out = jax.ShapeDtypeStruct((m, width), residual.dtype)
    return pl.pallas_call(
        kernel,
        grid=(m,),
        out_shape=(out, out),
        compiler_params=compat.triton_compiler_params(
            num_warps=num_warps or default_warps(width), num_stages=1),
        interpret=gc.interpret_mode() if interpret is None else interpret,
        name="jaxpage_add_rms_norm",
    )(partials.reshape(splits * rows_per_split, width), residual, post_scale, next_scale)
