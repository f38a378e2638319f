"""The Pallas GPU kernel (jaxpage/pallas_kernels/gpu.py) against the float64 reference.

On CPU the kernels run in Pallas interpret mode: small shapes, ragged batches with padding slots
and padding rows, pages in random order and NaN in every slot a sequence does not own. Tests
marked `gpu` compile the real Triton kernels and are skipped without an NVIDIA GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_cases import make_case, reference_attention, relative_error
from jaxpage.attention import AttentionMetadata, QKTransform, split_qkv, write_kv
from jaxpage.models.layers import rope_tables
from jaxpage.pallas_kernels import gpu
from jaxpage.pallas_kernels.gpu_decode import DecodeConfig
from jaxpage.pallas_kernels.gpu_prefill import PrefillConfig
from jaxpage.pallas_kernels.gpu_write import write_kv_pages

WINDOW = 16
# Decode: kv lengths 1, page boundary -1/0/+1, a window that drops part of a page, one that
# drops whole pages exactly; two padding slots and padding rows past the last token.
DECODE = dict(q_lens=[1, 1, 1, 1, 1, 1], kv_lens=[1, 15, 16, 17, 33, 48], num_seq_slots=8,
              num_tokens=9)
# Mixed: decode tokens, a whole prompt, prefill chunks after cached prefixes, a chunk ending on
# a page boundary +1, one padding slot and padding rows.
MIXED = dict(q_lens=[1, 7, 16, 17, 3], kv_lens=[9, 7, 40, 17, 33], num_seq_slots=6, num_tokens=50)
PATHS = {"decode": (DECODE, 1), "prefill": (MIXED, None)}
TOLERANCE = {np.float32: 1e-5, jnp.bfloat16: 2e-2}


def run_kernel(case, *, sm_scale=0.2, soft_cap=None, sliding_window=None, max_query_len=None,
               **configs) -> np.ndarray:
    args = [jnp.asarray(a) for a in (case.q, case.k_pages, case.v_pages, case.kv_lens,
                                     case.block_tables, case.query_start_loc)]
    out = gpu.ragged_paged_attention(*args, sm_scale=sm_scale, soft_cap=soft_cap,
                                     sliding_window=sliding_window, max_query_len=max_query_len,
                                     **configs)
    return np.asarray(out.astype(jnp.float32))


def check(case, out, *, dtype=np.float32, sm_scale=0.2, soft_cap=None, sliding_window=None):
    ref = reference_attention(case, sm_scale=sm_scale, soft_cap=soft_cap,
                              sliding_window=sliding_window)
    total = int(case.query_start_loc[-1])
    assert relative_error(out[:total], ref[:total]) <= TOLERANCE[dtype]
    assert np.all(out[total:] == 0), "padding rows must be zero"


def new_case(seed, spec, *, group, num_kv_heads=2, head_dim=32, page_size=16, dtype=np.float32):
    return make_case(np.random.default_rng(seed), num_q_heads=group * num_kv_heads,
                     num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size,
                     dtype=dtype, **spec)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("soft_cap,window", [(None, None), (5.0, WINDOW)])
def test_matches_reference_for_every_gqa_ratio(path, group, soft_cap, window):
    spec, max_query_len = PATHS[path]
    case = new_case(group, spec, group=group)
    out = run_kernel(case, soft_cap=soft_cap, sliding_window=window, max_query_len=max_query_len)
    check(case, out, soft_cap=soft_cap, sliding_window=window)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("soft_cap,window", [(5.0, None), (None, WINDOW)])
def test_soft_cap_and_window_each_on_their_own(path, soft_cap, window):
    spec, max_query_len = PATHS[path]
    case = new_case(7, spec, group=2)
    out = run_kernel(case, soft_cap=soft_cap, sliding_window=window, max_query_len=max_query_len)
    check(case, out, soft_cap=soft_cap, sliding_window=window)


def _head_shards(pages: np.ndarray, n: int) -> tuple[jax.Array, ...]:
    heads = pages.shape[0] // n
    return tuple(jnp.asarray(pages[i * heads:(i + 1) * heads]) for i in range(n))


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("num_shards", [2, 4])
def test_pages_split_into_head_shards_attend_like_one_array_into_one_output(path, num_shards):
    # One launch per shard (each with 32-bit offsets), all writing rows of the same output.
    spec, max_query_len = PATHS[path]
    case = new_case(31, spec, group=2, num_kv_heads=4)
    args = [jnp.asarray(a) for a in (case.kv_lens, case.block_tables, case.query_start_loc)]
    out = gpu.ragged_paged_attention(
        jnp.asarray(case.q), _head_shards(case.k_pages, num_shards),
        _head_shards(case.v_pages, num_shards), *args, sm_scale=0.2, sliding_window=WINDOW,
        max_query_len=max_query_len)
    check(case, np.asarray(out), sliding_window=WINDOW)
    jaxpr = jax.make_jaxpr(lambda *a: gpu.ragged_paged_attention(
        *a, sm_scale=0.2, max_query_len=max_query_len))(
        jnp.asarray(case.q), _head_shards(case.k_pages, num_shards),
        _head_shards(case.v_pages, num_shards), *args)
    assert str(jaxpr).count("pallas_call[") == num_shards
    joins = [line for line in str(jaxpr).splitlines()
             if "concatenate" in line and "f32[" in line.split("=")[0]]
    assert joins == []  # no shard outputs joined afterwards


@pytest.mark.parametrize("num_splits", [2, 5])
def test_decode_kv_splits_combine_to_the_reference(num_splits):
    # 5 splits over at most 3 key blocks of 16 leaves some splits empty.
    case = new_case(11, DECODE, group=4)
    out = run_kernel(case, sliding_window=40, max_query_len=1,
                     decode_config=DecodeConfig(block_k=16, num_splits=num_splits))
    check(case, out, sliding_window=40)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_sequences_without_a_token_write_no_row(num_splits):
    # A sequence with no new token points at the next sequence's row; it must not overwrite it.
    spec = dict(DECODE, q_lens=[1, 0, 1, 1, 0, 1])
    case = new_case(12, spec, group=2)
    out = run_kernel(case, max_query_len=1,
                     decode_config=DecodeConfig(block_k=16, num_splits=num_splits))
    check(case, out)


def test_prefill_tiles_split_long_chunks_and_skip_pages_outside_the_window():
    # block_m=16 with group 2 -> 8 query rows per tile: chunks of 16/17 rows span several tiles,
    # and key blocks of 16 put window and causal edges inside blocks.
    case = new_case(12, MIXED, group=2)
    cfg = PrefillConfig(block_m=16, block_k=16)
    for window in (None, 5):
        out = run_kernel(case, sliding_window=window, soft_cap=3.0, prefill_config=cfg)
        check(case, out, sliding_window=window, soft_cap=3.0)


def test_prefill_skips_masks_only_on_blocks_every_row_sees_whole():
    # Short chunks deep into long contexts: most key blocks are unmasked, the window's lower edge
    # and the causal edge cut others.
    spec = dict(q_lens=[5, 9, 1], kv_lens=[80, 73, 50], num_seq_slots=4, num_tokens=20)
    case = new_case(20, spec, group=4)
    cfg = PrefillConfig(block_m=32, block_k=16, unmasked_full_blocks=True)
    for window in (None, 40):
        out = run_kernel(case, sliding_window=window, prefill_config=cfg, max_query_len=9)
        check(case, out, sliding_window=window)


def test_prefill_path_also_serves_pure_decode_batches():
    case = new_case(13, DECODE, group=2)
    out = run_kernel(case, sliding_window=WINDOW, max_query_len=None)
    check(case, out, sliding_window=WINDOW)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_bf16_with_larger_pages_and_head_dim(path):
    spec, max_query_len = PATHS[path]
    case = new_case(14, spec, group=2, head_dim=64, page_size=32, dtype=jnp.bfloat16)
    out = run_kernel(case, sm_scale=0.125, soft_cap=50.0, sliding_window=WINDOW,
                     max_query_len=max_query_len)
    check(case, out, dtype=jnp.bfloat16, sm_scale=0.125, soft_cap=50.0, sliding_window=WINDOW)


def test_unowned_pages_do_not_change_the_output():
    # Same batch with unowned slots zeroed instead of NaN: outputs must be bit-identical.
    kwargs = dict(num_q_heads=4, num_kv_heads=2, head_dim=32, page_size=16, **MIXED)
    nan_case = make_case(np.random.default_rng(15), nan_unowned=True, **kwargs)
    zero_case = make_case(np.random.default_rng(15), nan_unowned=False, **kwargs)
    np.testing.assert_array_equal(run_kernel(nan_case, max_query_len=17),
                                  run_kernel(zero_case, max_query_len=17))


@pytest.mark.parametrize("path", sorted(PATHS))
def test_write_kernel_matches_the_xla_write_kv(path):
    spec, max_query_len = PATHS[path]
    case = new_case(21, spec, group=2)
    rng = np.random.default_rng(22)
    k_new, v_new = (jnp.asarray(rng.standard_normal((case.q.shape[0], 2, 32)), jnp.float32)
                    for _ in range(2))
    md = _global_metadata(case, max_query_len)
    pages = jnp.asarray(case.k_pages), jnp.asarray(case.v_pages)
    want = write_kv(*pages, k_new, v_new, md, "global")
    got = write_kv_pages(*pages, jnp.concatenate([k_new, v_new], axis=1), md.query_start_loc,
                         md.kv_lens, md.block_tables["global"], num_q_heads=0)
    for g, w in zip(got[:2], want):  # page 0 (null page) takes padding writes in any order
        np.testing.assert_array_equal(np.asarray(g)[:, 1:], np.asarray(w)[:, 1:])


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
@pytest.mark.parametrize("norm", [False, True], ids=["rope", "norm+rope"])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_write_kernel_norms_and_rotates_q_and_k_as_the_model_does(path, norm, dtype):
    spec, max_query_len = PATHS[path]
    case = new_case(23, spec, group=2, dtype=dtype)
    rng = np.random.default_rng(24)
    qkv = jnp.asarray(rng.standard_normal((case.q.shape[0], 4 + 2 + 2, 32)), dtype)
    q_new, k_new, v_new = split_qkv(qkv, 2)
    qk = _random_qk_transform(rng, qkv.shape[0], norm, dtype)
    md = _global_metadata(case, max_query_len)
    pages = jnp.asarray(case.k_pages), jnp.asarray(case.v_pages)
    want = (*write_kv(*pages, qk.apply(k_new, qk.k_scale), v_new, md, "global"),
            qk.apply(q_new, qk.q_scale))
    got = write_kv_pages(*pages, qkv, md.query_start_loc, md.kv_lens, md.block_tables["global"],
                         num_q_heads=4, qk=qk)
    _assert_writes_match(got, want, TOLERANCE[dtype])


@pytest.mark.parametrize("num_shards", [2, 4])
def test_write_kernel_writes_each_head_into_its_head_shard(num_shards):
    case = new_case(25, PATHS["prefill"][0], group=2, num_kv_heads=4, dtype=np.float32)
    rng = np.random.default_rng(26)
    qkv = jnp.asarray(rng.standard_normal((case.q.shape[0], 8 + 4 + 4, 32)), jnp.float32)
    q_new, k_new, v_new = split_qkv(qkv, 4)
    qk = _random_qk_transform(rng, qkv.shape[0], True, np.float32)
    md = _global_metadata(case, PATHS["prefill"][1])
    pages = jnp.asarray(case.k_pages), jnp.asarray(case.v_pages)
    k_want, v_want = write_kv(*pages, qk.apply(k_new, qk.k_scale), v_new, md, "global")
    k_got, v_got, q_got = write_kv_pages(
        _head_shards(case.k_pages, num_shards), _head_shards(case.v_pages, num_shards), qkv,
        md.query_start_loc, md.kv_lens, md.block_tables["global"], num_q_heads=8, qk=qk)
    assert len(k_got) == len(v_got) == num_shards
    _assert_writes_match((jnp.concatenate(k_got), jnp.concatenate(v_got), q_got),
                         (k_want, v_want, qk.apply(q_new, qk.q_scale)), TOLERANCE[np.float32])


def test_write_kernel_rejects_a_qkv_that_does_not_fit_the_pages():
    case = new_case(27, PATHS["decode"][0], group=2, dtype=np.float32)
    md = _global_metadata(case, 1)
    pages = jnp.asarray(case.k_pages), jnp.asarray(case.v_pages)
    qkv = jnp.zeros((case.q.shape[0], 4 + 2 + 2, 32), jnp.float32)
    args = (md.query_start_loc, md.kv_lens, md.block_tables["global"])
    with pytest.raises(ValueError, match="num_q_heads=3"):
        write_kv_pages(*pages, qkv, *args, num_q_heads=3)
    with pytest.raises(ValueError, match="the 1 kv heads of the pages"):  # qkv has 2
        write_kv_pages(*(p[:1] for p in pages), qkv, *args, num_q_heads=4)


def _random_qk_transform(rng, num_tokens: int, norm: bool, dtype) -> QKTransform:
    cos, sin = rope_tables(jnp.asarray(rng.integers(0, 9000, num_tokens)), 32, base=10_000.0)
    scales = [jnp.asarray(0.3 * rng.standard_normal(32), dtype) for _ in range(2)] if norm else []
    return QKTransform(cos, sin, *scales, eps=1e-6)


def _global_metadata(case, max_query_len: int) -> AttentionMetadata:
    return AttentionMetadata(query_start_loc=jnp.asarray(case.query_start_loc),
                             kv_lens=jnp.asarray(case.kv_lens),
                             block_tables={"global": jnp.asarray(case.block_tables)},
                             max_query_len=max_query_len)


def _assert_writes_match(got, want, tol: float) -> None:
    """(k_pages, v_pages, q) equal; unowned slots hold NaN in both, and page 0 (the null page)
    takes padding writes in any order."""
    for g, w in zip(got, want, strict=True):
        g, w = (np.asarray(a.astype(jnp.float32)) for a in (g, w))
        g, w = (g[:, 1:], w[:, 1:]) if g.ndim == 4 else (g, w)
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol, equal_nan=True)


def _loops_outside_kernels(jaxpr) -> list[str]:
    """Loop primitives (while, scan: both lower to an HLO while) in a jaxpr and its sub-jaxprs,
    not looking inside kernels."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            continue
        if eqn.primitive.name in ("while", "scan"):
            found.append(str(eqn.primitive))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += _loops_outside_kernels(sub)
    return found


@pytest.mark.parametrize("config_name", ["gemma2-tiny", "gemma3-tiny"])
def test_a_step_needs_no_device_loop_outside_the_kernels(config_name):
    # XLA:GPU evaluates a while loop's condition on the host, which would make each step's
    # launch wait for the step before it: model steps and samplers must be loop-free.
    from flax import nnx  # noqa: PLC0415 - model-level check only

    from jaxpage.models.config import get_config  # noqa: PLC0415
    from jaxpage.models.gemma import Gemma  # noqa: PLC0415
    from jaxpage.runner import ModelRunner  # noqa: PLC0415

    model = Gemma(get_config(config_name), dtype=jnp.float32, rngs=nnx.Rngs(0))
    runner = ModelRunner(model, num_pages={g: 32 for g in model.config.layer_groups},
                         page_size=4, max_num_seqs=8, max_num_batched_tokens=32,
                         max_model_len=64, backend="pallas_gpu", kv_dtype=jnp.float32,
                         precompile=False)
    for bucket in [(8, True), (32, False)]:  # a pure-decode and a mixed prefill bucket
        jaxpr = jax.make_jaxpr(runner._forward_fn(*bucket))(
            runner._state_leaves, runner.kv_caches,
            jnp.zeros(runner.step_layout(bucket[0]).size, jnp.int32),
            jnp.zeros(8, jnp.int32))
        assert _loops_outside_kernels(jaxpr.jaxpr) == [], bucket
    sampling = [(k, key) for k, key in runner.executable_keys() if k in ("sample", "penalise")]
    assert {k for k, _ in sampling} == {"sample", "penalise"}
    for kind, key in sampling:
        args = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), runner._args(kind, key)[1])
        jaxpr = jax.make_jaxpr(runner._function(kind, key))(*args)
        assert _loops_outside_kernels(jaxpr.jaxpr) == [], key


def _model_steps(config_name: str, backend: str, decode_steps: int = 3,
                 max_array_elements: int | None = None) -> np.ndarray:
    """Logits of a tiny model: one mixed prefill step (2 prompts + padding rows), then decodes.
    `max_array_elements` splits the cache into head shards (kv_cache.init_kv_cache)."""
    from flax import nnx  # noqa: PLC0415 - model-level check only

    from jaxpage.kv_cache import init_kv_cache  # noqa: PLC0415
    from jaxpage.models.config import get_config  # noqa: PLC0415
    from jaxpage.models.gemma import Gemma  # noqa: PLC0415

    config = get_config(config_name)
    graphdef, state = nnx.split(Gemma(config, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    groups = sorted(set(config.layer_types))
    tables = jnp.asarray([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]], jnp.int32)
    caches = init_kv_cache(config, {g: 9 for g in groups}, 4, jnp.float32,
                           max_array_elements=max_array_elements)

    @jax.jit
    def step(state, caches, ids, pos, qsl, kv_lens):
        md = AttentionMetadata(query_start_loc=qsl, kv_lens=kv_lens, backend=backend,
                               block_tables={g: tables for g in groups},
                               max_query_len=1 if ids.shape[0] == 2 else 11)
        model = nnx.merge(graphdef, state)
        hidden, caches = model(ids, pos, caches, md)
        return model.logits(hidden[qsl[1:] - 1]), caches

    ids = jnp.asarray([2, 17, 99, 5, 8, 13, 21, 34, 55, 89, 144, 2, 5, 7, 11, 3, 0, 0], jnp.int32)
    pos = jnp.asarray(list(range(11)) + list(range(5)) + [0, 0], jnp.int32)
    kv_lens = jnp.asarray([11, 5], jnp.int32)
    with jax.default_matmul_precision("highest"):  # fp32 products on a GPU too, not TF32
        logits, caches = step(state, caches, ids, pos, jnp.asarray([0, 11, 16], jnp.int32),
                              kv_lens)
        out = [logits]
        for _ in range(decode_steps):
            ids, kv_lens = jnp.argmax(logits, -1).astype(jnp.int32), kv_lens + 1
            logits, caches = step(state, caches, ids, kv_lens - 1,
                                  jnp.arange(3, dtype=jnp.int32), kv_lens)
            out.append(logits)
    return np.stack([np.asarray(x) for x in out])


@pytest.mark.parametrize("config_name", ["gemma2-tiny", "gemma3-tiny"])
def test_tiny_models_give_the_same_logits_through_the_gpu_kernel_as_through_xla(config_name):
    # Soft-cap (Gemma 2), sliding window 8 over 11-token prompts, global layers, decode steps.
    want, got = _model_steps(config_name, "xla"), _model_steps(config_name, "pallas_gpu")
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    assert relative_error(got, want) <= 1e-5


@pytest.mark.parametrize("backend", ["xla", "pallas_gpu"])
def test_a_cache_split_into_head_shards_gives_the_same_logits(backend):
    # Caches past the GPU kernels' 32-bit offsets are stored as arrays of whole kv heads.
    from jaxpage.models.config import get_config  # noqa: PLC0415

    one_head = 9 * 4 * get_config("gemma3-tiny").head_dim  # pages x page size x D
    want = _model_steps("gemma3-tiny", backend)
    got = _model_steps("gemma3-tiny", backend, max_array_elements=one_head)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    assert relative_error(got, want) <= 1e-6


@pytest.mark.parametrize("config_name", ["gemma2-tiny", "gemma3-tiny"])
def test_the_write_kernel_path_gives_the_xla_logits_with_head_shards(config_name, monkeypatch):
    # On a GPU the write kernel also norms and rotates q and k; here it runs interpreted.
    from jaxpage import attention  # noqa: PLC0415
    from jaxpage.models.config import get_config  # noqa: PLC0415

    want = _model_steps(config_name, "xla")
    monkeypatch.setattr(attention, "uses_write_kernel", lambda backend: backend == "pallas_gpu")
    one_head = 9 * 4 * get_config(config_name).head_dim
    for limit in (None, one_head):
        got = _model_steps(config_name, "pallas_gpu", max_array_elements=limit)
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
        assert relative_error(got, want) <= 1e-5


def test_bad_inputs_raise_errors_naming_the_problem():
    case = new_case(16, DECODE, group=2)
    args = [jnp.asarray(a) for a in (case.q, case.k_pages, case.v_pages, case.kv_lens,
                                     case.block_tables, case.query_start_loc)]
    with pytest.raises(ValueError, match="multiple of kv heads"):
        gpu.ragged_paged_attention(args[0][:, :3], *args[1:], sm_scale=1.0)
    with pytest.raises(ValueError, match="query_start_loc"):
        gpu.ragged_paged_attention(*args[:5], args[5][:-1], sm_scale=1.0)
    with pytest.raises(ValueError, match="share a dtype"):
        gpu.ragged_paged_attention(args[0].astype(jnp.bfloat16), *args[1:], sm_scale=1.0)
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        gpu.ragged_paged_attention(*(a[..., :24] for a in args[:3]), *args[3:], sm_scale=1.0)


requires_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("head_dim,group", [(256, 2), (128, 2), (256, 4)])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_compiled_kernel_matches_reference_on_gpu(path, head_dim, group):
    spec, max_query_len = PATHS[path]
    for dtype in (np.float32, jnp.bfloat16):
        case = new_case(17, spec, group=group, num_kv_heads=4, head_dim=head_dim, dtype=dtype)
        out = run_kernel(case, sm_scale=head_dim**-0.5, soft_cap=50.0, sliding_window=WINDOW,
                         max_query_len=max_query_len, interpret=False)
        check(case, out, dtype=dtype, sm_scale=head_dim**-0.5, soft_cap=50.0,
              sliding_window=WINDOW)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_compiled_decode_splits_on_gpu(num_splits):
    case = new_case(18, dict(q_lens=[1] * 5, kv_lens=[1, 16, 17, 300, 1000], num_seq_slots=7),
                    group=2, num_kv_heads=4, head_dim=256, dtype=jnp.bfloat16)
    out = run_kernel(case, sm_scale=0.0625, soft_cap=50.0, max_query_len=1, interpret=False,
                     decode_config=DecodeConfig(block_k=64, num_splits=num_splits))
    check(case, out, dtype=jnp.bfloat16, sm_scale=0.0625, soft_cap=50.0)
