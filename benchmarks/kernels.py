"""Attention kernel benchmark: our Pallas GPU kernel side by side with the alternatives.

Decode (one new token per sequence, paged KV): ours vs JAX's bundled Triton kernel
(jax.experimental.pallas.ops.gpu.paged_attention) vs XLA gather-then-attend (our reference
backend) vs cuDNN flash attention on a contiguous cache (no soft-cap: cuDNN has none). Prefill
chunks (512 new tokens after 3584 cached): ours vs XLA vs cuDNN. Also the HBM copy bandwidth and
the separate K/V page write (attention.write_kv). Prints a table; writes JSON + markdown.

    jaxpage bench kernels [--quick] [--sweep] [--out DIR]
    PYTHONPATH=. python3 benchmarks/kernels.py ...        (GPU machine, from the repo root)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpage.attention import AttentionMetadata, write_kv
from jaxpage.pallas_kernels import gpu, reference
from jaxpage.pallas_kernels import gpu_common as gc
from jaxpage.pallas_kernels.gpu_decode import DecodeConfig
from jaxpage.pallas_kernels.gpu_prefill import PrefillConfig

DECODE_SIZES = ((8, 1024), (64, 2048), (128, 4096))
HEADS = ((8, 4, 256), (32, 16, 128))  # (q heads, kv heads, head_dim)
PREFILL_BATCHES = (1, 4)
PREFILL_NEW, PREFILL_CTX = 512, 4096
L2_ROTATE_BYTES = 200 << 20  # rotate input sets until this much is touched (H200 L2: 60 MB)
TARGET_CALL_S = 3e-3         # each timed call runs enough kernels to take about this long


@dataclasses.dataclass
class Problem:
    """Inputs of one benchmark size: R distinct q's (no CSE) and a few rotating KV sets."""

    name: str
    qs: list            # per repetition: q [T, Hq, D]
    kvs: list           # dicts: k_pages, v_pages, kv_lens, block_tables, qsl, k_contig, v_contig
    kv_bytes: int       # K+V bytes one call must read
    flops: float        # useful attention FLOPs of one call (causal-with-offset)
    meta: dict


def _rng_array(key, shape, dtype):
    return jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32).astype(dtype))(key)


def make_problem(name, batch, q_len, ctx, hq, hkv, d, page_size, dtype, seed=0) -> Problem:
    pages = ctx // page_size
    set_bytes = 2 * batch * ctx * hkv * d * jnp.dtype(dtype).itemsize
    num_sets = max(1, min(8, math.ceil(L2_ROTATE_BYTES / set_bytes)))
    key = jax.random.key(seed)
    kvs = []
    for i in range(num_sets):
        kk, kv_, key = jax.random.split(jax.random.fold_in(key, i), 3)
        shape = (hkv, batch * pages + 1, page_size, d)
        k_pages, v_pages = _rng_array(kk, shape, dtype), _rng_array(kv_, shape, dtype)
        table = np.random.default_rng(seed + i).permutation(np.arange(1, batch * pages + 1))
        table = jnp.asarray(table.reshape(batch, pages).astype(np.int32))
        tok = jnp.arange(ctx)
        rows = table[:, tok // page_size]  # [B, ctx]
        contig = lambda pages_: pages_[:, rows, tok % page_size].transpose(1, 2, 0, 3)  # noqa: E731
        kvs.append(dict(k_pages=k_pages, v_pages=v_pages, block_tables=table,
                        kv_lens=jnp.full((batch,), ctx, jnp.int32),
                        qsl=jnp.arange(batch + 1, dtype=jnp.int32) * q_len,
                        k_contig=jax.jit(contig)(k_pages), v_contig=jax.jit(contig)(v_pages)))
    visible = sum(ctx - q_len + i + 1 for i in range(q_len))
    return Problem(name=name, qs=[], kvs=kvs, kv_bytes=set_bytes,
                   flops=4.0 * batch * hq * d * visible,
                   meta=dict(batch=batch, q_len=q_len, ctx=ctx, q_heads=hq, kv_heads=hkv,
                             head_dim=d, page_size=page_size, dtype=jnp.dtype(dtype).name,
                             kv_sets=num_sets))


def fill_queries(prob: Problem, reps: int, dtype):
    m = prob.meta
    key = jax.random.key(1234)
    while len(prob.qs) < reps:
        prob.qs.append(_rng_array(jax.random.fold_in(key, len(prob.qs)),
                                  (m["batch"] * m["q_len"], m["q_heads"], m["head_dim"]), dtype))


def call_overhead_s() -> float:
    f = jax.jit(lambda x: x + 1)
    x = jnp.zeros((8,), jnp.float32)
    times = []
    for _ in range(60):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[10:])


def time_impl(fn, prob: Problem, overhead_s: float, dtype, reps: int = 15,
              calls: int | None = None) -> tuple[dict, object]:
    """Median seconds per kernel call, and the output of one call on (q 0, KV set 0).

    A timed jit call runs R kernel calls (distinct q's so XLA cannot merge them, KV sets in
    rotation so L2 holds none of them), with R picked so the call takes ~TARGET_CALL_S; the
    host round trip measured by `call_overhead_s` is subtracted. `calls` fixes R (no
    calibration compile).
    """
    def many(qs, kvs):
        return [fn(q, kvs[i % len(kvs)]) for i, q in enumerate(qs)]

    def timed(r):
        fill_queries(prob, r, dtype)
        f = jax.jit(many)
        args = (prob.qs[:r], prob.kvs)
        first = jax.block_until_ready(f(*args))[0]
        jax.block_until_ready(f(*args))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times.append(time.perf_counter() - t0)
        return times, first

    if calls is None:
        times, first = timed(1)
        r = int(max(1, min(64, TARGET_CALL_S // max(statistics.median(times) - overhead_s, 1e-6))))
        if r > 1:
            times, _ = timed(r)
    else:
        r = calls
        times, first = timed(r)
    per_call = [(t - overhead_s) / r for t in times]
    return dict(us=1e6 * statistics.median(per_call), us_min=1e6 * min(per_call),
                us_max=1e6 * max(per_call), calls_per_timing=r), first


def hbm_bandwidth(overhead_s: float) -> dict:
    """Device-to-device copy (bytes read + written) and a read-only reduction, TB/s."""
    n = 1 << 29  # 1 GiB of bf16
    x = _rng_array(jax.random.key(7), (n,), jnp.bfloat16)
    out = {}
    for name, f, nbytes in (("copy", jax.jit(lambda a: a + 1), 4 * n),
                            ("read", jax.jit(lambda a: a.astype(jnp.float32).sum()), 2 * n)):
        jax.block_until_ready(f(x))
        ts = []
        for _ in range(20):
            t0 = time.perf_counter()
            jax.block_until_ready(f(x))
            ts.append(time.perf_counter() - t0 - overhead_s)
        out[name + "_tbps"] = nbytes / statistics.median(ts) / 1e12
    return out


def decode_impls(prob: Problem, soft_cap: float, variants: dict) -> dict:
    from jax.experimental.pallas.ops.gpu import paged_attention as bundled  # noqa: PLC0415

    scale = prob.meta["head_dim"] ** -0.5

    def ours(cfg=None, cap=soft_cap):
        return lambda q, kv: gpu.ragged_paged_attention(
            q, kv["k_pages"], kv["v_pages"], kv["kv_lens"], kv["block_tables"], kv["qsl"],
            sm_scale=scale, soft_cap=cap, max_query_len=1, decode_config=cfg)

    impls = {"ours": ours(), "ours_nocap": ours(cap=None)}
    for name, cfg in variants.items():
        impls[f"ours[{name}]"] = ours(cfg)
    # The bundled kernel has no sm_scale: it gets q pre-scaled (one tiny multiply, timed with it).
    impls["bundled_pallas"] = lambda q, kv: bundled.paged_attention(
        q * scale, kv["k_pages"], kv["v_pages"], kv["block_tables"], kv["kv_lens"],
        attn_logits_soft_cap=soft_cap)
    impls["xla_gather"] = lambda q, kv: reference.ragged_paged_attention(
        q, kv["k_pages"], kv["v_pages"], kv["kv_lens"], kv["block_tables"], kv["qsl"],
        sm_scale=scale, soft_cap=soft_cap)
    impls["cudnn_contig_nocap"] = lambda q, kv: jax.nn.dot_product_attention(
        q[:, None], kv["k_contig"], kv["v_contig"], scale=scale, implementation="cudnn")[:, 0]
    return impls


def prefill_impls(prob: Problem, soft_cap: float, variants: dict) -> dict:
    scale = prob.meta["head_dim"] ** -0.5
    b, q_len, hq, d = (prob.meta[k] for k in ("batch", "q_len", "q_heads", "head_dim"))

    def ours(cfg=None, cap=soft_cap):
        return lambda q, kv: gpu.ragged_paged_attention(
            q, kv["k_pages"], kv["v_pages"], kv["kv_lens"], kv["block_tables"], kv["qsl"],
            sm_scale=scale, soft_cap=cap, max_query_len=q_len, prefill_config=cfg)

    impls = {"ours": ours(), "ours_nocap": ours(cap=None)}
    for name, cfg in variants.items():
        impls[f"ours[{name}]"] = ours(cfg)
    impls["xla_gather"] = lambda q, kv: reference.ragged_paged_attention(
        q, kv["k_pages"], kv["v_pages"], kv["kv_lens"], kv["block_tables"], kv["qsl"],
        sm_scale=scale, soft_cap=soft_cap)
    # cuDNN's causal mask is top-left aligned, so it attends all 4096 keys (noted FLOPs below).
    impls["cudnn_contig_nocap_full"] = lambda q, kv: jax.nn.dot_product_attention(
        q.reshape(b, q_len, hq, d), kv["k_contig"], kv["v_contig"], scale=scale,
        implementation="cudnn").reshape(b * q_len, hq, d)
    return impls


def write_kv_impl(prob: Problem):
    """attention.write_kv of one step's new K/V (the cache donated, as in the real step)."""
    m = prob.meta
    kv = prob.kvs[0]
    md = AttentionMetadata(query_start_loc=kv["qsl"],
                           kv_lens=kv["kv_lens"], block_tables={"global": kv["block_tables"]},
                           backend="xla", max_query_len=m["q_len"])
    new = _rng_array(jax.random.key(3), (m["batch"] * m["q_len"], m["kv_heads"], m["head_dim"]),
                     kv["k_pages"].dtype)
    reps = 16  # writes chained in one call (in place: the cache is donated)
    f = jax.jit(lambda kp, vp, k: _chain_writes(kp, vp, k, md, reps), donate_argnums=(0, 1))
    kp, vp = jnp.copy(kv["k_pages"]), jnp.copy(kv["v_pages"])
    for _ in range(3):
        kp, vp = f(kp, vp, new)
    jax.block_until_ready(kp)
    ts = []
    for _ in range(10):
        t0 = time.perf_counter()
        kp, vp = f(kp, vp, new)
        jax.block_until_ready(kp)
        ts.append((time.perf_counter() - t0) / reps)
    return 1e6 * statistics.median(ts)


def _chain_writes(kp, vp, k, md, reps):
    for _ in range(reps):
        kp, vp = write_kv(kp, vp, k, k, md, "global")
    return kp, vp


def rel_errors(outputs: dict) -> dict:
    """Relative error of each output vs XLA (soft-capped) or vs ours without cap (nocap ones)."""
    def rel(out, want):
        out, want = np.asarray(out, np.float64), np.asarray(want, np.float64)
        return float(np.linalg.norm(out - want) / np.linalg.norm(want))

    errs = {}
    for name, out in outputs.items():
        if name in ("xla_gather", "ours_nocap") or name.endswith("_full"):
            continue
        base = "ours_nocap" if "nocap" in name else "xla_gather"
        if base in outputs:
            errs[name] = rel(out, outputs[base])
    return errs


def sweep_variants(kind: str, head_dim: int) -> dict:
    if kind == "decode":
        out = {}
        for bk in (32, 64, 128):
            for warps, stages in ((4, 2), (4, 3), (8, 3)):
                out[f"bk{bk}_w{warps}_s{stages}"] = (bk, warps, stages)
        return out
    return {f"m{m}_bk{bk}_w{w}_s{s}": PrefillConfig(block_m=m, block_k=bk, num_warps=w, num_stages=s)
            for m, bk, w, s in ((64, 32, 4, 2), (64, 64, 4, 3), (128, 32, 8, 2), (128, 64, 8, 2),
                                (128, 64, 8, 3), (64, 128, 4, 2))}


def decode_variant_configs(prob: Problem, sweep: dict) -> dict:
    """Concrete DecodeConfigs (splits from the default heuristic) for the sweep entries."""
    m = prob.meta
    p = gc.AttnParams(sm_scale=1.0, soft_cap=None, sliding_window=None,
                          num_q_heads=m["q_heads"], num_kv_heads=m["kv_heads"],
                          head_dim=m["head_dim"], page_size=m["page_size"],
                          num_pages=m["batch"] * m["ctx"] // m["page_size"] + 1)
    base, _ = gpu.default_configs(p, m["dtype"], m["batch"], m["ctx"] // m["page_size"], False)
    out = {}
    for name, (bk, warps, stages) in sweep.items():
        blocks = m["ctx"] // bk
        splits = max(1, min(blocks, -(-4 * 132 // (m["batch"] * m["kv_heads"]))))
        out[name] = DecodeConfig(block_k=bk, num_splits=splits, num_warps=warps, num_stages=stages)
    for mult in (2, 4):
        out[f"default_splits_x{mult}"] = dataclasses.replace(
            base, num_splits=min(m["ctx"] // base.block_k, base.num_splits * mult))
    if base.num_splits > 1:
        out["default_splits_1"] = dataclasses.replace(base, num_splits=1)
    return out


def run_problem(kind, prob, impls, overhead, dtype) -> list[dict]:
    rows, outputs = [], {}
    m = prob.meta
    for name, fn in impls.items():
        row = dict(kind=kind, problem=prob.name, impl=name, **m)
        try:
            calls = rows[0].get("calls_per_timing") if name.startswith("ours[") else None
            timing, outputs[name] = time_impl(fn, prob, overhead, dtype, calls=calls)
            row.update(timing)
            flops = prob.flops
            if name.endswith("_full"):  # attends every key of the context
                flops = 4.0 * m["batch"] * m["q_heads"] * m["head_dim"] * m["q_len"] * m["ctx"]
            row["kv_tbps"] = prob.kv_bytes / (row["us"] * 1e-6) / 1e12
            row["tflops"] = flops / (row["us"] * 1e-6) / 1e12
        except Exception as e:  # noqa: BLE001 - one failing baseline must not end the run
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
    errs = rel_errors(outputs)
    for row in rows:
        if row["impl"] in errs:
            row["rel_err"] = errs[row["impl"]]
        print(_fmt_row(row), flush=True)
    return rows


def _fmt_row(r: dict) -> str:
    size = f"{r['batch']}x{r['ctx']}" + (f" q{r['q_len']}" if r["q_len"] > 1 else "")
    heads = f"{r['q_heads']}/{r['kv_heads']}/D{r['head_dim']}"
    if "error" in r:
        return f"{r['kind']:7} {size:14} {heads:12} {r['impl']:28} ERROR {r['error'][:90]}"
    err = r.get("rel_err")
    err = f"{err:.1e}" if isinstance(err, float) else (str(err)[:40] if err else "")
    return (f"{r['kind']:7} {size:14} {heads:12} {r['impl']:28} {r['us']:9.1f} us "
            f"{r['kv_tbps']:6.2f} TB/s {r['tflops']:7.1f} TF/s  {err}")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="jaxpage bench kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--tag", default="h200", help="file name tag (device)")
    ap.add_argument("--quick", action="store_true", help="D=256 heads only, fewer sizes")
    ap.add_argument("--sweep", action="store_true", help="also time tile/launch variants of ours")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--soft-cap", type=float, default=50.0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    dtype = jnp.bfloat16
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        print(f"kernels benchmark needs an NVIDIA GPU (default device: {dev.platform})", file=sys.stderr)
        return 2
    overhead = call_overhead_s()
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=dev.device_kind, jax=jax.__version__, command=" ".join(sys.argv),
                call_overhead_us=1e6 * overhead, **hbm_bandwidth(overhead))
    print(json.dumps(info), flush=True)
    heads = HEADS[:1] if args.quick else HEADS
    sizes = DECODE_SIZES[::2] if args.quick else DECODE_SIZES
    rows = []
    for hq, hkv, d in heads:
        for b, ctx in sizes:
            prob = make_problem(f"decode {b}x{ctx}", b, 1, ctx, hq, hkv, d, args.page_size, dtype)
            variants = {}
            if args.sweep and d == 256 and (b, ctx) in ((8, 1024), (128, 4096)):
                variants = decode_variant_configs(prob, sweep_variants("decode", d))
            rows += run_problem("decode", prob, decode_impls(prob, args.soft_cap, variants),
                                overhead, dtype)
            rows.append(dict(kind="write_kv", problem=prob.name, impl="write_kv", **prob.meta,
                             us=write_kv_impl(prob)))
            print(f"write_kv {prob.name} {rows[-1]['us']:.1f} us", flush=True)
            _write_results(args, info, rows, quiet=True)
            del prob
        if args.no_prefill:
            continue
        for b in PREFILL_BATCHES[-1:] if args.quick else PREFILL_BATCHES:
            prob = make_problem(f"prefill {b}x{PREFILL_NEW}/{PREFILL_CTX}", b, PREFILL_NEW,
                                PREFILL_CTX, hq, hkv, d, args.page_size, dtype)
            variants = sweep_variants("prefill", d) if args.sweep and b == 4 else {}
            rows += run_problem("prefill", prob, prefill_impls(prob, args.soft_cap, variants),
                                overhead, dtype)
            rows.append(dict(kind="write_kv", problem=prob.name, impl="write_kv", **prob.meta,
                             us=write_kv_impl(prob)))
            print(f"write_kv {prob.name} {rows[-1]['us']:.1f} us", flush=True)
            _write_results(args, info, rows, quiet=True)
            del prob
    _write_results(args, info, rows)
    return 0


def _write_results(args, info: dict, rows: list[dict], quiet: bool = False) -> None:
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{info['date'][:10]}-kernels-{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(info=info, rows=rows), f, indent=1)
    lines = [f"# Attention kernels, {info['device']}, JAX {info['jax']}, {info['date']}", "",
             f"Command: `{info['command']}`", "",
             f"HBM: copy {info['copy_tbps']:.2f} TB/s (read+write), read {info['read_tbps']:.2f} "
             f"TB/s; per-call overhead {info['call_overhead_us']:.0f} us (subtracted)", "",
             "| kind | size | heads q/kv/D | impl | us | KV TB/s | TFLOP/s | rel err |",
             "|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        size = f"{r['batch']}x{r['ctx']}" + (f" q{r['q_len']}" if r["q_len"] > 1 else "")
        heads = f"{r['q_heads']}/{r['kv_heads']}/{r['head_dim']}"
        if "error" in r:
            lines.append(f"| {r['kind']} | {size} | {heads} | {r['impl']} | error | | | "
                         f"{r['error'][:80]} |")
            continue
        err = r.get("rel_err", "")
        err = f"{err:.1e}" if isinstance(err, float) else err
        tb = f"{r['kv_tbps']:.2f}" if "kv_tbps" in r else ""
        tf = f"{r['tflops']:.1f}" if "tflops" in r else ""
        lines.append(f"| {r['kind']} | {size} | {heads} | {r['impl']} | {r['us']:.1f} | {tb} | "
                     f"{tf} | {err} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))
        print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    sys.exit(main())
