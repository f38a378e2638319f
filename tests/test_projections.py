"""The backend-neutral projections: the fused Pallas GEMMs a small GPU step runs give the plain
einsums' result (here in interpret mode), and every other step runs the einsums themselves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpage import projections


def _weights(seed, d=128, hq=4, hkv=2, hd=32, f=96):
    keys = jax.random.split(jax.random.key(seed), 5)
    normal = lambda k, s: (jax.random.normal(k, s, jnp.float32) * d ** -0.5).astype(jnp.bfloat16)  # noqa: E731
    return (normal(keys[0], (12, d)) * d ** 0.5, normal(keys[1], (d, hq, hd)),
            normal(keys[2], (2, d, hkv, hd)), normal(keys[3], (d, 2, f)))


def _einsums(x, q_proj, kv_proj, gating):
    return (projections.qkv_projection(x, q_proj, kv_proj, "xla"),
            projections.geglu(x, gating, "xla"))


def test_a_small_pallas_gpu_step_runs_the_fused_kernels_with_the_einsums_result(monkeypatch):
    x, q_proj, kv_proj, gating = _weights(0)
    want = _einsums(x, q_proj, kv_proj, gating)
    launched = []
    monkeypatch.setattr(projections, "_runs_kernels", lambda backend, tokens: launched.append(
        (backend, tokens)) or backend == "pallas_gpu")
    got = (projections.qkv_projection(x, q_proj, kv_proj, "pallas_gpu"),
           projections.geglu(x, gating, "pallas_gpu"))
    assert launched == [("pallas_gpu", 12)] * 2
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=2e-2, atol=2e-2)
    assert want[0].shape == (12, 4 + 2 * 2, 32)  # q heads, then k heads, then v heads
    np.testing.assert_array_equal(np.asarray(want[0][:, :4]),
                                  np.asarray(jnp.einsum("td,dnh->tnh", x, q_proj)))


@pytest.mark.parametrize("backend, tokens", [("xla", 8), ("pallas_tpu", 8), ("pallas_gpu", 65)])
def test_other_backends_and_larger_steps_keep_the_einsums(backend, tokens):
    assert not projections._runs_kernels(backend, tokens)


def test_tiles_shrink_to_divide_the_shapes_or_give_up():
    assert projections._fit(dict(block_n=64, block_k=256), 2304, [4096, 1024]) == dict(
        block_n=64, block_k=256)
    assert projections._fit(dict(block_n=64, block_k=256), 64, [96]) == dict(
        block_n=32, block_k=64)
    assert projections._fit(dict(block_n=64, block_k=256), 64, [40]) is None


@pytest.mark.parametrize("tokens, k, d, kernels", [
    (9, 256, 64, ["split_k_partials", "add_rms_norm"]),   # long K (the FFW's down projection)
    (9, 64, 96, ["split_k_partials", "add_rms_norm"]),    # short K (the attention output)
    (100, 64, 96, ["add_rms_norm"]),                      # XLA's GEMM, then the kernel
    (200, 64, 96, []),                                    # the plain ops
])
def test_a_pallas_gpu_step_ends_a_sublayer_in_kernels_with_the_einsums_result(
        monkeypatch, tokens, k, d, kernels):
    keys = jax.random.split(jax.random.key(5), 5)
    h = jax.random.normal(keys[0], (tokens, k), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(keys[1], (k, d), jnp.float32) * k ** -0.5).astype(jnp.bfloat16)
    residual = (3 * jax.random.normal(keys[2], (tokens, d), jnp.float32)).astype(jnp.bfloat16)
    post, nxt = ((0.2 * jax.random.normal(kk, (d,), jnp.float32)).astype(jnp.bfloat16)
                 for kk in keys[3:])
    want = projections.output_residual_norm(h, w, residual, post, nxt, eps=1e-6, backend="xla")
    monkeypatch.setattr(projections, "_runs_kernels", lambda backend, tokens, limit=64: (
        backend == "pallas_gpu" and tokens <= limit))
    launched = []
    for name in ("split_k_partials", "add_rms_norm"):
        real = getattr(projections, name)
        monkeypatch.setattr(projections, name, lambda *a, _f=real, _n=name, **kw: (
            launched.append(_n) or _f(*a, **kw)))
    got = projections.output_residual_norm(h, w, residual, post, nxt, eps=1e-6,
                                           backend="pallas_gpu")
    assert launched == kernels
    for g, wnt in zip(got, want, strict=True):
        assert g.shape == wnt.shape == (tokens, d) and g.dtype == wnt.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(wnt, np.float32),
                                   rtol=2e-2, atol=2e-2)


def test_split_k_tiles_fit_k_per_split_or_give_up():
    tiles = dict(block_n=64, block_k=64, split_k=8)
    assert projections._fit(tiles, 10240, [2560]) == tiles
    assert projections._fit(tiles, 256, [64]) == dict(block_n=64, block_k=32, split_k=8)
    assert projections._fit(tiles, 100, [64]) is None  # K is no multiple of split_k
