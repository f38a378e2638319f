"""Differences between the JAX versions we run on (0.10.2 on CPU hosts, 0.11.2 on GPU hosts).

Every version-dependent spelling lives here; the rest of the code imports it from this module.
"""

from __future__ import annotations

import jax

JAX_VERSION: tuple[int, ...] = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def enable_persistent_compilation_cache(path: str) -> None:
    """Turn on JAX's on-disk compilation cache (every executable, however fast it compiled)."""
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
