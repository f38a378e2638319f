"""Where a device step's time goes: kernels, their kinds, and the idle gaps between them.

`trace_steps(run, reps)` calls `run()` `reps` times under `jax.profiler`, reads the trace back with
`jax.profiler.ProfileData` and summarises the device's activity per step: the span, the time some
kernel was running (busy), the idle gaps (launch latency the device waited for), kernel counts and
the kernels that take the most time. On a backend without device activity in the trace (CPU),
the summary says so instead.
"""

from __future__ import annotations

import collections
import glob
import tempfile

import jax

# Lines of a device plane that restate the streams' events at a coarser level.
_DERIVED_LINES = ("XLA Modules", "XLA Ops", "Steps", "Framework", "Source", "XLA TraceMe")


def kernel_kind(name: str) -> str:
    """A coarse category for a device event name."""
    n = name.lower()
    if "memcpy" in n or "memset" in n:
        return "memcpy/memset"
    if any(s in n for s in ("gemm", "xmma", "cutlass", "cublas", "nvjet", "matmul", "dot")):
        return "matmul"
    if n.startswith("jaxpage_"):
        return "jaxpage Pallas kernels"
    if "fusion" in n or "reduce" in n or "loop_" in n or "input_" in n:
        return "XLA fusion"
    return "other"


def device_events(path: str) -> tuple[list[tuple[int, int, str]], dict[str, int]]:
    """(start_ns, duration_ns, name) of every device-stream event in an .xplane.pb file, and
    the number of events per line (to show what was read)."""
    from jax.profiler import ProfileData  # noqa: PLC0415

    events, per_line = [], collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            if line.name.startswith(_DERIVED_LINES):
                continue
            for e in line.events:
                events.append((int(e.start_ns), int(e.duration_ns), e.name))
                per_line[f"{plane.name} {line.name}"] += 1
    return sorted(events), dict(per_line)


def summarize(events: list[tuple[int, int, str]], reps: int, top: int = 15) -> dict:
    """Per-step span, busy and idle time (us), kernel counts by kind and the top kernels."""
    if not events:
        return {"note": "no device events in the trace (not a GPU/TPU backend?)"}
    start = events[0][0]
    end = max(s + d for s, d, _ in events)
    busy, cursor, gaps = 0, start, []
    for s, d, _ in events:  # union of intervals; gaps are where nothing ran
        if s > cursor:
            gaps.append(s - cursor)
        busy += max(0, s + d - max(s, cursor))
        cursor = max(cursor, s + d)
    by_name = collections.defaultdict(lambda: [0, 0])
    by_kind = collections.defaultdict(lambda: [0, 0])
    for _, d, name in events:
        for table, key in ((by_name, name), (by_kind, kernel_kind(name))):
            table[key][0] += 1
            table[key][1] += d
    per_step = lambda ns: ns / reps / 1e3  # noqa: E731
    return {
        "reps": reps,
        "span_us_per_step": per_step(end - start),
        "busy_us_per_step": per_step(busy),
        "idle_us_per_step": per_step(end - start - busy),
        "events_per_step": len(events) / reps,
        "gaps_over_5us_per_step": sum(g > 5_000 for g in gaps) / reps,
        "by_kind": {k: {"count": c / reps, "us": per_step(ns)}
                    for k, (c, ns) in sorted(by_kind.items(), key=lambda kv: -kv[1][1])},
        "top_kernels": [{"name": n[:90], "count": c / reps, "us": per_step(ns)}
                        for n, (c, ns) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]],
    }


def host_events(path: str) -> list[tuple[str, str, int]]:
    """(thread, name, duration_ns) of every host event (JAX/PJRT/XLA TraceMe scopes and Python
    frames) in an .xplane.pb file."""
    from jax.profiler import ProfileData  # noqa: PLC0415

    return [(line.name, e.name, int(e.duration_ns))
            for plane in ProfileData.from_file(path).planes if plane.name.startswith("/host:")
            for line in plane.lines for e in line.events]


def _profile(run, reps: int, block_each: bool, read):
    """`read(path)` of the trace of `reps` calls of `run()` (None if no trace was written)."""
    jax.block_until_ready(run())  # compiled and warm before the trace starts
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            out = None
            for _ in range(reps):
                out = run()
                if block_each:
                    jax.block_until_ready(out)
            jax.block_until_ready(out)
        files = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        return read(files[0]) if files else None


def trace_steps(run, reps: int = 10) -> dict:
    """Profile `reps` calls of `run()` (each returns something to block on) on the device."""
    read = _profile(run, reps, False, device_events)
    if read is None:
        return {"note": "the profiler wrote no trace"}
    events, lines = read
    return {**summarize(events, reps), "lines": lines}


def trace_host_call(run, reps: int = 10, top: int = 30) -> list[dict]:
    """Where the host's time goes in one call of `run()` made with the device idle: the host
    events of `reps` such calls, summed per (thread, name), per call, largest first."""
    events = _profile(run, reps, True, host_events) or []
    total: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    for thread, name, ns in events:
        if "block_until_ready" in name or "profiler.py" in name:
            continue  # the wait for the device and the profiler's own frames, not the call
        total[(thread, name)][0] += 1
        total[(thread, name)][1] += ns
    ranked = sorted(total.items(), key=lambda kv: -kv[1][1])[:top]
    return [{"thread": t, "name": n, "count": c / reps, "us": ns / 1e3 / reps}
            for (t, n), (c, ns) in ranked]


def print_summary(summary: dict) -> None:
    if "note" in summary:
        print("device profile:", summary["note"])
        return
    print(f"device profile ({summary['reps']} steps): span {summary['span_us_per_step']:.0f} us, "
          f"busy {summary['busy_us_per_step']:.0f} us, idle {summary['idle_us_per_step']:.0f} us, "
          f"{summary['events_per_step']:.0f} events, "
          f"{summary['gaps_over_5us_per_step']:.0f} gaps > 5 us per step")
    for kind, v in summary["by_kind"].items():
        print(f"  {kind:22s} {v['count']:7.1f} x  {v['us']:9.1f} us")
    for k in summary["top_kernels"]:
        print(f"  {k['us']:9.1f} us  {k['count']:6.1f} x  {k['name']}")
