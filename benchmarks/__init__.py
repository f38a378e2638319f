"""Benchmarks, also run as `jaxpage bench NAME`. Results go to benchmarks/results/ (dated)."""

BENCHMARKS = ("kernels",)
