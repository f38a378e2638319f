"""Device arrays of the paged KV cache: one (k_pages, v_pages) pair per layer.

Layout of each array: [num_kv_heads, num_pages, page_size, head_dim]. Every layer of a layer group
("global" or "local") shares that group's page ids, so one block table per group serves all its
layers. Page 0 of every group is the null page: padding writes land there and no sequence owns it.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from jaxpage.models.config import GemmaConfig

NULL_PAGE = 0


def init_kv_cache(config: GemmaConfig, num_pages: Mapping[str, int], page_size: int,
                  dtype=jnp.bfloat16, sharding: jax.sharding.Sharding | None = None,
                  ) -> list[tuple[jax.Array, jax.Array]]:
    """Zeroed KV pages for every layer; `num_pages[group]` pages (null page included) per group."""
    caches = []
    for layer_type in config.layer_types:
        shape = (config.num_kv_heads, num_pages[layer_type], page_size, config.head_dim)
        caches.append((jnp.zeros(shape, dtype, device=sharding),
                       jnp.zeros(shape, dtype, device=sharding)))
    return caches


def page_bytes(config: GemmaConfig, group: str, page_size: int, dtype=jnp.bfloat16) -> int:
    """Bytes one page id of `group` costs across all the group's layers (keys and values)."""
    layers = sum(1 for t in config.layer_types if t == group)
    return 2 * layers * config.num_kv_heads * page_size * config.head_dim * jnp.dtype(dtype).itemsize
