"""Benchmarks, also run as `jaxpage bench NAME`. Results go to benchmarks/results/ (dated)."""

BENCHMARKS = ("kernels", "throughput", "latency", "roofline", "coldstart", "long_context",
              "hf_baseline", "serving", "sharing", "sampler", "gemm")
