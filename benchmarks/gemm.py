"""Skinny decode GEMMs: XLA against the Pallas split-K kernel (pallas_kernels/gpu_matmul.py).

    jaxpage bench gemm [--models gemma3-4b,gemma2-2b] [--m 64] [--full] [--configs 64x128x4x3]
    python3 -m jaxpage.benchmarks.gemm ...   (GPU machine, after `source scripts/device_env.sh`)

Per model, the four projections of one decoder layer at M rows (the decode batch), weights in
the model's layout: qkv = q_proj [d, Hq, D] and kv_proj [2, d, Hkv, D] into one [M, (Hq+2Hkv)D]
output, o = o_proj [Hq, D, d], gate_up = gating [d, 2, F], down = [F, d]. XLA runs the model's
own einsums (jitted: its split-K reduce and the q|kv concatenate are timed with it); geglu is
gate_up followed by GELU(gate) * up, against the fused `geglu_matmul`. The Pallas
kernel runs a pruned sweep of (block_n, block_k, split_k) with 3 pipeline stages (`candidates`;
--full: no pruning), then the best few again with 4 stages. Time per call is CUPTI kernel time
of everything a jitted call launches, over R calls that each read another copy of the weights
(and another x), so the L2 (60 MB on the H200) never holds them. Floor: weight bytes / copy
bandwidth measured in the same run. Prints one table; writes results/<date>-gemm[-TAG].json.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jaxpage import projections
from jaxpage.benchmarks import common, kernels
from jaxpage.models.config import get_config
from jaxpage.pallas_kernels import gpu_common as gc
from jaxpage.pallas_kernels.gpu_matmul import geglu_matmul, skinny_matmul

PROJECTIONS = ("qkv", "o", "gate_up", "down", "geglu")
GEGLU_CONFIGS = [(bn, bk, 1, st) for bn in (32, 64, 128) for bk in (64, 128) for st in (3, 4)]
BLOCK_N, BLOCK_K, SPLIT_K = (32, 64, 128), (64, 128, 256), (1, 2, 4, 8)
SMEM_BYTES = 200 << 10  # leave room below the H200's 227 KiB per block
PROGRAMS = (128, 1056)  # ~1 to 8 waves of the H200's 132 SMs
CONFIG_LABEL = "n{block_n} k{block_k} s{split_k} st{num_stages} w{num_warps}"


def projection(config, name: str):
    """(K, N of each kernel-layout weight, stored weight shapes, XLA fn in the model's einsums,
    fn from the stored weights to the kernel's layout: free reshapes only)."""
    d, h, kvh, hd, f = (config.d_model, config.num_heads, config.num_kv_heads, config.head_dim,
                        config.ffw_hidden)
    if name == "qkv":  # the model's einsum path (projections with the "xla" backend)
        def xla(x, w):
            return projections.qkv_projection(x, w[0], w[1], "xla").reshape(len(x), -1)
        return (d, [h * hd, kvh * hd], [(d, h, hd), (2, d, kvh, hd)], xla,
                lambda w: (w[0].reshape(d, -1), w[1].reshape(2, d, -1)))
    if name == "o":
        return (h * hd, [d], [(h, hd, d)],
                lambda x, w: jnp.einsum("tnh,nhd->td", x.reshape(-1, h, hd), w[0]),
                lambda w: w[0].reshape(h * hd, d))
    if name == "geglu":  # gate_up with GELU(gate) * up after it: the FFW's hidden layer
        return (d, [f], [(d, 2, f)], lambda x, w: projections.geglu(x, w[0], "xla"),
                lambda w: w[0])
    if name == "gate_up":
        return (d, [2 * f], [(d, 2, f)],
                lambda x, w: jnp.einsum("td,dgf->tgf", x, w[0]).reshape(len(x), -1),
                lambda w: w[0].reshape(d, 2 * f))
    return f, [d], [(f, d)], lambda x, w: x @ w[0], lambda w: w[0]


def candidates(k: int, n: int, widths: list[int], m: int,
               full: bool) -> list[tuple[int, int, int]]:
    """(block_n, block_k, split_k) that tile the shape and fit 3 stages of shared memory; unless
    `full`: also >= 2 K steps per program, ~1-8 waves of programs, no 32 x 64 weight tiles."""
    m_pad = max(16, gc.next_power_of_2(m))
    out = []
    for bn in BLOCK_N:
        for bk in BLOCK_K:
            for s in SPLIT_K:
                if (any(w % bn for w in widths) or k % (s * bk)
                        or smem(m_pad, bk, bn, 3) > SMEM_BYTES):
                    continue
                programs = n // bn * s
                if full or (k // (s * bk) >= 2 and (bn, bk) != (32, 64)
                            and PROGRAMS[0] <= programs <= PROGRAMS[1]):
                    out.append((bn, bk, s))
    return out


def smem(m_pad: int, block_k: int, block_n: int, stages: int) -> int:
    return stages * (m_pad * block_k + block_k * block_n) * 2


def time_calls(fn, xs, wsets, reps: int):
    """(device us per call, compile seconds, output of call 0, the compiled jit) of one jit of
    len(xs) calls."""
    f = jax.jit(lambda xs, wsets: [fn(x, w) for x, w in zip(xs, wsets)])
    t0 = time.perf_counter()
    compiled = f.lower(xs, wsets).compile()
    compile_s = time.perf_counter() - t0
    first = jax.block_until_ready(compiled(xs, wsets))[0]
    seconds = kernels.device_seconds(compiled, (xs, wsets), reps, 0.0)
    return 1e6 * statistics.median(seconds) / len(xs), compile_s, first, compiled


def kernel_breakdown(compiled, args, calls: int) -> dict[str, float] | None:
    """Device us per call of each kernel a compiled jit launches (CUPTI; None without it)."""
    measure = kernels._cupti_measure()  # noqa: SLF001 - the shared CUPTI probe
    if measure is None:
        return None
    _, timings = measure(compiled, aggregate=False)(*args)
    out = {}
    for name, ms in timings or ():
        out[name[:80]] = out.get(name[:80], 0.0) + 1e3 * ms / calls
    return out


def run_projection(model: str, name: str, m: int, args, bandwidth: float) -> tuple[dict, list]:
    config = get_config(model)
    k, widths, shapes, xla_fn, to_kernel = projection(config, name)
    wbytes = 2 * sum(math.prod(s) for s in shapes)
    copies = max(2, min(16, math.ceil(args.rotate_mib * 2**20 / wbytes)))
    key = jax.random.key(PROJECTIONS.index(name))
    make = jax.jit(lambda key, shape, scale: (jax.random.normal(key, shape, jnp.float32)
                                              * scale).astype(jnp.bfloat16), static_argnums=1)
    xs = [make(jax.random.fold_in(key, i), (m, k), 1.0) for i in range(copies)]
    wsets = [tuple(make(jax.random.fold_in(key, 1000 * i + j), s, k ** -0.5)
                   for j, s in enumerate(shapes)) for i in range(copies)]
    floor_us = 1e6 * wbytes / bandwidth
    head = dict(model=model, proj=name, M=m, K=k, floor_us=floor_us, weight_MB=wbytes / 1e6)
    xla_us, xla_compile, xla_out, xla_exe = time_calls(xla_fn, xs, wsets, args.reps)
    with jax.default_matmul_precision("highest"):  # the fp32 reference
        ref = xla_fn(xs[0].astype(jnp.float32), [w.astype(jnp.float32) for w in wsets[0]])
    def diff(out, base=ref) -> float:
        return float(jnp.abs(out.astype(jnp.float32) - base.astype(jnp.float32)).max())

    n = xla_out.shape[1]
    print(f"{model} {name}: M={m} K={k} N={n} weights {wbytes / 1e6:.1f} MB x {copies} copies, "
          f"floor {floor_us:.1f} us; XLA {xla_us:.1f} us (compile {xla_compile:.1f} s)",
          flush=True)
    configs = ([tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
               if args.configs else GEGLU_CONFIGS if name == "geglu"
               else [(*t, 3) for t in candidates(k, n, widths, m, args.full)])
    sweep, executables = [], {}

    def try_config(bn, bk, s, stages, warps):
        def fn(x, w):
            if name == "geglu":
                return geglu_matmul(x, to_kernel(w), block_n=bn, block_k=bk, num_warps=warps,
                                    num_stages=stages)
            return skinny_matmul(x, to_kernel(w), block_n=bn, block_k=bk, split_k=s,
                                 num_warps=warps, num_stages=stages)

        row = dict(block_n=bn, block_k=bk, split_k=s, num_stages=stages, num_warps=warps)
        try:
            us, compile_s, out, executables[len(sweep)] = time_calls(fn, xs, wsets, args.reps)
            row.update(us=us, compile_s=compile_s, frac_bw=floor_us / us,
                       max_abs_diff_vs_f32=diff(out), max_abs_diff_vs_xla=diff(out, xla_out))
        except Exception as e:  # noqa: BLE001 - a config Triton cannot compile is a result too
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        sweep.append(row)
        print(f"  pallas n{bn} k{bk} s{s} st{stages} w{warps}: " + (
            f"{row['us']:.1f} us ({row['compile_s']:.1f} s compile)" if "us" in row
            else row["error"]), flush=True)

    for warps in [int(w) for w in args.warps.split(",")]:
        for c in configs:
            try_config(*c[:3], c[3] if len(c) > 3 else 3, warps)
    if not args.configs and name != "geglu":  # the best few again with one more stage
        m_pad = max(16, gc.next_power_of_2(m))
        ok = sorted((r for r in sweep if "us" in r), key=lambda r: r["us"])
        for r in ok[:args.restage]:
            if smem(m_pad, r["block_k"], r["block_n"], 4) <= SMEM_BYTES or args.full:
                try_config(r["block_n"], r["block_k"], r["split_k"], 4, r["num_warps"])
    ok = [i for i, r in enumerate(sweep) if "us" in r]
    best = min(ok, key=lambda i: sweep[i]["us"]) if ok else None
    row = dict(head, N=n, xla_us=xla_us, xla_frac_bw=floor_us / xla_us, xla_compile_s=xla_compile,
               xla_max_abs_diff_vs_f32=diff(xla_out),
               xla_kernels=kernel_breakdown(xla_exe, (xs, wsets), copies))
    if best is not None:
        b = sweep[best]
        row.update(pallas_us=b["us"], pallas_frac_bw=floor_us / b["us"], speedup=xla_us / b["us"],
                   config=CONFIG_LABEL.format(**b),
                   max_abs_diff_vs_xla=b["max_abs_diff_vs_xla"],
                   max_abs_diff_vs_f32=b["max_abs_diff_vs_f32"],
                   pallas_kernels=kernel_breakdown(executables[best], (xs, wsets), copies))
    print(f"  -> best {row.get('config')}: {row.get('pallas_us', math.nan):.1f} us; max |diff| vs "
          f"XLA {row.get('max_abs_diff_vs_xla', math.nan):.3g}, vs fp32 "
          f"{row.get('max_abs_diff_vs_f32', math.nan):.3g} (XLA vs fp32 "
          f"{row['xla_max_abs_diff_vs_f32']:.3g})", flush=True)
    for label in ("xla_kernels", "pallas_kernels"):
        for kname, us in (row.get(label) or {}).items():
            print(f"     {label[:-8]:6s} {us:7.2f} us  {kname}", flush=True)
    return row, [dict(model=model, proj=name, M=m, **r) for r in sweep]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxpage bench gemm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gemma3-4b,gemma2-2b")
    parser.add_argument("--projections", default=",".join(PROJECTIONS))
    parser.add_argument("--m", default="64", help="rows (decode batch); comma-separated list")
    parser.add_argument("--full", action="store_true", help="sweep every valid tile, unpruned")
    parser.add_argument("--configs", default="",
                        help="time only these: BNxBKxSPLIT[xSTAGES],... (e.g. 64x128x4x3)")
    parser.add_argument("--warps", default="4", help="num_warps values, comma-separated")
    parser.add_argument("--restage", type=int, default=3,
                        help="time the best N configs again with 4 pipeline stages")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rotate-mib", type=int, default=kernels.L2_ROTATE_BYTES >> 20,
                        help="weight copies per timed call add up to at least this")
    parser.add_argument("--bandwidth-mib", type=int, default=4096,
                        help="size of the copy that measures HBM bandwidth")
    parser.add_argument("--tag", default="", help="results file: <date>-gemm[-TAG].json")
    args = parser.parse_args(argv)
    unknown = set(args.projections.split(",")) - set(PROJECTIONS)
    if unknown:
        parser.error(f"unknown projections {sorted(unknown)}; choose from {list(PROJECTIONS)}")
    t0 = time.perf_counter()
    bandwidth = common.hbm_bandwidth(args.bandwidth_mib << 20)
    print(f"copy bandwidth (read+write): {bandwidth / 1e12:.2f} TB/s; Pallas "
          f"{'interpret mode' if gc.interpret_mode() else 'Triton'}", flush=True)
    rows, sweep = [], []

    def timing() -> str:
        return "CUPTI kernel time" if kernels._CUPTI["ok"] else "host clock"  # noqa: SLF001

    def save() -> list:  # after every projection, so a crash keeps what was measured
        return common.save_results(f"gemm-{args.tag}" if args.tag else "gemm", {
            "copy_bandwidth_TBps": bandwidth / 1e12, "timing": timing(), "rows": rows,
            "sweep": sweep, "elapsed_s": time.perf_counter() - t0})

    for model in args.models.split(","):
        for m in [int(v) for v in args.m.split(",")]:
            for name in args.projections.split(","):
                row, tried = run_projection(model, name, m, args, bandwidth)
                rows.append(row)
                sweep += tried
                save()
            layer = [r for r in rows if r["model"] == model and r["M"] == m]
            if any(r["proj"] == "geglu" for r in layer):  # it replaces gate_up in a layer
                layer = [r for r in layer if r["proj"] != "gate_up"]
            total = dict(model=model, proj="layer", M=m,
                         **{c: sum(r.get(c, math.nan) for r in layer)
                            for c in ("weight_MB", "floor_us", "xla_us", "pallas_us")})
            total.update(xla_frac_bw=total["floor_us"] / total["xla_us"],
                         pallas_frac_bw=total["floor_us"] / total["pallas_us"],
                         speedup=total["xla_us"] / total["pallas_us"])
            rows.append(total)
    print(f"\nM x K @ K x N, bf16; {timing()}, median per call; frac = floor / time "
          f"(copy bandwidth {bandwidth / 1e12:.2f} TB/s); took {time.perf_counter() - t0:.0f} s")
    common.print_table(rows, ["model", "proj", "M", "K", "N", "weight_MB", "floor_us", "xla_us",
                              "xla_frac_bw", "pallas_us", "pallas_frac_bw", "speedup", "config",
                              "max_abs_diff_vs_xla"])
    for path in save():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
