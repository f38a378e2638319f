"""Gemma 2 / Gemma 3 text decoder over a paged KV cache, one config-driven implementation.

The model works on a packed ragged batch: token_ids and positions are [T] (all sequences of the
step back to back, padded to a bucket), and attention reads/writes the paged cache through
`jaxpage.attention.paged_attention`, which picks the kernel (as `jaxpage.projections` does for
the q/k/v and gated FFW projections).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpage.attention import AttentionMetadata, QKTransform, paged_attention
from jaxpage.models.config import GemmaConfig, LayerType
from jaxpage.models.layers import Embedder, FeedForward, RMSNorm, normal_init, rope_tables
from jaxpage.projections import qkv_projection

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
        qkv = qkv_projection(x, self.q_proj[...], self.kv_proj[...], metadata.backend)
        # qk-norm and RoPE, applied by the attention backend (a GPU kernel fuses them)
        norms = dict(q_scale=self.q_norm.scale[...], k_scale=self.k_norm.scale[...],
                     eps=self.q_norm.eps) if self.use_qk_norm else {}
        qk = QKTransform(*rope_tables(positions, qkv.shape[-1], base=self.rope_base,
                                      scale=self.rope_scale), **norms)
        out, kv_cache = paged_attention(
            qkv, kv_cache, metadata, group=self.layer_type, sm_scale=self.sm_scale,
            soft_cap=self.soft_cap, sliding_window=self.sliding_window, qk=qk)
        return jnp.einsum("tnh,nhd->td", out, self.o_proj[...]), kv_cache


class Block(nnx.Module):
    """Pre/post-normed attention then pre/post-normed GeGLU, each with a residual."""

    def __init__(self, config: GemmaConfig, layer_type: LayerType, *, dtype, rngs: nnx.Rngs):
        norm = lambda: RMSNorm(config.d_model, eps=config.rms_norm_eps, dtype=dtype, rngs=rngs)  # noqa: E731
        self.pre_attn_norm = norm()
        self.attn = Attention(config, layer_type, dtype=dtype, rngs=rngs)
        self.post_attn_norm = norm()
        self.pre_ffw_norm = norm()
        self.mlp = FeedForward(config.d_model, config.ffw_hidden, dtype=dtype, rngs=rngs)
        self.post_ffw_norm = norm()

    def __call__(self, x, positions, kv_cache, metadata):
        h, kv_cache = self.attn(self.pre_attn_norm(x), positions, kv_cache, metadata)
        x = x + self.post_attn_norm(h)
        x = x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x), metadata.backend))
        return x, kv_cache


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
        new_caches = []
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, kv_cache = layer(x, positions, kv_cache, metadata)
            new_caches.append(kv_cache)
        return self.final_norm(x), new_caches

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[N, d] hidden states -> [N, vocab] fp32 logits, final soft-cap applied."""
        return output_logits(self.embedder.embedding[...], hidden, self.config.final_logit_softcap)


def output_logits(embedding: jax.Array, hidden: jax.Array, softcap: float | None) -> jax.Array:
    """Tied output projection: [N, d] hidden -> [N, vocab] fp32 logits, then the final soft-cap."""
    logits = jnp.einsum("nd,vd->nv", hidden, embedding, preferred_element_type=jnp.float32)
    return logits if softcap is None else softcap * jnp.tanh(logits / softcap)
