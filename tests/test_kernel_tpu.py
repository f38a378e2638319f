"""The Pallas TPU (Mosaic) ragged paged attention kernel, run in TPU interpret mode on the CPU.

Every numeric test compares against the float64 loops of `attention_cases.reference_attention`
on random ragged batches whose page tables are random permutations of a shared pool and whose
unowned page slots hold NaN.
"""

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attention_cases import make_case, reference_attention, relative_error
from jaxpage import compat
from jaxpage.attention import AttentionMetadata, paged_attention
from jaxpage.pallas_kernels import tpu

# Small tiles so that tiny batches still need several kv blocks per sequence and several
# sequences per query block.
SMALL_TILES = dict(pages_per_block=2, queries_per_block=8)

CASES = {
    "decode_and_prefill_mixed": dict(q_lens=[1, 7, 1, 16], kv_lens=[9, 7, 33, 40]),
    "page_boundaries_plus_minus_one": dict(q_lens=[1, 1, 1, 3, 1], kv_lens=[15, 16, 17, 32, 33]),
    "single_token_prompt": dict(q_lens=[1], kv_lens=[1]),
    "idle_slots_between_sequences": dict(q_lens=[2, 0, 5, 0, 1], kv_lens=[20, 0, 5, 9, 17]),
    "decode_batch_wider_than_query_block": dict(q_lens=[1] * 11,
                                                kv_lens=[1, 2, 15, 16, 17, 31, 32, 33, 47, 48, 64]),
    "prefill_chunk_spans_query_blocks": dict(q_lens=[3, 21], kv_lens=[50, 45]),
}
# Every case is padded to this shape: padding sequence slots and padding token rows are always
# present, and one compilation per variant serves all cases.
CASE_SHAPE = dict(num_seq_slots=12, num_tokens=32, max_pages=5)
CASE_NUM_PAGES = 32
# (soft_cap, sliding_window) pairs; each case runs under all four, with a GQA ratio per pair.
VARIANTS = {"plain": (None, None), "soft_cap": (5.0, None), "window": (None, 6),
            "soft_cap_and_window": (3.0, 17)}
GROUP_OF_VARIANT = {"plain": 1, "soft_cap": 2, "window": 4, "soft_cap_and_window": 8}


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _arrays(case, dtype=None):
    q, k, v = (jnp.asarray(a, dtype) for a in (case.q, case.k_pages, case.v_pages))
    return q, k, v, jnp.asarray(case.kv_lens), jnp.asarray(case.block_tables), jnp.asarray(
        case.query_start_loc)


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "sliding_window",
                                             "max_query_len", "pages_per_block",
                                             "queries_per_block"))
def _kernel(*args, **kwargs):
    return tpu.ragged_paged_attention(*args, **kwargs)


def _run(case, *, sm_scale=0.2, soft_cap=None, window=None, dtype=None, tables=None, **tiles):
    q, k, v, kv_lens, block_tables, qsl = _arrays(case, dtype)
    if tables is not None:
        block_tables = jnp.asarray(tables)
    out = _kernel(q, k, v, kv_lens, block_tables, qsl, sm_scale=sm_scale, soft_cap=soft_cap,
                  sliding_window=window, **tiles)
    return np.asarray(out.astype(jnp.float32))


def _check(case, out, *, tol, sm_scale=0.2, soft_cap=None, window=None):
    ref = reference_attention(case, sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=window)
    total = int(case.query_start_loc[-1])
    assert relative_error(out[:total], ref[:total]) <= tol
    assert np.all(out[total:] == 0), "padding rows must be zero"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_fp32_matches_float64_reference_on_ragged_batches(name, variant):
    soft_cap, window = VARIANTS[variant]
    group = GROUP_OF_VARIANT[variant]
    num_kv_heads = 2 if group < 8 else 1
    case = make_case(np.random.default_rng(_seed(name, variant)), num_q_heads=group * num_kv_heads,
                     num_kv_heads=num_kv_heads, head_dim=32, page_size=16, **CASE_SHAPE,
                     **CASES[name])
    extra = ((0, 0), (0, CASE_NUM_PAGES - case.k_pages.shape[1]), (0, 0), (0, 0))
    case = dataclasses.replace(case, k_pages=np.pad(case.k_pages, extra, constant_values=np.nan),
                               v_pages=np.pad(case.v_pages, extra, constant_values=np.nan))
    out = _run(case, soft_cap=soft_cap, window=window, **SMALL_TILES)
    _check(case, out, tol=1e-5, soft_cap=soft_cap, window=window)


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_every_gqa_ratio_with_default_tiles(group):
    rng = np.random.default_rng(_seed("gqa", group))
    case = make_case(rng, q_lens=[1, 9, 1, 4], kv_lens=[40, 9, 70, 35], num_q_heads=2 * group,
                     num_kv_heads=2, head_dim=32, page_size=16)
    out = _run(case, soft_cap=50.0, window=20, max_query_len=case.max_query_len)
    _check(case, out, tol=1e-5, soft_cap=50.0, window=20)


@pytest.mark.parametrize("window", [1, 15, 16, 17, 32])
def test_window_edges_at_page_boundaries(window):
    """Windows that start exactly on, one before and one after a page boundary; W=1 sees itself."""
    rng = np.random.default_rng(_seed("window", window))
    case = make_case(rng, q_lens=[1, 4, 1, 18], kv_lens=[33, 48, 16, 49], num_q_heads=4,
                     num_kv_heads=2, head_dim=32, page_size=16)
    out = _run(case, window=window, **SMALL_TILES)
    _check(case, out, tol=1e-5, window=window)


def _rounded_to_bf16(case):
    """The case with q/k/v rounded to bf16, so the reference sees the kernel's exact inputs."""
    round_ = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))
    return dataclasses.replace(case, q=round_(case.q), k_pages=round_(case.k_pages),
                               v_pages=round_(case.v_pages))


@pytest.mark.parametrize("page_size,head_dim", [(16, 128), (64, 32), (128, 64)])
def test_fp32_at_other_page_sizes_and_head_dims(page_size, head_dim):
    rng = np.random.default_rng(_seed("fp32", page_size, head_dim))
    case = make_case(rng, q_lens=[1, 19, 1, 2], kv_lens=[2 * page_size + 1, 19, 3 * page_size, 97],
                     num_q_heads=4, num_kv_heads=2, head_dim=head_dim, page_size=page_size)
    out = _run(case, sm_scale=head_dim**-0.5, soft_cap=30.0, window=page_size + 3,
               pages_per_block=2, queries_per_block=8)
    _check(case, out, tol=1e-5, sm_scale=head_dim**-0.5, soft_cap=30.0, window=page_size + 3)


@pytest.mark.parametrize("page_size,head_dim", [(32, 64), (16, 256)])
def test_bf16_within_tolerance(page_size, head_dim):
    rng = np.random.default_rng(_seed("bf16", page_size, head_dim))
    case = make_case(rng, q_lens=[1, 19, 1, 2], kv_lens=[30, 19, 64, 97], num_q_heads=8,
                     num_kv_heads=2, head_dim=head_dim, page_size=page_size)
    out = _run(case, sm_scale=0.125, soft_cap=50.0, window=40, dtype=jnp.bfloat16,
               pages_per_block=2, queries_per_block=16)
    _check(_rounded_to_bf16(case), out, tol=2e-2, sm_scale=0.125, soft_cap=50.0, window=40)


def test_nan_in_unowned_pages_does_not_change_the_output():
    kwargs = dict(q_lens=[1, 7, 3], kv_lens=[17, 7, 40], num_q_heads=4, num_kv_heads=2,
                  head_dim=32, page_size=16, num_seq_slots=5, num_tokens=16)
    with_nan = make_case(np.random.default_rng(3), nan_unowned=True, **kwargs)
    with_zeros = make_case(np.random.default_rng(3), nan_unowned=False, **kwargs)
    out_nan = _run(with_nan, window=9, **SMALL_TILES)
    out_zeros = _run(with_zeros, window=9, **SMALL_TILES)
    assert np.all(np.isfinite(out_nan))
    np.testing.assert_array_equal(out_nan, out_zeros)


def test_relabelling_physical_pages_does_not_change_the_output():
    rng = np.random.default_rng(4)
    case = make_case(rng, q_lens=[2, 1, 12], kv_lens=[18, 33, 12], num_q_heads=4, num_kv_heads=2,
                     head_dim=32, page_size=16)
    perm = np.concatenate([[0], 1 + rng.permutation(case.k_pages.shape[1] - 1)])
    k_pages, v_pages = np.empty_like(case.k_pages), np.empty_like(case.v_pages)
    k_pages[:, perm], v_pages[:, perm] = case.k_pages, case.v_pages
    relabelled = dataclasses.replace(case, k_pages=k_pages, v_pages=v_pages,
                                     block_tables=perm[case.block_tables].astype(np.int32))
    np.testing.assert_array_equal(_run(case, **SMALL_TILES), _run(relabelled, **SMALL_TILES))


def _poison_unneeded_pages(case, window):
    """Block tables whose entries for pages no query can see point far past the end of the cache.

    Interpret mode bounds-checks every DMA source, so the kernel raises if it copies any of them;
    masking after the copy would not hide it.
    """
    num_pages, page_size = case.k_pages.shape[1], case.k_pages.shape[2]
    tables = case.block_tables.copy()
    poisoned = 0
    for s, kv_len in enumerate(case.kv_lens):
        q_len = int(case.query_start_loc[s + 1] - case.query_start_loc[s])
        needed = range(0)
        if q_len:
            first_key = max(kv_len - q_len - window + 1, 0)  # window start of the first query
            needed = range(first_key // page_size, (kv_len - 1) // page_size + 1)
        for p in range(tables.shape[1]):
            if p not in needed:
                tables[s, p] = num_pages + 1000 + p
                poisoned += 1
    return tables, poisoned


@pytest.mark.parametrize("tiles", [SMALL_TILES, {}], ids=["small_tiles", "default_tiles"])
def test_pages_outside_the_window_are_never_copied(tiles):
    rng = np.random.default_rng(5)
    case = make_case(rng, q_lens=[1, 5, 1, 2], kv_lens=[70, 40, 17, 64], num_q_heads=4,
                     num_kv_heads=2, head_dim=32, page_size=16, num_seq_slots=6, max_pages=6)
    tables, poisoned = _poison_unneeded_pages(case, window=10)
    assert poisoned >= 20, "the case must leave many pages outside the window"
    out = _run(case, window=10, tables=tables, **tiles)
    _check(case, out, tol=1e-5, window=10)


def test_copying_a_poisoned_page_is_detected():
    """The guard above has teeth: an out-of-range id on a page the kernel needs is an error."""
    rng = np.random.default_rng(6)
    case = make_case(rng, q_lens=[1, 3], kv_lens=[40, 20], num_q_heads=2, num_kv_heads=2,
                     head_dim=32, page_size=16)
    tables = case.block_tables.copy()
    tables[0, 2] = case.k_pages.shape[1] + 1000  # holds the decode query's own key
    try:
        with pytest.raises(Exception, match="Out-of-bounds read"):
            _run(case, window=10, tables=tables)
    finally:
        pltpu.reset_tpu_interpret_mode_state()  # a failed interpretation leaves state behind


def test_race_detector_finds_no_race_with_two_cores():
    """Double-buffered page copies never overlap reads of the same slot; parallel grid axes split
    over two simulated cores do not share buffers."""
    rng = np.random.default_rng(8)
    case = make_case(rng, q_lens=[1, 10, 1, 3], kv_lens=[33, 10, 50, 20], num_q_heads=4,
                     num_kv_heads=2, head_dim=32, page_size=16)
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2,
                                   dma_execution_mode="eager", random_seed=0)
    pltpu.reset_tpu_interpret_mode_state()
    with pltpu.force_tpu_interpret_mode(params):
        out = _run(case, window=24, pages_per_block=1, queries_per_block=8)
    assert not compat.tpu_interpret_races_found()
    _check(case, out, tol=1e-5, window=24)


def test_paged_attention_entry_runs_the_kernel_under_jit():
    """`attention_backend="pallas_tpu"` through the model's entry point, against the XLA backend."""
    rng = np.random.default_rng(9)
    case = make_case(rng, q_lens=[3, 1], kv_lens=[3, 21], num_q_heads=4, num_kv_heads=2,
                     head_dim=32, page_size=16, nan_unowned=False)
    tables = {"global": case.block_tables}
    new_k = jnp.asarray(rng.standard_normal((4, 2, 32)), jnp.float32)
    new_v = jnp.asarray(rng.standard_normal((4, 2, 32)), jnp.float32)
    cache = (jnp.asarray(case.k_pages), jnp.asarray(case.v_pages))
    outs = {}
    for backend in ("xla", "pallas_tpu"):
        meta = AttentionMetadata.for_sequences(case.q_lens, case.kv_lens, tables, backend=backend)
        step = jax.jit(functools.partial(paged_attention, group="global", sm_scale=0.3,
                                         soft_cap=20.0, sliding_window=8))
        qkv = jnp.concatenate([jnp.asarray(case.q), new_k, new_v], axis=1)
        outs[backend], _ = step(qkv, cache, meta)
    np.testing.assert_allclose(outs["pallas_tpu"], outs["xla"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,head_dim,page_size", [(jnp.float32, 128, 16),
                                                      (jnp.bfloat16, 256, 128)])
def test_kernel_lowers_to_a_mosaic_tpu_custom_call(dtype, head_dim, page_size):
    """Beyond interpret mode: the Pallas-to-Mosaic lowering accepts every op the kernel uses."""
    shapes = [((64, 8, head_dim), dtype), ((4, 50, page_size, head_dim), dtype),
              ((4, 50, page_size, head_dim), dtype), ((16,), jnp.int32),
              ((16, 8), jnp.int32), ((17,), jnp.int32)]
    fn = jax.jit(functools.partial(tpu.ragged_paged_attention, sm_scale=0.1, soft_cap=50.0,
                                   sliding_window=100, max_query_len=32, interpret=False))
    lowered = fn.trace(*(jax.ShapeDtypeStruct(s, d) for s, d in shapes)).lower(
        lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()


@pytest.mark.parametrize("change,message", [
    (dict(q=np.zeros((4, 3, 32), np.float32)), "multiple of kv heads"),
    (dict(q=np.zeros((4, 4, 16), np.float32)), "head_dim"),
    (dict(v_pages=np.zeros((2, 9, 16, 16), np.float32)), "v_pages shape"),
    (dict(kv_lens=np.zeros((3,), np.int32)), "kv_lens shape"),
    (dict(query_start_loc=np.zeros((2,), np.int32)), "query_start_loc shape"),
    (dict(block_tables=np.zeros((2, 2), np.float32)), "block_tables must be an integer"),
    (dict(q=np.zeros((4, 4, 32), jnp.bfloat16)), "must share a dtype"),
    (dict(k_pages=np.zeros((2, 9, 12, 32), np.float32),
          v_pages=np.zeros((2, 9, 12, 32), np.float32)), "page_size must be a multiple of 8"),
])
def test_malformed_inputs_raise_naming_the_argument(change, message):
    rng = np.random.default_rng(10)
    case = make_case(rng, q_lens=[1, 3], kv_lens=[5, 20], num_q_heads=4, num_kv_heads=2,
                     head_dim=32, page_size=16)
    args = dict(q=case.q, k_pages=case.k_pages, v_pages=case.v_pages, kv_lens=case.kv_lens,
                block_tables=case.block_tables, query_start_loc=case.query_start_loc)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        tpu.ragged_paged_attention(**{k: jnp.asarray(a) for k, a in args.items()}, sm_scale=0.1)


@pytest.mark.parametrize("option,value", [("sliding_window", 0), ("soft_cap", -1.0),
                                          ("queries_per_block", 12), ("pages_per_block", 0)])
def test_bad_options_raise(option, value):
    rng = np.random.default_rng(11)
    case = make_case(rng, q_lens=[1], kv_lens=[5], num_q_heads=2, num_kv_heads=2, head_dim=32,
                     page_size=16)
    with pytest.raises(ValueError, match=option):
        tpu.ragged_paged_attention(*_arrays(case), sm_scale=0.1, **{option: value})

