"""The skinny-GEMM experiment (jaxpage/pallas_kernels/gpu_matmul.py) against an fp32 dot.

On CPU the kernel runs in Pallas interpret mode on small shapes; the `gpu` test compiles the
Triton kernel on the gemma3-4b decode shapes and is skipped without an NVIDIA GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpage.pallas_kernels.gpu_matmul import geglu_matmul, output_columns, skinny_matmul


def _arrays(seed, m, k, *weight_shapes, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.key(seed), 1 + len(weight_shapes))
    x = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
    ws = [(jax.random.normal(kk, s, jnp.float32) * k ** -0.5).astype(dtype)
          for kk, s in zip(keys[1:], weight_shapes)]
    return x, ws


def _reference(x, ws):
    """fp32 x @ each weight ([K, N] or [G, K, N], g-major columns), concatenated along N."""
    x32 = x.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST  # not TF32 on a GPU
    outs = [jnp.einsum("mk,gkn->mgn", x32, w.astype(jnp.float32), precision=hi).reshape(
        x.shape[0], -1) if w.ndim == 3 else jnp.dot(x32, w.astype(jnp.float32), precision=hi)
            for w in ws]
    return np.asarray(jnp.concatenate(outs, axis=1))


def _check(out, x, ws):
    want = _reference(x, ws)
    assert out.shape == want.shape and out.dtype == x.dtype
    # bf16 output: one rounding of values of magnitude ~1 (weights scaled by K^-1/2), plus the
    # order of the fp32 sums.
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("m", [1, 5, 64])
@pytest.mark.parametrize("block_n,block_k,split_k", [(128, 64, 1), (64, 128, 2), (32, 64, 4),
                                                     (128, 32, 8)])
def test_matches_fp32_dot(m, block_n, block_k, split_k):
    x, (w,) = _arrays(m, m, 512, (512, 384))
    if 384 % block_n:
        block_n = 64
    out = jax.jit(lambda x, w: skinny_matmul(x, w, block_n=block_n, block_k=block_k,
                                             split_k=split_k, interpret=True))(x, w)
    _check(out, x, [w])


@pytest.mark.parametrize("split_k", [1, 2])
def test_grouped_and_several_weights_in_one_launch(split_k):
    """q_proj [K, Hq*D] and kv_proj [2, K, Hkv*D] give the model's q|k|v columns."""
    x, ws = _arrays(7, 64, 256, (256, 128), (2, 256, 64))
    assert output_columns(ws) == 256
    out = skinny_matmul(x, ws, block_n=32, block_k=64, split_k=split_k, interpret=True)
    _check(out, x, ws)
    x, (w,) = _arrays(8, 5, 256, (3, 256, 32))  # a lone grouped weight
    _check(skinny_matmul(x, w, block_n=32, block_k=128, interpret=True), x, [w])


def test_float32_inputs():
    x, (w,) = _arrays(3, 16, 256, (256, 256), dtype=jnp.float32)
    out = skinny_matmul(x, w, block_n=64, block_k=64, split_k=2, interpret=True)
    np.testing.assert_allclose(np.asarray(out), _reference(x, [w]), rtol=1e-5, atol=1e-5)


def test_rejects_shapes_it_cannot_tile():
    x, (w,) = _arrays(0, 4, 256, (256, 96))
    with pytest.raises(ValueError, match="block_n"):
        skinny_matmul(x, w, block_n=64, block_k=64)
    with pytest.raises(ValueError, match="split_k"):
        skinny_matmul(x, w, block_n=32, block_k=128, split_k=4)
    with pytest.raises(ValueError, match="power of two"):
        skinny_matmul(x, w, block_n=48, block_k=64)
    with pytest.raises(ValueError, match="M <="):
        skinny_matmul(jnp.zeros((129, 256), w.dtype), w, block_n=32, block_k=64)
    with pytest.raises(ValueError, match="K=256"):
        skinny_matmul(x, jnp.zeros((128, 96), w.dtype), block_n=32, block_k=64)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("k,shapes,config", [
    (2560, [(2560, 2048), (2, 2560, 1024)], dict(block_n=64, block_k=128, split_k=4)),
    (2048, [(2048, 2560)], dict(block_n=64, block_k=128, split_k=4)),
    (10240, [(10240, 2560)], dict(block_n=64, block_k=128, split_k=8)),
    (2560, [(2560, 20480)], dict(block_n=128, block_k=64, split_k=1)),
])
def test_compiled_kernel_on_gpu(k, shapes, config):
    x, ws = _arrays(11, 64, k, *shapes)
    _check(skinny_matmul(x, ws, interpret=False, **config), x, ws)


@pytest.mark.parametrize("m", [1, 5, 64])
def test_geglu_is_gelu_of_the_gate_times_the_up_projection(m):
    x, (gating,) = _arrays(7, m, 128, (128, 2, 96))
    out = geglu_matmul(x, gating, block_n=32, block_k=64)
    gate_up = jnp.einsum("td,dgf->tgf", x, gating)  # the unfused model: bf16 projections
    want = jax.nn.gelu(gate_up[:, 0].astype(jnp.float32), approximate=True) * gate_up[:, 1]
    assert out.shape == (m, 96) and out.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), np.asarray(want),
                               rtol=2e-2, atol=2e-2)


def test_geglu_rejects_shapes_it_cannot_tile():
    x, (gating,) = _arrays(8, 4, 128, (128, 2, 96))
    with pytest.raises(ValueError, match="block_n"):
        geglu_matmul(x, gating, block_n=64)
    with pytest.raises(ValueError, match="expected"):
        geglu_matmul(x, gating.reshape(128, 192))
