"""The one backend-neutral paged attention entry point that model code calls.

A layer hands over its q/k/v projection for every packed token (one array), the qk-norm and
rotary embedding q and k still need (`QKTransform`), its slice of the paged KV cache and the
step's `AttentionMetadata`; this module transforms q/k, writes the new keys/values into their
pages and runs the kernel chosen by `metadata.backend` (on a GPU the write kernel applies the
transform on the way). Model code never sees which kernel that is.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpage.models.layers import rotate
from jaxpage.models.norms import rms_norm
from jaxpage.pallas_kernels import gpu_common as gc
from jaxpage.pallas_kernels import reference

BACKENDS = ("xla", "pallas_gpu", "pallas_tpu")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where every packed token of a step lives in the paged KV cache.

    query_start_loc: [S+1] int32, sequence s owns packed tokens query_start_loc[s]:[s+1]
    kv_lens:         [S] int32, cached tokens of sequence s after this step's tokens are written
    block_tables:    layer group ("global"/"local") -> [S, max_pages] int32 page ids
    backend:         static; which kernel runs ("xla", "pallas_gpu", "pallas_tpu")
    max_query_len:   static upper bound on any sequence's new tokens (1 for pure decode steps)
    """

    query_start_loc: jax.Array
    kv_lens: jax.Array
    block_tables: dict[str, jax.Array]
    backend: str = dataclasses.field(default="xla", metadata=dict(static=True))
    max_query_len: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def for_sequences(cls, q_lens, kv_lens, block_tables: dict[str, np.ndarray], *,
                      backend: str = "xla", max_query_len: int | None = None,
                      ) -> "AttentionMetadata":
        """Metadata for a host-side list of sequences (tests, the research `generate`)."""
        q_lens = np.asarray(q_lens, np.int32)
        qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        return cls(
            query_start_loc=jnp.asarray(qsl), kv_lens=jnp.asarray(np.asarray(kv_lens, np.int32)),
            block_tables={g: jnp.asarray(np.asarray(t, np.int32)) for g, t in block_tables.items()},
            backend=resolve_backend(backend),
            max_query_len=max_query_len if max_query_len is not None else int(q_lens.max(initial=1)),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QKTransform:
    """What turns a layer's projected q and k [T, H, D] into attention inputs: RMSNorm per head
    with Gemma's (1 + w) scale (skipped where the scale is None), then the rotary embedding by
    the per-token angle tables of `models.layers.rope_tables`."""

    cos: jax.Array                     # [T, D/2] fp32
    sin: jax.Array                     # [T, D/2] fp32
    q_scale: jax.Array | None = None   # [D]
    k_scale: jax.Array | None = None   # [D]
    eps: float = dataclasses.field(default=1e-6, metadata=dict(static=True))

    def apply(self, x: jax.Array, scale: jax.Array | None) -> jax.Array:
        """The transform of q (scale=q_scale) or k (scale=k_scale) [T, H, D], in plain JAX."""
        if scale is not None:
            x = rms_norm(x, scale, self.eps)
        return rotate(x, self.cos, self.sin)


def resolve_backend(name: str) -> str:
    """Map "auto" to the kernel of the default device's chip; validate explicit names."""
    if name == "auto":
        platform = jax.default_backend()
        return {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform, "xla")
    if name not in BACKENDS:
        raise ValueError(
            f"attention_backend must be 'auto' or one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def _kernel(backend: str) -> Callable[..., jax.Array]:
    if backend == "xla":
        return reference.ragged_paged_attention
    if backend == "pallas_gpu":
        from jaxpage.pallas_kernels import gpu  # noqa: PLC0415 - optional, imported on use

        return gpu.ragged_paged_attention
    if backend == "pallas_tpu":
        from jaxpage.pallas_kernels import tpu  # noqa: PLC0415

        return tpu.ragged_paged_attention
    raise ValueError(f"unknown attention backend {backend!r}")


def max_cache_array_elements(backend: str) -> int | None:
    """Largest KV page array the backend's kernels address well, if it has a limit.

    The Pallas GPU (Triton) kernels compute gather offsets in 32 bits only for arrays under
    2**31 elements (4 GiB of bf16); past that every offset is 64-bit and the decode kernel ran
    29 % slower on the H200 (benchmarks/NOTES.md, session 5). Caches are split by kv head
    to stay under it (kv_cache.init_kv_cache).
    """
    return 2**31 - 1 if backend == "pallas_gpu" else None


def uses_write_kernel(backend: str) -> bool:
    """Whether K/V writes (and the q/k transform) run in the Pallas GPU write kernel: on a GPU
    with that backend (off-GPU, interpret mode would be far slower than an XLA scatter)."""
    return backend == "pallas_gpu" and jax.default_backend() == "gpu"


def _each_shard(k_pages, v_pages):
    """(k array, v array, first kv head, end kv head) of each array of a layer's pages, which
    are one array each or tuples of head shards."""
    start = 0
    for kp, vp in zip(gc.as_shards(k_pages), gc.as_shards(v_pages), strict=True):
        yield kp, vp, start, start + kp.shape[0]
        start += kp.shape[0]


def _takes_head_shards(backend: str) -> bool:
    """Whether the backend's kernel attends a tuple of head shards in one call."""
    return backend == "pallas_gpu"


def split_qkv(qkv: jax.Array, num_kv_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [T, Hq, D], k and v [T, Hkv, D] of a projection output [T, Hq + 2 * Hkv, D]."""
    num_q_heads = qkv.shape[1] - 2 * num_kv_heads
    return (qkv[:, :num_q_heads], qkv[:, num_q_heads:num_q_heads + num_kv_heads],
            qkv[:, num_q_heads + num_kv_heads:])


def write_kv(k_pages, v_pages, k: jax.Array, v: jax.Array, metadata: AttentionMetadata,
             group: str):
    """Scatter the step's new keys/values [T, Hkv, D] into their page slots.

    `k_pages`/`v_pages`: one [Hkv, P, ps, D] array each, or tuples of head shards (returned in
    the same form). On a GPU with the Pallas backend a row-copy kernel does it (measured 3-10x
    faster than the XLA scatter); elsewhere an XLA scatter whose padding rows are dropped.
    """
    return _write(k_pages, v_pages, jnp.concatenate([k, v], axis=1), metadata, group, 0)[:2]


def _write(k_pages, v_pages, qkv: jax.Array, metadata: AttentionMetadata, group: str,
           num_q_heads: int, qk: QKTransform | None = None):
    """Write the k/v heads of `qkv` [T, Hq + 2 * Hkv, D] into the layer's pages; returns
    (k_pages, v_pages, q [T, Hq, D]), q and k transformed by `qk` first if given (q is None when
    num_q_heads is 0)."""
    table = metadata.block_tables[group]
    if uses_write_kernel(metadata.backend):
        from jaxpage.pallas_kernels import gpu_write  # noqa: PLC0415

        return gpu_write.write_kv_pages(k_pages, v_pages, qkv, metadata.query_start_loc,
                                        metadata.kv_lens, table, num_q_heads=num_q_heads, qk=qk)
    q, k, v = split_qkv(qkv, (qkv.shape[1] - num_q_heads) // 2)
    if qk is not None:
        q, k = qk.apply(q, qk.q_scale), qk.apply(k, qk.k_scale)
    written = []
    for kp, vp, first, end in _each_shard(k_pages, v_pages):
        num_kv_heads, num_pages, page_size, head_dim = kp.shape
        slots = reference.token_slots(metadata.query_start_loc, metadata.kv_lens, table,
                                      k.shape[0], page_size,
                                      distinct_padding_from=num_pages * page_size)

        def scatter(pages, new):
            flat = pages.reshape(num_kv_heads, num_pages * page_size, head_dim)
            flat = flat.at[:, slots].set(new.swapaxes(0, 1).astype(pages.dtype), mode="drop",
                                         unique_indices=True)
            return flat.reshape(pages.shape)

        written.append((scatter(kp, k[:, first:end]), scatter(vp, v[:, first:end])))
    return (gc.same_form(k_pages, [w[0] for w in written]),
            gc.same_form(k_pages, [w[1] for w in written]), q if num_q_heads else None)


def paged_attention(
    qkv: jax.Array,
    kv_cache: tuple,
    metadata: AttentionMetadata,
    *,
    group: str,
    sm_scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    qk: QKTransform | None = None,
) -> tuple[jax.Array, tuple]:
    """Write the new k/v of `qkv` into the layer's pages, then attend its q over them.

    `qkv` [T, Hq + 2 * Hkv, D]: the layer's projection output, q heads then k heads then v heads
    (one array, so a GPU write kernel reads all three from it without slicing).
    `kv_cache` is (k_pages, v_pages): arrays [Hkv, P, ps, D] or tuples of head shards.
    `qk`: the norm and rotation q and k still need (the GPU write kernel applies it on the way).
    Returns the attention output [T, Hq, D] and the updated cache in the same form.
    """
    num_kv_heads = sum(b - a for *_, a, b in _each_shard(*kv_cache))
    num_q_heads = qkv.shape[1] - 2 * num_kv_heads
    if num_q_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"qkv {qkv.shape} does not hold q heads (a multiple of Hkv) plus k and "
                         f"v for the cache's {num_kv_heads} kv heads")
    kernel = functools.partial(
        _kernel(metadata.backend), kv_lens=metadata.kv_lens,
        block_tables=metadata.block_tables[group], query_start_loc=metadata.query_start_loc,
        sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
        max_query_len=metadata.max_query_len)
    k_pages, v_pages, q = _write(*kv_cache, qkv, metadata, group, num_q_heads, qk)
    if not isinstance(k_pages, tuple) or _takes_head_shards(metadata.backend):
        return kernel(q, k_pages, v_pages), (k_pages, v_pages)
    g = num_q_heads // num_kv_heads
    out = jnp.concatenate([kernel(q[:, a * g:b * g], kp, vp)
                           for kp, vp, a, b in _each_shard(k_pages, v_pages)], axis=1)
    return out, (k_pages, v_pages)
