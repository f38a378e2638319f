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
from jaxpage.pallas_kernels.gpu_prefill import PrefillConfig

DECODE_SIZES = ((8, 1024), (64, 2048), (128, 4096))
HEADS = ((8, 4, 256), (32, 16, 128))  # (q heads, kv heads, head_dim)
PREFILL_BATCHES = (1, 4)
PREFILL_NEW, PREFILL_CTX = 512, 4096
L2_ROTATE_BYTES = 200 << 20  # rotate input sets until this much is touched (H200 L2: 60 MB)


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


def make_problem(name, batch, q_len, ctx, hq, hkv, d, page_size, dtype, seed=0,
                 pool_pages: int = 0, spread: bool = False) -> Problem:
    """`pool_pages`: pages per kv head in the K/V buffers (at least what the batch uses), to time
    the kernel on an engine-sized pool; `spread`: the batch's pages scattered over all of it."""
    pages = ctx // page_size
    set_bytes = 2 * batch * ctx * hkv * d * jnp.dtype(dtype).itemsize
    num_sets = max(1, min(8, math.ceil(L2_ROTATE_BYTES / set_bytes)))
    pool_pages = max(pool_pages, batch * pages + 1)
    if pool_pages > batch * pages + 1:
        num_sets = 1  # one engine-sized pool is far larger than the L2
    key = jax.random.key(seed)
    kvs = []
    for i in range(num_sets):
        kk, kv_, key = jax.random.split(jax.random.fold_in(key, i), 3)
        used = (hkv, batch * pages + 1, page_size, d)
        k_pages, v_pages = _rng_array(kk, used, dtype), _rng_array(kv_, used, dtype)
        page_rng = np.random.default_rng(seed + i)
        table = page_rng.permutation(np.arange(1, batch * pages + 1))
        if pool_pages > used[1]:
            ids = (np.arange(used[1]) if not spread else np.concatenate(
                [[0], 1 + page_rng.choice(pool_pages - 1, used[1] - 1, replace=False)]))
            ids = jnp.asarray(ids.astype(np.int32))
            grow = jax.jit(lambda p: jnp.zeros((hkv, pool_pages, page_size, d), dtype)
                           .at[:, ids].set(p))
            k_pages, v_pages = grow(k_pages), grow(v_pages)
            table = np.asarray(ids)[table]
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


_CUPTI = {"ok": None}  # None: not tried yet


def _cupti_measure():
    """jax.experimental.mosaic.gpu.profiler.measure (CUPTI kernel timings), or None."""
    if _CUPTI["ok"] is False or jax.devices()[0].platform != "gpu":
        return None
    try:
        from jax.experimental.mosaic.gpu import profiler  # noqa: PLC0415
        return profiler.measure
    except Exception:  # noqa: BLE001 - fall back to host timing
        _CUPTI["ok"] = False
        return None


def call_overhead_s() -> float:
    f = jax.jit(lambda x: x + 1)
    x = jnp.zeros((8,), jnp.float32)
    times = []
    for _ in range(60):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[10:])


def device_seconds(f, args, reps: int, overhead_s: float) -> list[float]:
    """Seconds of device time per call of jitted f: CUPTI kernel time, else host time."""
    measure = _cupti_measure()
    if measure is not None:
        try:
            _, ms = measure(f, iterations=reps)(*args)
            _CUPTI["ok"] = True
            return [t * 1e-3 for t in ms]
        except Exception as e:  # noqa: BLE001
            if _CUPTI["ok"]:  # CUPTI worked before: this error is the function's own
                raise
            print(f"CUPTI timing unavailable ({e}); using host clock", flush=True)
            _CUPTI["ok"] = False
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0 - overhead_s)
    return times


def time_impl(fn, prob: Problem, overhead_s: float, dtype, reps: int = 20) -> tuple[dict, object]:
    """Median device microseconds per kernel call, and the output for (q 0, KV set 0).

    One timed jit call runs R calls of `fn` with distinct q's (so XLA cannot merge them) over
    the KV sets in rotation (so L2 holds none of them); device time is summed over all kernels
    the call launches (CUPTI; launch gaps not included) and divided by R.
    """
    r = max(4, 2 * len(prob.kvs))
    fill_queries(prob, r, dtype)
    f = jax.jit(lambda qs, kvs: [fn(q, kvs[i % len(kvs)]) for i, q in enumerate(qs)])
    args = (prob.qs[:r], prob.kvs)
    first = jax.block_until_ready(f(*args))[0]
    per_call = [t / r for t in device_seconds(f, args, reps, overhead_s)]
    return dict(us=1e6 * statistics.median(per_call), us_min=1e6 * min(per_call),
                us_max=1e6 * max(per_call), calls_per_timing=r), first


def hbm_bandwidth(overhead_s: float) -> dict:
    """TB/s of an XLA elementwise pass (bytes read + written), an XLA read-only reduction, and
    a torch device-to-device copy (CUDA events) when torch is there."""
    n = 1 << 29  # 1 GiB of bf16
    x = _rng_array(jax.random.key(7), (n,), jnp.bfloat16)
    out = {}
    for name, f, nbytes in (("xla_copy", jax.jit(lambda a: a + 1), 4 * n),
                            ("xla_read", jax.jit(lambda a: a.astype(jnp.float32).sum()), 2 * n)):
        seconds = statistics.median(device_seconds(f, (x,), 20, overhead_s))
        out[name + "_tbps"] = nbytes / seconds / 1e12
    del x
    try:
        import torch  # noqa: PLC0415 - optional reference for the copy ceiling

        a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
        b = torch.empty_like(a)
        ms = []
        for _ in range(25):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            b.copy_(a)
            end.record()
            end.synchronize()
            ms.append(start.elapsed_time(end))
        out["torch_copy_tbps"] = 4 * n / (statistics.median(ms[5:]) * 1e-3) / 1e12
        del a, b
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001
        out["torch_copy"] = f"unavailable: {type(e).__name__}"
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


def write_kv_us(prob: Problem, overhead_s: float) -> dict:
    """Device microseconds of one K/V page write of the step's new tokens, two ways: the XLA
    scatter (attention.write_kv off the GPU path) and our Pallas row-copy kernel.

    Writes are chained in one call; the first copies the cache (no donation here), so the cost
    per write is (t(17 writes) - t(1 write)) / 16.
    """
    from jaxpage.pallas_kernels.gpu_write import write_kv_pages  # noqa: PLC0415

    m = prob.meta
    kv = prob.kvs[0]
    md = AttentionMetadata(query_start_loc=kv["qsl"], kv_lens=kv["kv_lens"],
                           block_tables={"global": kv["block_tables"]}, backend="xla",
                           max_query_len=m["q_len"])
    new = _rng_array(jax.random.key(3), (m["batch"] * m["q_len"], m["kv_heads"], m["head_dim"]),
                     kv["k_pages"].dtype)
    ways = {
        "xla_scatter": lambda kp, vp, k: write_kv(kp, vp, k, k, md, "global"),
        "pallas_write": lambda kp, vp, k: write_kv_pages(
            kp, vp, jnp.concatenate([k, k], axis=1), md.query_start_loc, md.kv_lens,
            kv["block_tables"], num_q_heads=0)[:2],
    }
    out = {}
    for name, write in ways.items():
        def chain(kp, vp, k, n, write=write):
            for _ in range(n):
                kp, vp = write(kp, vp, k)
            return kp, vp

        t = {}
        try:
            for n in (1, 17):
                f = jax.jit(lambda kp, vp, k, n=n: chain(kp, vp, k, n))
                t[n] = statistics.median(device_seconds(
                    f, (kv["k_pages"], kv["v_pages"], new), 10, overhead_s))
            out[name] = 1e6 * (t[17] - t[1]) / 16
        except Exception as e:  # noqa: BLE001
            out[name] = f"error: {type(e).__name__}: {str(e)[:200]}"
    return out


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


def decode_variants(prob: Problem, grid: bool = False) -> dict:
    """Tile/launch variants of our decode kernel around the defaults (with `grid`, every
    split count x keys per step x pipeline depth)."""
    m = prob.meta
    p = gc.AttnParams(sm_scale=1.0, soft_cap=None, sliding_window=None, num_q_heads=m["q_heads"],
                      num_kv_heads=m["kv_heads"], head_dim=m["head_dim"], page_size=m["page_size"],
                      num_pages=m["batch"] * m["ctx"] // m["page_size"] + 1)
    base, _ = gpu.default_configs(p, m["dtype"], m["batch"], m["ctx"] // m["page_size"], False)
    out = {}
    if grid:
        for splits in (1, 2, 3, 4, 6, 8):
            for bk in (32, 64):
                for stages in (2, 3):
                    out[f"sp{splits}_bk{bk}_st{stages}"] = dataclasses.replace(
                        base, num_splits=splits, block_k=bk, num_stages=stages)
        return out
    for bk, stages in ((32, 3), (64, 2), (64, 3)):
        out[f"bk{bk}_w4_s{stages}"] = dataclasses.replace(base, block_k=bk, num_stages=stages)
    out["splits_1"] = dataclasses.replace(base, num_splits=1)
    out["splits_x2"] = dataclasses.replace(base, num_splits=2 * base.num_splits)
    return out


def prefill_variants(head_dim: int) -> dict:
    """Tile variants of our prefill kernel around the defaults (4 warps, 3 stages)."""
    del head_dim
    out = {}
    for block_m, block_k, unmasked in ((32, 32, False), (64, 32, False), (64, 64, False),
                                       (32, 32, True), (64, 32, True)):
        name = f"m{block_m}_bk{block_k}" + ("_unmasked_full" if unmasked else "")
        out[name] = PrefillConfig(block_m=block_m, block_k=block_k, num_warps=4, num_stages=3,
                                  unmasked_full_blocks=unmasked)
    return out


def run_problem(kind, prob, impls, overhead, dtype) -> list[dict]:
    rows, outputs = [], {}
    m = prob.meta
    for name, fn in impls.items():
        row = dict(kind=kind, problem=prob.name, impl=name, **m)
        try:
            reps = 5 if name == "xla_gather" else 20  # tens of ms per call
            timing, outputs[name] = time_impl(fn, prob, overhead, dtype, reps=reps)
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
    ap.add_argument("--decode-sizes", default=None,
                    help="batch x context list for decode (e.g. 64x1024,64x2048); with --sweep, "
                         "every size gets the full split/tile grid")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--soft-cap", type=float, default=50.0)
    ap.add_argument("--pool-gib", type=float, default=0.0,
                    help="decode: size each K/V page buffer to at least this many GiB, as an "
                         "engine's pool is (Pallas switches to 64-bit offsets past 4 GiB)")
    ap.add_argument("--pool-spread", action="store_true",
                    help="with --pool-gib: scatter the batch's pages over the whole pool")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    dtype = jnp.bfloat16
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        print(f"kernels benchmark needs an NVIDIA GPU (default device: {dev.platform})",
              file=sys.stderr)
        return 2
    overhead = call_overhead_s()
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=dev.device_kind, jax=jax.__version__, command=" ".join(sys.argv),
                call_overhead_us=1e6 * overhead, hbm=hbm_bandwidth(overhead))
    info["timing"] = "CUPTI kernel time" if _CUPTI["ok"] else "host clock minus call overhead"
    print(json.dumps(info), flush=True)
    heads = HEADS[:1] if args.quick else HEADS
    sizes = DECODE_SIZES[::2] if args.quick else DECODE_SIZES
    if args.decode_sizes:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.decode_sizes.split(",")]
    rows = []
    for hq, hkv, d in heads:
        for b, ctx in sizes:
            pool = int(args.pool_gib * 2**30) // (hkv * args.page_size * d * 2)
            prob = make_problem(f"decode {b}x{ctx}", b, 1, ctx, hq, hkv, d, args.page_size, dtype,
                                pool_pages=pool, spread=args.pool_spread)
            sweep_here = args.sweep and d == 256 and (args.decode_sizes or (b, ctx) == (128, 4096))
            variants = decode_variants(prob, grid=bool(args.decode_sizes)) if sweep_here else {}
            rows += run_problem("decode", prob, decode_impls(prob, args.soft_cap, variants),
                                overhead, dtype)
            rows += _write_rows(prob, overhead)
            _write_results(args, info, rows, quiet=True)
            del prob
        if args.no_prefill:
            continue
        for b in PREFILL_BATCHES[-1:] if args.quick else PREFILL_BATCHES:
            prob = make_problem(f"prefill {b}x{PREFILL_NEW}/{PREFILL_CTX}", b, PREFILL_NEW,
                                PREFILL_CTX, hq, hkv, d, args.page_size, dtype)
            variants = prefill_variants(d) if args.sweep else {}
            rows += run_problem("prefill", prob, prefill_impls(prob, args.soft_cap, variants),
                                overhead, dtype)
            rows += _write_rows(prob, overhead)
            _write_results(args, info, rows, quiet=True)
            del prob
    _write_results(args, info, rows)
    return 0


def _write_rows(prob: Problem, overhead: float) -> list[dict]:
    rows = []
    for name, us in write_kv_us(prob, overhead).items():
        row = dict(kind="write_kv", problem=prob.name, impl=name, **prob.meta)
        row.update(us=us) if isinstance(us, float) else row.update(error=us)
        rows.append(row)
        print(f"write_kv {prob.name:24} {name:20} " + (f"{us:.1f} us" if isinstance(us, float)
                                                        else us), flush=True)
    return rows


def _write_results(args, info: dict, rows: list[dict], quiet: bool = False) -> None:
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{info['date'][:10]}-kernels-{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(info=info, rows=rows), f, indent=1)
    lines = [f"# Attention kernels, {info['device']}, JAX {info['jax']}, {info['date']}", "",
             f"Command: `{info['command']}`", "",
             "HBM TB/s: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                   for k, v in info["hbm"].items()),
             "", f"Timing: {info['timing']}, median per call", "",
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
