"""Device arrays of the paged KV cache: one (k_pages, v_pages) pair per layer.

Layout of each array: [num_kv_heads, num_pages, page_size, head_dim]. Every layer of a layer group
("global" or "local") shares that group's page ids, so one block table per group serves all its
layers. Page 0 of every group is the null page: padding writes land there and no sequence owns it.

With `max_array_elements`, a layer whose K (or V) pages would exceed it is stored as a tuple of
arrays that split the kv heads ("head shards", [Hkv / n, P, page_size, D] each), so that a kernel
can address each one with 32-bit offsets. `jaxpage.attention` takes either form; on the Pallas GPU
backend one write launch fills all shards and the attention launches (one per shard) fill one
output.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxpage.models.config import GemmaConfig

NULL_PAGE = 0

# The attention kernels take one launch per head shard, each filling the GPU with its own kv
# splits. On the H200 (gemma3-4b global layers, 64 x 2048, benchmarks/NOTES.md sessions 5 and 9)
# two shards ran 2 x 66 us against 166 us for one 64-bit array, but four ran 4 x 47 us.
MAX_HEAD_SHARDS = 2


def head_shards(num_kv_heads: int, elements_per_head: int, max_array_elements: int | None) -> int:
    """Fewest arrays (at most MAX_HEAD_SHARDS), each holding the same number of whole kv heads,
    that keep every array within `max_array_elements`; 1 when there is no limit or no such
    split (the kernels then address one large array)."""
    if max_array_elements is None:
        return 1
    for n in range(1, min(num_kv_heads, MAX_HEAD_SHARDS) + 1):
        if num_kv_heads % n == 0 and num_kv_heads // n * elements_per_head <= max_array_elements:
            return n
    return 1


def init_kv_cache(config: GemmaConfig, num_pages: Mapping[str, int], page_size: int,
                  dtype=jnp.bfloat16, sharding: jax.sharding.Sharding | None = None,
                  max_array_elements: int | None = None) -> list:
    """Zeroed KV pages for every layer; `num_pages[group]` pages (null page included) per group.

    Each layer's (k, v) are arrays, or tuples of head shards where one array would exceed
    `max_array_elements`.
    """
    caches = []
    for layer_type in config.layer_types:
        per_head = num_pages[layer_type] * page_size * config.head_dim
        n = head_shards(config.num_kv_heads, per_head, max_array_elements)
        shape = (config.num_kv_heads // n, num_pages[layer_type], page_size, config.head_dim)
        zeros = lambda: jnp.zeros(shape, dtype, device=sharding)  # noqa: E731
        caches.append((zeros(), zeros()) if n == 1 else
                      (tuple(zeros() for _ in range(n)), tuple(zeros() for _ in range(n))))
    return caches


def addressable_pages(config: GemmaConfig, page_size: int,
                      max_array_elements: int | None) -> int | None:
    """Most pages per layer that still fit `max_array_elements` per array when split into the
    most head shards allowed (None: no limit)."""
    if max_array_elements is None:
        return None
    shards = max(n for n in range(1, MAX_HEAD_SHARDS + 1) if config.num_kv_heads % n == 0)
    return max_array_elements // (config.num_kv_heads // shards * page_size * config.head_dim)


def page_bytes(config: GemmaConfig, group: str, page_size: int, dtype=jnp.bfloat16) -> int:
    """Bytes one page id of `group` costs across all the group's layers (keys and values)."""
    layers = sum(1 for t in config.layer_types if t == group)
    return 2 * layers * config.num_kv_heads * page_size * config.head_dim * jnp.dtype(dtype).itemsize


def local_pages_bound(config: GemmaConfig, *, page_size: int, max_num_seqs: int,
                      max_num_batched_tokens: int) -> int:
    """Most local-layer pages the running sequences can hold at once (window + chunk per sequence)."""
    per_seq = -(-(config.sliding_window - 1) // page_size) + 2
    return max_num_seqs * per_seq + -(-max_num_batched_tokens // page_size)


def plan_num_pages(config: GemmaConfig, *, page_size: int, kv_bytes: int | None,
                   num_pages: int | None, max_num_seqs: int, max_num_batched_tokens: int,
                   max_model_len: int, dtype=jnp.bfloat16,
                   max_array_elements: int | None = None) -> dict[str, int]:
    """Pages per layer group (null page included).

    An explicit `num_pages` sets the global pool; otherwise `kv_bytes` of memory is split so that
    the local (sliding-window) pool gets what its running sequences can ever hold and the global
    pool the rest. The local pool never needs more pages than the global one.

    A pool sized from memory stops at what `max_array_elements` lets the kernels address in
    head shards (`addressable_pages`) when that still holds every running sequence at its
    longest: beyond it, pages would only add prefix-cache room, and one array over the limit
    slows every decode step (on the H200, gemma3-4b's global layers took 167 us per step
    against 2 x 66 us for two head shards: benchmarks/NOTES.md, sessions 9-10).
    """
    groups = config.layer_groups
    per_seq_max = -(-max_model_len // page_size)
    bound = min(local_pages_bound(config, page_size=page_size, max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens),
                max_num_seqs * per_seq_max)
    if num_pages is not None:
        local = num_pages if groups == ("local",) else min(num_pages, bound + 1)
        return {g: num_pages if g == "global" else local for g in groups}
    if kv_bytes is None:
        raise ValueError("num_pages=None needs the free device memory (kv_bytes)")
    pages = _split_memory(config, kv_bytes, page_size, dtype, bound)
    cap = addressable_pages(config, page_size, max_array_elements)
    if cap is not None and cap >= max_num_seqs * per_seq_max + 1:
        pages = {g: min(n, cap) for g, n in pages.items()}
    return pages


def _split_memory(config: GemmaConfig, kv_bytes: int, page_size: int, dtype,
                  local_bound: int) -> dict[str, int]:
    """Pages per group from `kv_bytes` of memory; the local pool at most `local_bound` + 1."""
    groups = config.layer_groups
    pb = {g: page_bytes(config, g, page_size, dtype) for g in groups}
    if groups == ("local",):
        return {"local": max(2, kv_bytes // pb["local"])}
    if "local" not in groups:
        return {"global": max(2, kv_bytes // pb["global"])}
    shared = kv_bytes // (pb["global"] + pb["local"])  # both pools the same size
    if shared <= local_bound:
        return {"global": max(2, shared), "local": max(2, shared)}
    local = local_bound + 1
    return {"global": max(2, (kv_bytes - local * pb["local"]) // pb["global"]), "local": local}


def free_kv_bytes(config: GemmaConfig, *, act_dtype, max_num_seqs: int, max_num_batched_tokens: int,
                  memory_utilization: float) -> int:
    """Device memory the KV cache may take: the allowed share of the device, less what is in use
    (weights) and a reserve for one step's activations and logits."""
    stats = jax.local_devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not limit:
        return 512 << 20  # host platforms report no limit: a modest default
    c = config
    act = jnp.dtype(act_dtype).itemsize
    activations = 4 * max_num_batched_tokens * act * (
        2 * c.d_model + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + 3 * c.ffw_hidden)
    logits = 3 * max_num_seqs * c.vocab_size * 4
    reserve = activations + logits + (512 << 20)
    return int(limit * memory_utilization) - stats.get("bytes_in_use", 0) - reserve


def copy_pages(kv_caches, copies: jax.Array, layer_types: Sequence[str], groups: Sequence[str]):
    """Copy-on-write: page copies[g, 0, i] -> copies[g, 1, i] in every layer of group g
    (padding copies are 0 -> 0, the null page onto itself)."""
    out = []
    for layer_cache, t in zip(kv_caches, layer_types):
        src, dst = copies[groups.index(t)]
        out.append(jax.tree.map(lambda pages: pages.at[:, dst].set(pages[:, src]), layer_cache))
    return out
