"""The sublayer-end kernel (jaxpage/pallas_kernels/gpu_norm.py) against the model's plain ops:
sum the split-K partials, round, post-norm, add the residual, norm again.

On CPU the kernel runs in Pallas interpret mode; the `gpu` test compiles it for real model widths
and is skipped without an NVIDIA GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpage.models.norms import rms_norm
from jaxpage.pallas_kernels.gpu_matmul import split_k_partials
from jaxpage.pallas_kernels.gpu_norm import add_rms_norm

EPS = 1e-6


def _inputs(seed, splits, rows_per_split, m, n, partial_dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 4)
    partials = jax.random.normal(keys[0], (splits, rows_per_split, n), jnp.float32)
    residual = (4 * jax.random.normal(keys[1], (m, n), jnp.float32)).astype(jnp.bfloat16)
    post, nxt = ((0.3 * jax.random.normal(k, (n,), jnp.float32)).astype(jnp.bfloat16)
                 for k in keys[2:])
    return partials.astype(partial_dtype), residual, post, nxt


def _plain(partials, residual, post, nxt):
    y = partials[:, :residual.shape[0]].astype(jnp.float32).sum(axis=0).astype(residual.dtype)
    x = residual + rms_norm(y, post, EPS)
    return x, rms_norm(x, nxt, EPS)


def _assert_same(got, want, ulps=0):
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        g32, w32 = np.asarray(g, np.float32), np.asarray(w, np.float32)
        # bf16 keeps 8 significant bits: one rounding step is at most 2^-7 of the value
        np.testing.assert_allclose(g32, w32, rtol=ulps * 2.0 ** -7, atol=ulps * 1e-6)


@pytest.mark.parametrize("splits,rows_per_split,m,n", [
    (4, 16, 5, 96), (8, 16, 16, 64), (1, 16, 1, 40), (2, 64, 64, 160)])
def test_matches_the_sum_the_norms_and_the_residual_add_of_the_plain_model(
        splits, rows_per_split, m, n):
    args = _inputs(0, splits, rows_per_split, m, n)
    _assert_same(add_rms_norm(*args, eps=EPS), _plain(*args))


def test_takes_an_unsplit_projection_output_in_the_activation_dtype():
    args = _inputs(1, 1, 16, 7, 96, partial_dtype=jnp.bfloat16)
    _assert_same(add_rms_norm(*args, eps=EPS), _plain(*args))


def test_with_the_split_k_gemm_it_is_the_sublayer_end_of_the_model():
    keys = jax.random.split(jax.random.key(2), 2)
    h = jax.random.normal(keys[0], (6, 256), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(keys[1], (256, 96), jnp.float32) / 16).astype(jnp.bfloat16)
    _, residual, post, nxt = _inputs(3, 1, 16, 6, 96)
    got = add_rms_norm(split_k_partials(h, w, block_n=32, block_k=64, split_k=4),
                       residual, post, nxt, eps=EPS)
    x = residual + rms_norm(h @ w, post, EPS)
    # the GEMM's fp32 sums run in another order than XLA's: a rounding of y at most
    _assert_same(got, (x, rms_norm(x, nxt, EPS)), ulps=2)


def test_rejects_shapes_that_do_not_fit_together():
    partials, residual, post, nxt = _inputs(4, 2, 16, 5, 96)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(partials, residual[:, :64], post, nxt, eps=EPS)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(partials[:, :4], residual, post, nxt, eps=EPS)
    with pytest.raises(ValueError, match="norm scales"):
        add_rms_norm(partials, residual, post[:64], nxt, eps=EPS)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("splits,m,n", [(8, 64, 2560), (4, 64, 2304), (4, 37, 5376)])
def test_compiled_kernel_on_gpu(splits, m, n):
    args = _inputs(5, splits, 64, m, n)
    # a GPU's rsqrt and its order of the row sums may differ from XLA's by a rounding
    _assert_same(add_rms_norm(*args, eps=EPS, interpret=False), _plain(*args), ulps=1)
