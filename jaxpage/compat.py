"""Differences between the JAX versions we run on (0.10.2 on CPU hosts, 0.11.2 on GPU hosts).

Every version-dependent spelling lives here; the rest of the code imports it from this module.
"""

from __future__ import annotations

import os

import jax

JAX_VERSION: tuple[int, ...] = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def default_cache_dir() -> str:
    """$JAXPAGE_CACHE, else ~/.cache/jaxpage: where demo assets and compiled programs live."""
    return os.environ.get("JAXPAGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxpage")


def enable_persistent_compilation_cache(path: str | None = None) -> None:
    """Turn on JAX's on-disk compilation cache (every executable, however fast it compiled)."""
    path = path or os.path.join(default_cache_dir(), "xla")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


# --- Pallas TPU (Mosaic) -------------------------------------------------------------------------


def tpu_compiler_params(dimension_semantics: tuple[str, ...], **kwargs):
    """Mosaic TPU compiler parameters (`pltpu.CompilerParams`; `TPUCompilerParams` before 0.7)."""
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415 - Pallas is imported on use

    cls = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
    return cls(dimension_semantics=dimension_semantics, **kwargs)


def tpu_interpret_races_found() -> bool:
    """Whether the TPU interpret-mode race detector flagged a race in the last detecting run."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # noqa: PLC0415

    races = interpret_pallas_call.races  # an AttributeError here means JAX moved the flag
    return bool(races is not None and races.races_found)


# --- Pallas Triton lowering (jaxpage/pallas_kernels/gpu*.py) ----------------------------------
# Masked loads/stores and compiler parameters of the Triton lowering, spelled
# jax.experimental.pallas.triton.{load, store, CompilerParams} on both 0.10.2 and 0.11.2.


def _pallas_triton():
    from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415 - only GPU kernels use it

    return plgpu


def triton_load(ref, *, mask=None, other=None):
    """Masked load of an indexed ref (`ref.at[...]`); masked lanes read `other`."""
    return _pallas_triton().load(ref, mask=mask, other=other)


def triton_store(ref, value, *, mask=None) -> None:
    """Masked store into an indexed ref (`ref.at[...]`); masked lanes write nothing."""
    _pallas_triton().store(ref, value, mask=mask)


def triton_compiler_params(*, num_warps: int, num_stages: int):
    """`compiler_params=` value for a Triton-lowered pallas_call."""
    return _pallas_triton().CompilerParams(num_warps=num_warps, num_stages=num_stages)
