"""The XLA attention backend against the plain float64 reference on ragged paged batches."""

import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from attention_cases import make_case, reference_attention, relative_error
from jaxpage.pallas_kernels import reference

CASES = {
    "decode_and_prefill_mixed": dict(q_lens=[1, 7, 1, 16], kv_lens=[9, 7, 33, 40]),
    "page_boundaries": dict(q_lens=[1, 1, 1, 3], kv_lens=[15, 16, 17, 32]),
    "single_token_prompt": dict(q_lens=[1], kv_lens=[1]),
    "padding_slots_and_tokens": dict(q_lens=[2, 5], kv_lens=[20, 5], num_seq_slots=4, num_tokens=12),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("soft_cap,window", [(None, None), (5.0, None), (None, 6), (3.0, 17)])
def test_xla_backend_matches_float64_reference(name, group, soft_cap, window):
    rng = np.random.default_rng(zlib.crc32(repr((name, group, soft_cap, window)).encode()))
    case = make_case(rng, num_q_heads=2 * group, num_kv_heads=2, head_dim=32, page_size=16,
                     **CASES[name])
    out = reference.ragged_paged_attention(
        jnp.asarray(case.q), jnp.asarray(case.k_pages), jnp.asarray(case.v_pages),
        jnp.asarray(case.kv_lens), jnp.asarray(case.block_tables),
        jnp.asarray(case.query_start_loc), sm_scale=0.2, soft_cap=soft_cap,
        sliding_window=window)
    ref = reference_attention(case, sm_scale=0.2, soft_cap=soft_cap, sliding_window=window)
    total = int(case.query_start_loc[-1])
    assert relative_error(np.asarray(out)[:total], ref[:total]) <= 1e-5
    assert np.all(np.asarray(out)[total:] == 0), "padding rows must be zero"


def test_xla_backend_bf16_within_tolerance():
    rng = np.random.default_rng(0)
    case = make_case(rng, q_lens=[1, 9, 1], kv_lens=[30, 9, 64], num_q_heads=8, num_kv_heads=4,
                     head_dim=64, page_size=16)
    args = [jnp.asarray(a, jnp.bfloat16) for a in (case.q, case.k_pages, case.v_pages)]
    out = reference.ragged_paged_attention(
        *args, jnp.asarray(case.kv_lens), jnp.asarray(case.block_tables),
        jnp.asarray(case.query_start_loc), sm_scale=0.125, soft_cap=50.0)
    ref = reference_attention(case, sm_scale=0.125, soft_cap=50.0)
    assert relative_error(np.asarray(out, np.float32), ref) <= 2e-2
