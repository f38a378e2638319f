"""Decode roofline: step time against the HBM limit, and the host's share of a step.

    jaxpage bench roofline --model gemma2-2b --batches 1,16,64,128,256 --contexts 512,2048,8192

For each (batch, context) the device step time is measured on a synthetic decode batch (pages
allocated as if the context had been prefilled), and model bandwidth utilisation is
MBU = (weight bytes + KV bytes read) / step time / HBM bandwidth, the bandwidth measured in the
same run. Host overhead = engine step time - device step time, with the engine serving real
requests (prefilled for real) in steady decode at --engine-batch x --engine-context; with decode
bursts (--num-decode-steps k > 1) both are per token step, and the device time is that of the
k-step launches the engine runs.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

import jax
import numpy as np

from jaxpage.benchmarks import common, device_profile, hlo_layers


def synthetic_decode(engine, batch: int, context: int, seed: int = 0, steps: int = 1):
    """Sequences whose first `context` tokens are (as if) cached, each decoding its next token
    (and, for steps > 1, the steps - 1 after it in one burst)."""
    from jaxpage.request import Request, Sequence, SeqStatus  # noqa: PLC0415
    from jaxpage.sampling_params import SamplingParams  # noqa: PLC0415
    from jaxpage.scheduler import ScheduledSeq, SchedulerOutput  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    scheduled = []
    for i in range(batch):
        tokens = rng.integers(10, engine.model_config.vocab_size, size=context + 1).tolist()
        request = Request(f"s{i}", None, tokens[:context], params, engine.model_config.eos_ids)
        seq = Sequence(10**9 + i, request, 0, tokens, seed=i, status=SeqStatus.RUNNING)
        request.sequences.append(seq)
        if not (engine.kv.allocate(seq.seq_id, 0, context)
                and engine.kv.allocate(seq.seq_id, context, steps)):  # drops window pages
            for item in scheduled:
                engine.kv.free(item.seq.seq_id)
            engine.kv.free(seq.seq_id)
            return None
        seq.num_computed_tokens = context
        scheduled.append(ScheduledSeq(seq, context, 1, steps))
    return SchedulerOutput(scheduled, [])


def pack_decode(engine, sched):
    rows = [engine._row_spec(item.seq) for item in sched.scheduled]
    return engine.runner.pack(sched, rows, list(range(len(rows))), engine.kv)


def device_step_seconds(engine, sched, reps: int = 30) -> float:
    """Mean over back-to-back launches of one packed decode step (or burst), per token step."""
    packed = pack_decode(engine, sched)
    for _ in range(3):  # compile (first use) and warm up
        engine.runner.collect(engine.runner.launch(packed))
    t0 = time.perf_counter()
    for _ in range(reps):
        handle = engine.runner.launch(packed)
    engine.runner.collect(handle)
    return (time.perf_counter() - t0) / reps / sched.num_steps


def engine_output_tokens(batch: int, context: int, max_num_batched_tokens: int,
                         steps: int = 40) -> int:
    """Output tokens per request of `engine_step_seconds`: the sequences that finish prefill
    first decode while the rest prefill, and all `batch` must still decode through the timed
    steps (and the profiled ones after them)."""
    prefill_steps = -(-batch * context // max_num_batched_tokens)
    return prefill_steps + 2 * steps + 20


def engine_step_seconds(engine, batch: int, context: int, steps: int = 40,
                        profile: bool = False) -> float:
    """Engine time per token step (one engine.step() is one launch: a step or a burst) in steady
    decode of `batch` real requests at ~`context`, over `steps` token steps; with `profile`, as
    many more run under cProfile (not timed) and the top is printed."""
    from jaxpage.engine import OutputKind  # noqa: PLC0415
    from jaxpage.sampling_params import SamplingParams  # noqa: PLC0415

    rng = np.random.default_rng(1)
    params = SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=engine_output_tokens(
        batch, context, engine.config.max_num_batched_tokens, steps))
    for i in range(batch):
        engine.add_request(f"e{i}", prompt_token_ids=rng.integers(
            10, engine.model_config.vocab_size, size=context).tolist(), params=params,
            output_kind=OutputKind.FINAL_ONLY)
    while any(s.num_output_tokens < 3 for r in engine.requests.values() for s in r.sequences):
        engine.step()  # prefill, then a few decode steps
    probe = next(iter(engine.requests.values())).sequences[0]

    def run_token_steps() -> int:
        first = probe.num_output_tokens
        while probe.num_output_tokens - first < steps:
            engine.step()
        return probe.num_output_tokens - first

    t0 = time.perf_counter()
    done = run_token_steps()
    elapsed = (time.perf_counter() - t0) / done
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        run_token_steps()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
    while engine.has_unfinished_requests():
        engine.step()
    return elapsed


def forward_call(runner, packed):
    """One call of the packed step's forward executable alone (the KV cache it returns kept)."""
    forward = runner.executables.get("forward", packed.bucket)

    def run():
        out = forward(runner._state_leaves, runner.kv_caches, packed.buffer, runner._prev_tokens)
        runner.kv_caches = out[2]
        return out

    return run


def launch_costs(engine, sched, reps: int = 20) -> dict:
    """Host milliseconds of the parts of one decode step's launch, each call made with the
    device idle (median of `reps`)."""
    runner = engine.runner
    packed = pack_decode(engine, sched)
    run_forward = forward_call(runner, packed)
    sample = runner.executables.get("sample", (packed.plan, False))  # a decode step: no penalties

    def host_ms(call) -> float:
        times = []
        for _ in range(reps):
            jax.block_until_ready(runner.kv_caches)
            t0 = time.perf_counter()
            out = call()
            times.append(time.perf_counter() - t0)
            jax.block_until_ready(out)
        return float(np.median(times)) * 1e3

    logits, rows, _ = run_forward()
    return {"pack_ms": host_ms(lambda: pack_decode(engine, sched) and None),
            "forward_call_ms": host_ms(run_forward),
            "sample_call_ms": host_ms(lambda: sample(logits, rows, None)),
            "launch_ms": host_ms(lambda: runner.launch(packed).output)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxpage bench roofline", description=__doc__)
    parser.add_argument("--model", default="gemma2-2b")
    parser.add_argument("--batches", default="1,16,64,128,256")
    parser.add_argument("--contexts", default="512,2048,8192")
    parser.add_argument("--engine-batch", type=int, default=64)
    parser.add_argument("--engine-context", type=int, default=2048)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--num-decode-steps", type=int, default=None,
                        help="the engine's decode burst length (default: EngineConfig's)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--profile-host", action="store_true",
                        help="print where the host spends the engine's steady decode steps")
    parser.add_argument("--profile-device", action="store_true",
                        help="trace the decode step at --engine-batch x --engine-context and "
                             "print its kernels and idle gaps")
    parser.add_argument("--print-layer-hlo", action="store_true",
                        help="print the kernels one layer of the decode step launches "
                             "(from the optimized HLO)")
    parser.add_argument("--bandwidth-mib", type=int, default=4096,
                        help="size of the copy that measures HBM bandwidth")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]

    from jaxpage.config import EngineConfig  # noqa: PLC0415
    from jaxpage.engine import LLMEngine  # noqa: PLC0415

    bandwidth = common.hbm_bandwidth(args.bandwidth_mib << 20)
    model = common.random_model(args.model, dtype=args.dtype)
    weights = common.weight_bytes(model)
    max_num_batched_tokens = 4096
    outputs = engine_output_tokens(args.engine_batch, args.engine_context, max_num_batched_tokens)
    bursts = {} if args.num_decode_steps is None else {"num_decode_steps": args.num_decode_steps}
    engine = LLMEngine(model, config=EngineConfig(
        max_num_seqs=max(batches + [args.engine_batch]),
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max(contexts + [args.engine_context + outputs]) + 1, precompile=False,
        attention_backend=args.backend, gpu_memory_utilization=args.gpu_memory_utilization,
        **bursts))
    num_steps = engine.config.num_decode_steps
    rows = []
    for context in contexts:
        for batch in batches:
            if context + 1 > engine.max_model_len:
                rows.append({"batch": batch, "context": context,
                             "note": f"beyond the model's {engine.max_model_len} tokens"})
                continue
            sched = synthetic_decode(engine, batch, context)
            if sched is None:
                rows.append({"batch": batch, "context": context, "note": "KV does not fit"})
                continue
            seconds = device_step_seconds(engine, sched)
            for item in sched.scheduled:
                engine.kv.free(item.seq.seq_id)
            moved = weights + batch * common.decode_kv_read_bytes(engine.model_config, context)
            rows.append({"batch": batch, "context": context, "step_ms": seconds * 1e3,
                         "GB_moved": moved / 1e9, "TB_per_s": moved / seconds / 1e12,
                         "MBU": moved / seconds / bandwidth,
                         "tokens_per_s": batch / seconds})
    device = next(r for r in rows if r["batch"] == args.engine_batch
                  and r["context"] == args.engine_context and "step_ms" in r)
    step_memory = _step_memory(engine, args.engine_batch)
    if args.print_layer_hlo:
        bucket = (engine.runner.bucket_for(args.engine_batch), True)
        exe = engine.runner.executables.get("forward", bucket)
        marker = "jaxpage_decode" if engine.runner.backend == "pallas_gpu" else "custom-call"
        print(f"one layer of the decode step (batch {args.engine_batch}):")
        print("\n".join(hlo_layers.layer_ops(exe.as_text(), marker)))
    profile = None
    if args.profile_device:
        sched = synthetic_decode(engine, args.engine_batch, args.engine_context)
        packed = pack_decode(engine, sched)
        profile = device_profile.trace_steps(lambda: engine.runner.launch(packed).output)
        profile["host_launch"] = launch_costs(engine, sched)
        profile["forward_call_host_events"] = device_profile.trace_host_call(
            forward_call(engine.runner, packed))
        for item in sched.scheduled:
            engine.kv.free(item.seq.seq_id)
    device_ms = device["step_ms"]
    if num_steps > 1:  # the engine's device work: bursts of num_steps, per token step
        sched = synthetic_decode(engine, args.engine_batch, args.engine_context, steps=num_steps)
        device_ms = device_step_seconds(engine, sched) * 1e3
        for item in sched.scheduled:
            engine.kv.free(item.seq.seq_id)
    engine_s = engine_step_seconds(engine, args.engine_batch, args.engine_context,
                                   profile=args.profile_host)
    overhead = {"batch": args.engine_batch, "context": args.engine_context,
                "num_decode_steps": num_steps, "engine_step_ms": engine_s * 1e3,
                "device_step_ms": device["step_ms"], "device_burst_step_ms": device_ms,
                "host_overhead_ms": engine_s * 1e3 - device_ms,
                "host_overhead_frac": (engine_s * 1e3 - device_ms) / (engine_s * 1e3)}
    common.print_table(rows, ["batch", "context", "step_ms", "GB_moved", "TB_per_s", "MBU",
                              "tokens_per_s", "note"])
    print(f"HBM bandwidth (copy, read+write): {bandwidth / 1e12:.2f} TB/s; weights "
          f"{weights / 1e9:.2f} GB")
    common.print_table([overhead], list(overhead))
    print("decode step executable memory (GiB):", step_memory)
    if profile is not None:
        device_profile.print_summary(profile)
        print("host launch costs (ms, device idle):", profile.get("host_launch"))
        print("host events of one forward call (device idle), us per call:")
        for e in profile["forward_call_host_events"]:
            print(f"  {e['us']:9.1f} us {e['count']:6.1f} x  {e['thread'][:24]:24s} {e['name']}")
    common.save_results(f"roofline-{args.model}", {
        "model": args.model, "hbm_bandwidth_TBps": bandwidth / 1e12, "weight_GB": weights / 1e9,
        "rows": rows, "host_overhead": overhead, "decode_step_memory": step_memory,
        "device_profile": profile},
        plot=lambda p: _plot(rows, contexts, p))
    return 0


def _step_memory(engine, batch: int) -> dict:
    """XLA's memory analysis of the decode step: the KV cache must be aliased, not copied."""
    runner = engine.runner
    exe = runner.executables.get("forward", (runner.bucket_for(batch), True))
    m = exe.memory_analysis()
    kv = runner.kv_cache_bytes
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes")
    return {"kv_cache": kv / 2**30, **{f.removesuffix("_size_in_bytes"): getattr(m, f) / 2**30
                                       for f in fields}}


def _plot(rows, contexts, path) -> None:
    with common.figure(path, figsize=(6, 4)) as (_, ax):
        for c in contexts:
            pts = [(r["batch"], r["MBU"]) for r in rows if r["context"] == c and "MBU" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"context {c}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel("MBU")
        ax.axhline(0.75, ls="--", c="grey")
        ax.legend()


if __name__ == "__main__":
    sys.exit(main())
