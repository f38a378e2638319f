"""EngineConfig: the knobs of one engine instance, validated on construction."""

from __future__ import annotations

import dataclasses
import os

from jaxpage.attention import BACKENDS


def default_compile_workers() -> int:
    """One start-up compile thread per CPU core: XLA compiles each executable on about one core
    (H200 host, 16 cores: gemma2-2b cold start 58.2 s with 8 threads, 48.2 s with 16)."""
    return max(1, min(32, os.cpu_count() or 1))


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine lays out its KV cache and batches work (vLLM's engine arguments)."""

    page_size: int = 16
    num_pages: int | None = None          # pages per layer group; None: size from free memory
    gpu_memory_utilization: float = 0.9   # share of device memory the engine may use in all
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None      # None: the model's context length
    attention_backend: str = "auto"
    enable_prefix_caching: bool = True
    kv_cache_dtype: str | None = None     # None: the model's dtype
    seed: int = 0                         # seeds requests that bring none
    compilation_cache_dir: str | None = "default"  # JAX persistent cache + executables; None: off
    precompile: bool = True               # compile every bucket at start-up (False: on first use)
    compile_workers: int = dataclasses.field(default_factory=default_compile_workers)
    num_decode_steps: int = 4             # decode steps one launch may run (vLLM's multi-step)

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"{field} {why}, got {getattr(self, field)!r}")

        for field in ("page_size", "max_num_seqs", "max_num_batched_tokens", "compile_workers",
                      "num_decode_steps"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(field, "must be a positive integer")
        if self.max_num_batched_tokens < self.max_num_seqs:
            fail("max_num_batched_tokens", f"must be at least max_num_seqs={self.max_num_seqs}")
        if self.page_size & (self.page_size - 1):
            fail("page_size", "must be a power of two")
        if self.num_pages is not None and (not isinstance(self.num_pages, int) or self.num_pages < 2):
            fail("num_pages", "must be None or an integer >= 2 (page 0 is the null page)")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            fail("gpu_memory_utilization", "must be in (0, 1]")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int)
                                               or self.max_model_len < 1):
            fail("max_model_len", "must be None or a positive integer")
        if self.attention_backend != "auto" and self.attention_backend not in BACKENDS:
            fail("attention_backend", f"must be 'auto' or one of {', '.join(BACKENDS)}")
        if self.kv_cache_dtype not in (None, "bfloat16", "float32"):
            fail("kv_cache_dtype", "must be None, 'bfloat16' or 'float32'")
