"""Backend-neutral entry points for the dense projections that small GPU steps run poorly in XLA.

At decode sizes (tens of tokens) a projection only streams its weights, and XLA:GPU spends
~2-5 us beyond that on each small kernel around it: the q/k/v GEMM is split-K, so a
reduce-and-concatenate fusion follows it; the FFW's GELU(gate) * up is a fusion of its own; and
each sublayer's output GEMM is followed by its split-K sum, post-norm, residual add and the next
sublayer's pre-norm in two or three fusions. On the Pallas GPU backend, steps of up to
SMALL_STEP_TOKENS tokens run these as Pallas kernels (pallas_kernels/gpu_matmul.py, gpu_norm.py):
q|k|v written as one array without split-K, GELU(gate) * up in the GEMM's epilogue, and the
output GEMMs' split-K partials summed by one kernel that also does the norms and the residual
(which also follows XLA's GEMM in steps of up to SUBLAYER_END_TOKENS tokens). Everywhere else
(XLA and TPU backends, larger steps, widths the tiles do not divide) the plain einsums run.
Tiles were chosen on the H200 with `jaxpage bench gemm`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpage.models.norms import rms_norm
from jaxpage.pallas_kernels.gpu_matmul import geglu_matmul, skinny_matmul, split_k_partials
from jaxpage.pallas_kernels.gpu_norm import add_rms_norm

SMALL_STEP_TOKENS = 64
# Steps of up to this many tokens end their sublayers in the Pallas kernel even where XLA runs
# the GEMM before it: on the H200, 128-row decode steps took 0.9 % less time; 256 rows, no change.
SUBLAYER_END_TOKENS = 128
QKV_TILES = dict(block_n=32, block_k=256, split_k=1, num_stages=4)  # largest tiles tried
GEGLU_TILES = dict(block_n=64, block_k=64, num_stages=4)
# The output projections, by the length of K: the attention output (K = Hq*D, about d) and the
# FFW's down projection (K = the hidden width, several d). Split-K tiles from the session 8 sweep
# at 64 rows (gemma3-4b o: 6.5 us; down: 19.8 us, within 0.3 us of the best, which took 8 splits:
# the sum after it reads twice the partials, +1.2 us in the session 10 measurement).
SHORT_K_OUT_TILES = dict(block_n=32, block_k=128, split_k=4, num_stages=3)
LONG_K_OUT_TILES = dict(block_n=64, block_k=128, split_k=4, num_stages=3)


def _runs_kernels(backend: str, tokens: int, limit: int = SMALL_STEP_TOKENS) -> bool:
    return backend == "pallas_gpu" and tokens <= limit and jax.default_backend() == "gpu"


def _fit(tiles: dict, k: int, widths: list[int]) -> dict | None:
    """`tiles` with block_k / block_n halved until they divide K's split and every width (None:
    below 16, or K not divisible by split_k)."""
    out = dict(tiles)
    if k % out.get("split_k", 1):
        return None
    for name, dims in (("block_k", [k // out.get("split_k", 1)]), ("block_n", widths)):
        while any(d % out[name] for d in dims):
            out[name] //= 2
            if out[name] < 16:
                return None
    return out


def qkv_projection(x: jax.Array, q_proj: jax.Array, kv_proj: jax.Array,
                   backend: str) -> jax.Array:
    """x [T, d] through q_proj [d, Hq, D] and kv_proj [2, d, Hkv, D] -> [T, Hq + 2 Hkv, D]:
    the q heads, then the k heads, then the v heads."""
    t, d = x.shape
    _, hq, hd = q_proj.shape
    tiles = _runs_kernels(backend, t) and _fit(QKV_TILES, d, [hq * hd, kv_proj[0, 0].size])
    if tiles:
        out = skinny_matmul(x, (q_proj.reshape(d, -1), kv_proj.reshape(2, d, -1)), **tiles)
        return out.reshape(t, -1, hd)
    q = jnp.einsum("td,dnh->tnh", x, q_proj)
    kv = jnp.einsum("td,cdnh->tcnh", x, kv_proj)  # [T, (k, v), Hkv, D]
    return jnp.concatenate([q, kv.reshape(t, -1, hd)], axis=1)


def geglu(x: jax.Array, gating: jax.Array, backend: str) -> jax.Array:
    """gelu_tanh(x W_gate) * (x W_up) [T, F] for x [T, d] and gating [d, 2, F]."""
    tiles = _runs_kernels(backend, x.shape[0]) and _fit(GEGLU_TILES, x.shape[1],
                                                        [gating.shape[2]])
    if tiles:
        return geglu_matmul(x, gating, **tiles)
    gate_up = jnp.einsum("td,dgf->tgf", x, gating)
    return jax.nn.gelu(gate_up[:, 0], approximate=True) * gate_up[:, 1]


def output_residual_norm(h: jax.Array, w: jax.Array, residual: jax.Array, post_scale: jax.Array,
                         next_scale: jax.Array, *, eps: float, backend: str,
                         ) -> tuple[jax.Array, jax.Array]:
    """A sublayer's end and the next one's input: x = residual + rms_norm(h @ w, post_scale) and
    rms_norm(x, next_scale), for h [T, K], w [K, d], residual [T, d] (Gemma's (1 + w) norms)."""
    k, d = w.shape
    tiles = _runs_kernels(backend, h.shape[0]) and _fit(
        LONG_K_OUT_TILES if k > 2 * d else SHORT_K_OUT_TILES, k, [d])
    if tiles:
        return add_rms_norm(split_k_partials(h, w, **tiles), residual, post_scale, next_scale,
                            eps=eps)
    if _runs_kernels(backend, h.shape[0], limit=SUBLAYER_END_TOKENS):  # after XLA's GEMM
        return add_rms_norm((h @ w)[None], residual, post_scale, next_scale, eps=eps)
    x = residual + rms_norm(h @ w, post_scale, eps)
    return x, rms_norm(x, next_scale, eps)
