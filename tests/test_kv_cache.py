"""KV cache arrays: head shards that keep each array within a kernel's addressing limit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpage.attention import max_cache_array_elements
from jaxpage.kv_cache import addressable_pages, head_shards, init_kv_cache, plan_num_pages
from jaxpage.models.config import get_config
from jaxpage.kv_cache import copy_pages


@pytest.mark.parametrize("heads, per_head, limit, want", [
    (4, 100, None, 1),    # no limit: one array
    (4, 100, 400, 1),     # fits exactly
    (4, 100, 399, 2),     # two arrays of two heads
    (4, 100, 150, 1),     # would need four: more launches than they save, so one array
    (3, 100, 250, 1),     # three heads split no further than one array
    (1, 100, 50, 1),      # one head cannot be split
])
def test_head_shards_are_at_most_two_equal_splits_within_the_limit(heads, per_head, limit, want):
    assert head_shards(heads, per_head, limit) == want


def test_only_the_pallas_gpu_backend_limits_cache_arrays():
    assert max_cache_array_elements("pallas_gpu") == 2**31 - 1  # 32-bit Triton offsets
    assert max_cache_array_elements("xla") is None
    assert max_cache_array_elements("pallas_tpu") is None


def test_layers_over_the_limit_get_tuples_of_head_shards_with_the_same_pages():
    config = get_config("gemma3-tiny")  # 2 kv heads
    pages = {"global": 9, "local": 3}
    per_head = {g: n * 4 * config.head_dim for g, n in pages.items()}
    caches = init_kv_cache(config, pages, 4, jnp.float32, max_array_elements=per_head["global"])
    for (k, v), group in zip(caches, config.layer_types):
        if group == "global":
            assert isinstance(k, tuple) and isinstance(v, tuple) and len(k) == len(v) == 2
            assert all(a.shape == (1, 9, 4, config.head_dim) for a in k + v)
        else:  # 2 heads x 3 pages fit
            assert k.shape == v.shape == (2, 3, 4, config.head_dim)


def test_copy_on_write_copies_the_page_in_every_head_shard():
    config = get_config("gemma3-tiny")
    pages = {"global": 9, "local": 9}
    whole = init_kv_cache(config, pages, 4, jnp.float32)
    rng = np.random.default_rng(0)
    whole = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), whole)
    split = [jax.tree.map(lambda a: tuple(a[h:h + 1] for h in range(a.shape[0])), layer)
             for layer in whole]
    groups = config.layer_groups
    copies = jnp.zeros((len(groups), 2, 2), jnp.int32).at[:, :, 0].set(jnp.asarray([3, 5]))
    want = copy_pages(whole, copies, config.layer_types, groups)
    got = copy_pages(split, copies, config.layer_types, groups)
    for (wk, wv), (gk, gv) in zip(want, got):
        np.testing.assert_array_equal(np.concatenate(gk), wk)
        np.testing.assert_array_equal(np.concatenate(gv), wv)
        np.testing.assert_array_equal(wk[:, 5], wk[:, 3])


def _plan(config, *, kv_bytes, max_num_seqs, max_model_len, limit, num_pages=None):
    return plan_num_pages(config, page_size=4, kv_bytes=kv_bytes, num_pages=num_pages,
                          max_num_seqs=max_num_seqs, max_num_batched_tokens=8,
                          max_model_len=max_model_len, dtype=jnp.float32,
                          max_array_elements=limit)


def test_a_pool_from_memory_stops_at_what_head_shards_address_once_it_holds_every_sequence():
    config = get_config("gemma3-tiny")  # 2 kv heads: up to two one-head shards
    limit = 100 * 4 * config.head_dim  # 100 pages per one-head array
    assert addressable_pages(config, 4, limit) == 100
    assert addressable_pages(config, 4, None) is None
    plenty = 10**9
    uncapped = _plan(config, kv_bytes=plenty, max_num_seqs=2, max_model_len=64, limit=None)
    assert uncapped["global"] > 100
    # 2 sequences of 16 pages fit in 100 pages: the pool stops there
    assert _plan(config, kv_bytes=plenty, max_num_seqs=2, max_model_len=64,
                 limit=limit)["global"] == 100
    # 8 sequences of 16 pages do not: the pool keeps all the memory (one array past the limit)
    assert _plan(config, kv_bytes=plenty, max_num_seqs=8, max_model_len=64,
                 limit=limit) == _plan(config, kv_bytes=plenty, max_num_seqs=8,
                                       max_model_len=64, limit=None)
    # an explicit pool size is the user's
    assert _plan(config, kv_bytes=None, max_num_seqs=2, max_model_len=64, limit=limit,
                 num_pages=500)["global"] == 500
