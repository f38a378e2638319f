"""Gemma building blocks: embedder, RMSNorm, rotary embeddings, gated feed-forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpage.models.norms import rms_norm
from jaxpage.projections import geglu


def normal_init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, std: float) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Embedder(nnx.Module):
    """Token embedding, shared with the output projection (tied weights)."""

    def __init__(self, vocab_size: int, d_model: int, *, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(normal_init(rngs, (vocab_size, d_model), dtype, 1.0))
        self.d_model = d_model

    def encode(self, token_ids: jax.Array) -> jax.Array:
        """[T] ids -> [T, d] embeddings times sqrt(d), the factor rounded to the param dtype."""
        table = self.embedding[...]
        x = jnp.take(table, token_ids, axis=0)
        return x * jnp.sqrt(jnp.float32(self.d_model)).astype(table.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm with Gemma's (1 + w) scale, computed in fp32."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype, rngs: nnx.Rngs):
        self.scale = nnx.Param(normal_init(rngs, (dim,), dtype, 0.1))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


def rope_tables(positions: jax.Array, head_dim: int, *, base: float, scale: float = 1.0,
                ) -> tuple[jax.Array, jax.Array]:
    """cos, sin [T, D/2] fp32 of the rotary angles at absolute positions [T].

    Linear scaling divides positions by `scale` (Gemma 3 global layers of 4B/12B/27B use 8).
    """
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angle = (positions.astype(jnp.float32) / scale)[:, None] * inv_freq[None, :]
    return jnp.cos(angle), jnp.sin(angle)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding of [T, H, D] by the angles of `rope_tables` (split-halves convention)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float, scale: float = 1.0) -> jax.Array:
    """Rotary embedding on [T, H, D] at absolute positions [T]."""
    return rotate(x, *rope_tables(positions, x.shape[-1], base=base, scale=scale))


class FeedForward(nnx.Module):
    """GeGLU: down(gelu_tanh(x W_gate) * (x W_up))."""

    def __init__(self, d_model: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        # gating holds W_gate and W_up side by side: one matmul of width 2*hidden.
        self.gating = nnx.Param(normal_init(rngs, (d_model, 2, hidden), dtype, d_model ** -0.5))
        self.down = nnx.Param(normal_init(rngs, (hidden, d_model), dtype, hidden ** -0.5))

    def hidden(self, x: jax.Array, backend: str = "xla") -> jax.Array:
        """gelu_tanh(x W_gate) * (x W_up) [T, hidden]; `backend`: the step's attention backend,
        which picks the gating GEMM's kernel."""
        return geglu(x, self.gating[...], backend)

    def __call__(self, x: jax.Array, backend: str = "xla") -> jax.Array:
        return self.hidden(x, backend) @ self.down[...]
