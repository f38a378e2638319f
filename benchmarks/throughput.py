"""Offline throughput, vLLM's methodology: N random-token requests at once, ignore_eos, fixed lengths.

    jaxpage bench throughput --model gemma2-2b --workloads 1024x128,sharegpt --num-requests 500

Systems, in one invocation on the same device: jaxpage (LLM.generate), the contiguous-cache JAX
baseline at jaxpage's KV memory budget (benchmarks/contiguous.py) and, with --hf, Hugging Face
transformers generate (static cache + torch.compile) run first in a child process so that JAX
and PyTorch do not compete for device memory.

Each workload's physical floor (benchmarks/floor.py: its FLOPs at the matmul rate and its decode
KV bytes at the copy bandwidth, both measured in the same run) gives every system's `of_floor`,
the floor's time over its own. jaxpage's rows also say how long the run spent with few
sequences running (`seconds_running`: the tail where per-step latency, not throughput, rules),
and `--profile-device` traces jaxpage's run of the first workload once more and splits its
device time by executable and kernel kind.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
import time

from jaxpage.benchmarks import common, device_profile, floor
from jaxpage.models.config import get_config


# Bounds of the running-sequence counts `seconds_running` reports time for: 1-3, 4-15, ...
RUNNING_BINS = (1, 4, 16, 64, 256)


def jaxpage_params(lengths):
    from jaxpage import SamplingParams  # noqa: PLC0415

    return [SamplingParams(temperature=1.0, max_tokens=o, ignore_eos=True) for _, o in lengths]


def run_jaxpage(llm, lengths, prompts) -> dict:
    """Throughput row for jaxpage (the engine is built and compiled beforehand)."""
    params = jaxpage_params(lengths)
    llm.generate(prompt_token_ids=prompts[:8], sampling_params=params[:8], use_tqdm=False)
    preempted = llm.engine.stats().num_preemptions
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    in_tokens, out_tokens = sum(i for i, _ in lengths), sum(o for _, o in lengths)
    return {"system": "jaxpage", "seconds": elapsed, "requests_per_s": len(lengths) / elapsed,
            "output_tokens_per_s": out_tokens / elapsed,
            "total_tokens_per_s": (in_tokens + out_tokens) / elapsed,
            "preemptions": llm.engine.stats().num_preemptions - preempted,
            "seconds_running": seconds_running(
                [(o.metrics.first_scheduled_time, o.metrics.finished_time) for o in outs])}


def seconds_running(spans: list[tuple[float, float]], bins=RUNNING_BINS) -> dict[str, float]:
    """Seconds during which the number of requests between their (start, end) lay in each bin
    ("1-3", "4-15", ..., "256+" for bins 1, 4, 16, 64, 256); time with none running is left out."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(bins, bins[1:])] + [f"{bins[-1]}+"]
    out = dict.fromkeys(labels, 0.0)
    running = 0
    for (t, delta), (t_next, _) in zip(edges, edges[1:]):
        running += delta
        if running >= bins[0]:
            out[labels[sum(running >= b for b in bins) - 1]] += t_next - t
    return out


def run_hf_child(args, spec: str) -> dict | None:
    """HF transformers in a child process (its own CUDA context); None when it fails."""
    cmd = [sys.executable, "-m", "jaxpage.benchmarks.hf_baseline", "--model", args.model,
           "--workload", spec, "--num-requests", str(args.num_requests), "--seed", "1",
           "--json", "-"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(),
                              timeout=args.hf_timeout)
    except subprocess.TimeoutExpired as e:
        print(f"HF baseline for {spec} exceeded {args.hf_timeout} s; its log ends:\n"
              f"{(e.stderr or b'')[-2000:]!r}", file=sys.stderr)
        return None
    print(f"HF baseline {spec} log:\n{proc.stderr[-1500:]}", file=sys.stderr)
    if proc.returncode != 0:
        print(f"HF baseline failed for {spec}:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"system": "hf_transformers", **row}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxpage bench throughput", description=__doc__)
    parser.add_argument("--model", default="gemma2-2b")
    parser.add_argument("--workloads", default="1024x128,sharegpt")
    parser.add_argument("--num-requests", type=int, default=500)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--hf", action="store_true", help="also run the HF transformers baseline")
    parser.add_argument("--hf-timeout", type=float, default=600.0, help="seconds per workload")
    parser.add_argument("--hf-workloads", default=None, help="workloads for HF (default: all)")
    parser.add_argument("--no-contiguous", action="store_true")
    parser.add_argument("--profile-device", action="store_true",
                        help="trace jaxpage's run of the first workload once more (jax.profiler)")
    parser.add_argument("--bandwidth-mib", type=int, default=4096,
                        help="array size of the copy-bandwidth measurement")
    parser.add_argument("--matmul-size", type=int, default=8192,
                        help="n of the [n, n] x [n, n] matmul-rate measurement")
    args = parser.parse_args(argv)
    specs = args.workloads.split(",")
    max_len = min(2048, get_config(args.model).max_context // 2)
    workloads = {s: common.workload(s, args.num_requests, seed=1, max_len=max_len) for s in specs}
    if args.max_model_len is None:
        args.max_model_len = max(i + o for w in workloads.values() for i, o in w) + 16

    hf_specs = args.hf_workloads.split(",") if args.hf_workloads else specs
    hf_rows = {s: run_hf_child(args, s) for s in hf_specs} if args.hf else {}

    from jaxpage.benchmarks.contiguous import run_contiguous  # noqa: PLC0415 - after HF ran

    from jaxpage import LLM  # noqa: PLC0415

    limits = {"hbm_bandwidth_TBps": common.hbm_bandwidth(args.bandwidth_mib << 20) / 1e12,
              "matmul_TFLOPps": floor.matmul_rate(args.matmul_size, dtype=args.dtype) / 1e12}
    model = common.random_model(args.model, dtype=args.dtype)
    floors = {s: floor.workload_floor(model.config, w, flops_per_s=limits["matmul_TFLOPps"] * 1e12,
                                      bytes_per_s=limits["hbm_bandwidth_TBps"] * 1e12,
                                      weight_bytes=common.weight_bytes(model))
              for s, w in workloads.items()}
    t0 = time.perf_counter()
    llm = LLM(model=model, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, attention_backend=args.backend,
              max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization)
    startup = {"startup_s": time.perf_counter() - t0,
               "compile_s": llm.engine.runner.executables.compile_seconds,
               "kv_cache_gib": llm.engine.runner.kv_cache_bytes / 2**30}
    kv_bytes, backend = int(startup["kv_cache_gib"] * 2**30), llm.engine.backend
    prompts = {s: common.random_prompts(w, model.config.vocab_size, seed=2)
               for s, w in workloads.items()}
    rows = []
    for spec, lengths in workloads.items():
        rows.append({"workload": spec, **run_jaxpage(llm, lengths, prompts[spec]), **startup})
        print(json.dumps(rows[-1], default=float), flush=True)
    profile = None
    if args.profile_device:
        spec = specs[0]
        profile = device_profile.trace_run(functools.partial(
            llm.generate, prompt_token_ids=prompts[spec],
            sampling_params=jaxpage_params(workloads[spec]), use_tqdm=False))
        print(f"jaxpage, {spec}, traced:")
        device_profile.print_summary(profile)
    del llm  # frees the KV cache for the baseline
    gc.collect()
    for spec, lengths in workloads.items():
        if not args.no_contiguous:
            rows.append({"workload": spec, **run_contiguous(
                model, lengths, prompts[spec], kv_budget_bytes=kv_bytes, backend=backend,
                max_batch=args.max_num_seqs)})
            print(json.dumps(rows[-1], default=float), flush=True)
        if hf_rows.get(spec):
            rows.append({"workload": spec, **hf_rows[spec]})
    for spec in specs:
        base = next(r for r in rows if r["workload"] == spec and r["system"] == "jaxpage")
        for r in rows:
            if r["workload"] == spec:
                r["jaxpage_speedup"] = base["output_tokens_per_s"] / r["output_tokens_per_s"]
                r["of_floor"] = floors[spec]["floor_s"] / r["seconds"]
    print(f"limits measured now: {limits}")
    for spec, f in floors.items():
        print(f"floor of {spec}: {f['floor_s']:.3g} s = {f['floor_output_tokens_per_s']:.1f} "
              f"out tok/s (work {f['work_s']:.3g} s, longest request {f['serial_s']:.3g} s)")
    common.print_table(rows, ["workload", "system", "requests_per_s", "output_tokens_per_s",
                              "total_tokens_per_s", "batch", "seconds", "compile_s",
                              "jaxpage_speedup", "of_floor"])
    for r in rows:
        if "seconds_running" in r:
            print(f"{r['workload']}: seconds with this many sequences running: "
                  + ", ".join(f"{k} {v:.3g}" for k, v in r["seconds_running"].items()))
    common.save_results(f"throughput-{args.model}", {
        "model": args.model, "rows": rows, "num_requests": args.num_requests, **limits,
        "floors": floors, "device_profile": profile}, plot=lambda path: _plot(rows, floors, path))
    return 0


def _plot(rows, floors, path) -> None:
    specs = list(dict.fromkeys(r["workload"] for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    width = 0.8 / len(systems)
    with common.figure(path, figsize=(7, 4)) as (_, ax):
        for k, system in enumerate(systems):
            vals = [next((r["output_tokens_per_s"] for r in rows
                          if r["workload"] == s and r["system"] == system), 0) for s in specs]
            ax.bar([i + k * width for i in range(len(specs))], vals, width, label=system)
        for i, s in enumerate(specs):  # what no engine can beat on this device
            ax.hlines(floors[s]["floor_output_tokens_per_s"], i - width / 2,
                      i + width * (len(systems) - 0.5), colors="black", linestyles="dashed",
                      label="floor" if i == 0 else None)
        ax.set_xticks([i + width * (len(systems) - 1) / 2 for i in range(len(specs))], specs)
        ax.set_ylabel("output tokens / s")
        ax.legend()


if __name__ == "__main__":
    sys.exit(main())
