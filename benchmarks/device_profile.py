"""Where a device step's time goes: kernels, their kinds, and the idle gaps between them.

`trace_steps(run, reps)` calls `run()` `reps` times under `jax.profiler`, reads the trace back with
`jax.profiler.ProfileData` and summarises the device's activity per step: the span, the time some
kernel was running (busy), the idle gaps (launch latency the device waited for), kernel counts and
the kernels that take the most time. `trace_run(run)` traces one long call (a whole benchmark run)
and adds where the device time went per executable (XLA module). On a backend without device
activity in the trace (CPU), the summary says so instead.
"""

from __future__ import annotations

import bisect
import collections
import glob
import re
import tempfile

import jax

# Lines of a device plane that restate the streams' events at a coarser level.
_DERIVED_LINES = ("XLA Modules", "XLA Ops", "Steps", "Framework", "Source", "XLA TraceMe")
_MODULE_LINE = "XLA Modules"  # one event per executable run: its span on the device
Events = list[tuple[int, int, str]]  # (start_ns, duration_ns, name), sorted by start


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


def read_trace(path: str) -> tuple[Events, Events, dict[str, int]]:
    """(kernels, modules, events per line) of an .xplane.pb file: kernels are the device
    streams' events, modules the executable runs of the "XLA Modules" line, each a sorted list
    of (start_ns, duration_ns, name)."""
    from jax.profiler import ProfileData  # noqa: PLC0415

    kernels, modules, per_line = [], [], collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            if line.name == _MODULE_LINE:
                into = modules
            elif line.name.startswith(_DERIVED_LINES):
                continue
            else:
                into = kernels
            for e in line.events:
                into.append((int(e.start_ns), int(e.duration_ns), e.name))
                per_line[f"{plane.name} {line.name}"] += 1
    return sorted(kernels), sorted(modules), dict(per_line)


def module_name(event_name: str) -> str:
    """An executable's name without the run id the profiler appends ("jit_forward_t64(12)")."""
    return re.sub(r"\(\d+\)$", "", event_name)


def by_module(modules: Events, kernels: Events) -> list[dict]:
    """Per executable, largest first: runs, device span (ms) and kernel time by kind (ms) of the
    kernels that start inside its runs; kernels outside any run are listed as "(no module)"."""
    starts = [s for s, _, _ in modules]
    rows: dict[str, dict] = {}

    def row(name: str) -> dict:
        return rows.setdefault(name, {"module": name, "runs": 0, "span_ms": 0.0, "kernel_ms": {}})

    for _, d, name in modules:
        r = row(module_name(name))
        r["runs"] += 1
        r["span_ms"] += d / 1e6
    for s, d, name in kernels:
        i = bisect.bisect_right(starts, s) - 1
        inside = i >= 0 and s < modules[i][0] + modules[i][1]
        r = row(module_name(modules[i][2]) if inside else "(no module)")
        kind = kernel_kind(name)
        r["kernel_ms"][kind] = r["kernel_ms"].get(kind, 0.0) + d / 1e6
    return sorted(rows.values(), key=lambda r: -(r["span_ms"] or sum(r["kernel_ms"].values())))


def summarize(events: Events, reps: int, top: int = 15) -> dict:
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


def _profile(run, reps: int, block_each: bool, read, warm_up: bool = True,
             trace_python: bool = True):
    """`read(path)` of the trace of `reps` calls of `run()` (None if no trace was written);
    `run()` is called once before the trace unless `warm_up` is False. Without `trace_python`
    the profiler records no Python calls (they would slow a host-bound loop down)."""
    if warm_up:
        jax.block_until_ready(run())  # compiled and warm before the trace starts
    options = jax.profiler.ProfileOptions()
    if not trace_python:
        options.python_tracer_level, options.host_tracer_level = 0, 1
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, profiler_options=options):
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
    read = _profile(run, reps, False, read_trace)
    if read is None:
        return {"note": "the profiler wrote no trace"}
    kernels, _, lines = read
    return {**summarize(kernels, reps), "lines": lines}


def trace_run(run) -> dict:
    """Profile one call of `run()` (already warm: a whole benchmark run, say), Python calls not
    traced: the device's busy and idle time over it, kernels by kind, and the same split per
    executable."""
    read = _profile(run, 1, False, read_trace, warm_up=False, trace_python=False)
    if read is None:
        return {"note": "the profiler wrote no trace"}
    kernels, modules, lines = read
    summary = summarize(kernels, 1)
    if "note" in summary:
        return summary
    summary["modules"] = (by_module(modules, kernels) if modules
                          else "no XLA Modules line in the trace")
    return {**summary, "lines": lines}


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
    modules = summary.get("modules")
    if isinstance(modules, str):
        print(" ", modules)
    for m in modules or ():
        kinds = ", ".join(f"{k} {ms:.1f}" for k, ms in sorted(m["kernel_ms"].items(),
                                                                key=lambda kv: -kv[1]))
        print(f"  {m['module'][:40]:40s} {m['runs']:5d} runs {m['span_ms']:9.1f} ms  ({kinds})")
