"""Gemma 2 / Gemma 3 text decoder over a paged KV cache, one config-driven implementation.

The model works on a packed ragged batch: token_ids and positions are [T] (all sequences of the
step back to back, padded to a bucket), and attention reads/writes the paged cache through
`jaxpage.attention.paged_attention`, which picks the kernel (as `jaxpage.projections` does for
the projections and each sublayer's end: output GEMM, norms and residual).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpage.attention import AttentionMetadata, QKTransform, paged_attention
from jaxpage.models.config import GemmaConfig, LayerType
from jaxpage.models.layers import Embedder, FeedForward, RMSNorm, normal_init, rope_tables
from jaxpage.projections import output_residual_norm, qkv_projection

# per layer: (k_pages, v_pages), each [Hkv, P, ps, D] or a tuple of head shards (kv_cache.py)
KVCache = list[tuple]


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional qk-norm, soft-cap and sliding window."""

    def __init__(self, config: GemmaConfig, layer_type: LayerType, *, dtype, rngs: nnx.Rngs):
        d, h, kvh, hd = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nnx.Param(normal_init(rngs, (d, h, hd), dtype, d ** -0.5))
        self.kv_proj = nnx.Param(normal_init(rngs, (2, d, kvh, hd), dtype, d ** -0.5))
        self.o_proj = nnx.Param(normal_init(rngs, (h, hd, d), dtype, (h * hd) ** -0.5))
        if config.use_qk_norm:
            self.q_norm = RMSNorm(hd, eps=config.rms_norm_eps, dtype=dtype, rngs=rngs)
            self.k_norm = RMSNorm(hd, eps=config.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.use_qk_norm = config.use_qk_norm
        self.layer_type = layer_type
        self.sm_scale = float(config.query_pre_attn_scalar) ** -0.5
        self.soft_cap = config.attn_logit_softcap
        self.sliding_window = config.window_of(layer_type)
        self.rope_base, self.rope_scale = config.rope_of(layer_type)

    def __call__(self, x: jax.Array, positions: jax.Array, kv_cache: tuple,
                 metadata: AttentionMetadata) -> tuple[jax.Array, tuple]:
        """Pre-normed x [T, d] -> the heads' outputs [T, Hq * D] (before o_proj), updated cache."""
        qkv = qkv_projection(x, self.q_proj[...], self.kv_proj[...], metadata.backend)
        # qk-norm and RoPE, applied by the attention backend (a GPU kernel fuses them)
        norms = dict(q_scale=self.q_norm.scale[...], k_scale=self.k_norm.scale[...],
                     eps=self.q_norm.eps) if self.use_qk_norm else {}
        qk = QKTransform(*rope_tables(positions, qkv.shape[-1], base=self.rope_base,
                                      scale=self.rope_scale), **norms)
        out, kv_cache = paged_attention(
            qkv, kv_cache, metadata, group=self.layer_type, sm_scale=self.sm_scale,
            soft_cap=self.soft_cap, sliding_window=self.sliding_window, qk=qk)
        return out.reshape(out.shape[0], -1), kv_cache


def sublayer_end(h: jax.Array, w: jax.Array, x: jax.Array, post_norm: RMSNorm,
                 next_norm: RMSNorm, backend: str) -> tuple[jax.Array, jax.Array]:
    """x + post_norm(h @ w) (the residual stream), and next_norm of it (the next input)."""
    return output_residual_norm(h, w, x, post_norm.scale[...], next_norm.scale[...],
                                eps=post_norm.eps, backend=backend)


class Block(nnx.Module):
    """Pre/post-normed attention then pre/post-normed GeGLU, each with a residual.

    A block takes the residual stream with its pre-attention norm already applied and returns
    the stream with the next norm (`next_norm`: the next block's pre-attention norm, or the
    final norm) applied, so that every sublayer ends in one `sublayer_end`.
    """

    def __init__(self, config: GemmaConfig, layer_type: LayerType, *, dtype, rngs: nnx.Rngs):
        norm = lambda: RMSNorm(config.d_model, eps=config.rms_norm_eps, dtype=dtype, rngs=rngs)  # noqa: E731
        self.pre_attn_norm = norm()
        self.attn = Attention(config, layer_type, dtype=dtype, rngs=rngs)
        self.post_attn_norm = norm()
        self.pre_ffw_norm = norm()
        self.mlp = FeedForward(config.d_model, config.ffw_hidden, dtype=dtype, rngs=rngs)
        self.post_ffw_norm = norm()

    def __call__(self, x, x_normed, positions, kv_cache, metadata, next_norm: RMSNorm):
        """(x, pre_attn_norm(x)) -> (x', next_norm(x')) and the layer's updated cache."""
        backend = metadata.backend
        heads, kv_cache = self.attn(x_normed, positions, kv_cache, metadata)
        o_proj = self.attn.o_proj[...]
        x, h = sublayer_end(heads, o_proj.reshape(-1, o_proj.shape[-1]), x, self.post_attn_norm,
                            self.pre_ffw_norm, backend)
        x, h = sublayer_end(self.mlp.hidden(h, backend), self.mlp.down[...], x,
                            self.post_ffw_norm, next_norm, backend)
        return x, h, kv_cache


class Gemma(nnx.Module):
    """The decoder: embed, blocks, final norm; `logits` applies the tied output projection."""

    def __init__(self, config: GemmaConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.embedder = Embedder(config.vocab_size, config.d_model, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [Block(config, t, dtype=dtype, rngs=rngs) for t in config.layer_types])
        self.final_norm = RMSNorm(config.d_model, eps=config.rms_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, token_ids: jax.Array, positions: jax.Array, kv_caches: KVCache,
                 metadata: AttentionMetadata) -> tuple[jax.Array, KVCache]:
        """[T] tokens at [T] positions -> final-normed hidden states [T, d], updated caches."""
        x = self.embedder.encode(token_ids)
        h = self.layers[0].pre_attn_norm(x)
        next_norms = [layer.pre_attn_norm for layer in self.layers[1:]] + [self.final_norm]
        new_caches = []
        for layer, next_norm, kv_cache in zip(self.layers, next_norms, kv_caches, strict=True):
            x, h, kv_cache = layer(x, h, positions, kv_cache, metadata, next_norm)
            new_caches.append(kv_cache)
        return h, new_caches

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[N, d] hidden states -> [N, vocab] fp32 logits, final soft-cap applied."""
        return output_logits(self.embedder.embedding[...], hidden, self.config.final_logit_softcap)


def output_logits(embedding: jax.Array, hidden: jax.Array, softcap: float | None) -> jax.Array:
    """Tied output projection: [N, d] hidden -> [N, vocab] fp32 logits, then the final soft-cap."""
    logits = jnp.einsum("nd,vd->nv", hidden, embedding, preferred_element_type=jnp.float32)
    return logits if softcap is None else softcap * jnp.tanh(logits / softcap)
