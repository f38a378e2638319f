"""Backend-neutral entry points for the dense projections that small GPU steps run poorly in XLA.

At decode sizes (tens of tokens) a projection only streams its weights, and XLA:GPU spends ~3 us
per layer beyond that on each of two: the q/k/v GEMM is split-K, so a reduce-and-concatenate
fusion follows it, and the FFW's GELU(gate) * up is a fusion of its own after the gating GEMM.
On the Pallas GPU backend, steps of up to SMALL_STEP_TOKENS tokens run both as Pallas GEMMs
without split-K (pallas_kernels/gpu_matmul.py): q|k|v written as one array, GELU(gate) * up in
the GEMM's epilogue. Everywhere else (XLA and TPU backends, larger steps, widths the tiles do not
divide) the plain einsums run. Tiles were chosen on the H200 with `jaxpage bench gemm`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpage.pallas_kernels.gpu_matmul import geglu_matmul, skinny_matmul

SMALL_STEP_TOKENS = 64
QKV_TILES = dict(block_n=32, block_k=256, split_k=1, num_stages=4)  # largest tiles tried
GEGLU_TILES = dict(block_n=64, block_k=64, num_stages=4)


def _runs_kernels(backend: str, tokens: int) -> bool:
    return backend == "pallas_gpu" and tokens <= SMALL_STEP_TOKENS and (
        jax.default_backend() == "gpu")


def _fit(tiles: dict, k: int, widths: list[int]) -> dict | None:
    """`tiles` with block_k / block_n halved until they divide K and every width (None: < 16)."""
    out = dict(tiles)
    for name, dims in (("block_k", [k]), ("block_n", widths)):
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
