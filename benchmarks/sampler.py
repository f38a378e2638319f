"""Sampler step cost per plan: device time of `sampler.sample` on random logits, and compile time.

    jaxpage bench sampler --rows 64,256 --vocab 262144

Each case is a batch where every row asks for the same settings, so the plan is the one those
settings need (greedy, temperature, top-k / top-p filtering, logprobs, penalties). The floor is
one read pass over the logits (the row max); a plan's cost is a multiple of it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jaxpage.benchmarks import common

CASES = {  # name -> SamplingParams keyword arguments
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=1.0),
    "top_k=50": dict(temperature=1.0, top_k=50),
    "top_p=0.9": dict(temperature=1.0, top_p=0.9),
    "top_k=50+top_p=0.9": dict(temperature=1.0, top_k=50, top_p=0.9),
    "logprobs=5": dict(temperature=1.0, logprobs=5),
    "penalties": dict(temperature=1.0, repetition_penalty=1.1, frequency_penalty=0.5),
}


def measure(rows: int, vocab: int, cases: list[str], reps: int) -> list[dict]:
    """One row per case: plan, device microseconds (median), lower + compile seconds."""
    from jaxpage import sampler  # noqa: PLC0415
    from jaxpage.benchmarks.kernels import device_seconds  # noqa: PLC0415
    from jaxpage.sampler import RowSpec  # noqa: PLC0415
    from jaxpage.sampling_params import SamplingParams  # noqa: PLC0415

    logits = 4.0 * jax.random.normal(jax.random.key(0), (rows, vocab), jnp.float32)
    floor = device_seconds(jax.jit(lambda x: x.max(axis=1)), (logits,), reps, 0.0)
    out = [{"rows": rows, "case": "one read pass (floor)", "plan": "-",
            "device_us": statistics.median(floor) * 1e6}]
    for name in cases:
        params = SamplingParams(**CASES[name])
        specs = [RowSpec(params, seed=i, step_index=3, prompt_token_ids=list(range(100)),
                         output_token_ids=list(range(50, 90))) for i in range(rows)]
        plan = sampler.plan_for(specs, rows, 4096)
        arrays = {k: jnp.asarray(v) for k, v in sampler.host_arrays(plan, specs).items()}
        fn = jax.jit(lambda x, a, plan=plan: sampler.sample(x, a, plan))
        t0 = time.perf_counter()
        lowered = fn.lower(logits, arrays)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        times = device_seconds(compiled, (logits, arrays), reps, 0.0)
        out.append({"rows": rows, "case": name, "plan": _plan_label(plan),
                    "device_us": statistics.median(times) * 1e6,
                    "lower_s": t1 - t0, "compile_s": t2 - t1})
    return out


def _plan_label(plan) -> str:
    parts = [f"logprobs={plan.num_logprobs}" if plan.num_logprobs else "",
             "filtering" if plan.filtering else "",
             f"penalty_len={plan.penalty_len}" if plan.penalty_len else ""]
    return ",".join(p for p in parts if p) or "basic"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxpage bench sampler", description=__doc__)
    parser.add_argument("--rows", default="64,256", help="comma-separated batch rows")
    parser.add_argument("--vocab", type=int, default=262144, help="Gemma 3's vocabulary")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {list(CASES)}")
    rows = [r for n in args.rows.split(",") for r in measure(int(n), args.vocab, cases, args.reps)]
    common.print_table(rows, ["rows", "case", "plan", "device_us", "lower_s", "compile_s"])

    def plot(path):
        with common.figure(path, figsize=(8, 4)) as (fig, ax):
            for n in sorted({r["rows"] for r in rows}):
                mine = [r for r in rows if r["rows"] == n]
                ax.barh([f"{r['case']} ({n})" for r in mine], [r["device_us"] for r in mine])
            ax.set_xscale("log")
            ax.set_xlabel(f"device us per step (vocab {args.vocab})")

    common.save_results("sampler", {"vocab": args.vocab, "rows": rows}, plot=plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
