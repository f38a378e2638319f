"""Cold start: seconds from a fresh process to the first generated token.

    jaxpage bench coldstart --model gemma2-2b

Writes a random-weight checkpoint, then starts `LLM(checkpoint=...)` + one generate in a new
process twice: with an empty compilation cache (cold) and again with the cache the first run
filled (warm). The engine uses its default flags, so every bucket is compiled at start-up.
Reported: seconds from launching the process to the first token (the target), and until
generate() returned (which includes writing the executable cache after a cold start); per kind of
executable, seconds spent lowering and compiling.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxpage.benchmarks import common


def _child(checkpoint: str, engine_flags: dict) -> None:
    t0 = time.perf_counter()
    from jaxpage import LLM, SamplingParams  # noqa: PLC0415

    llm = LLM(checkpoint=checkpoint, **engine_flags)
    loaded = time.perf_counter()
    out = llm.generate(prompt_token_ids=[[2, 100, 200, 300]],
                       sampling_params=SamplingParams(max_tokens=1), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 1
    exes = llm.engine.runner.executables
    # generate() returns after writing the executable cache (an idle moment): the first token
    # came before that. time.monotonic is one system-wide clock, so the parent can subtract.
    print(json.dumps({"first_token_monotonic": out[0].metrics.first_token_time,
                      "in_process_s": time.perf_counter() - t0, "start_s": loaded - t0,
                      "compile_s": exes.compile_seconds, "loaded": exes.loaded,
                      "compiled": exes.compiled,
                      "compile_by_kind": exes.compile_time_summary()}), flush=True)


def _make_checkpoint(model: str, dst: Path) -> None:
    from jaxpage.checkpoint import save_checkpoint  # noqa: PLC0415

    m = common.random_model(model)
    save_checkpoint(m, m.config, dst)


def _timed_child(args: list[str], env: dict) -> dict:
    t0, launched = time.perf_counter(), time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "jaxpage.benchmarks.coldstart", *args],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"cold-start child failed:\n{proc.stderr[-3000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"first_token_s": child.pop("first_token_monotonic") - launched, "wall_s": wall,
            **child}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxpage bench coldstart", description=__doc__)
    parser.add_argument("--model", default="gemma2-2b")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--compile-workers", type=int, default=None,
                        help="compile threads (default: the engine's)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--make-checkpoint", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    flags = ["--max-num-seqs", str(args.max_num_seqs),
             "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.compile_workers:
        flags += ["--compile-workers", str(args.compile_workers)]
    if args.child:
        _child(args.child, {"max_num_seqs": args.max_num_seqs,
                            "max_num_batched_tokens": args.max_num_batched_tokens}
               | ({"compile_workers": args.compile_workers} if args.compile_workers else {}))
        return 0
    if args.make_checkpoint:
        _make_checkpoint(args.model, Path(args.make_checkpoint))
        return 0

    work = Path(args.workdir or tempfile.mkdtemp(prefix="jaxpage-coldstart-"))
    checkpoint = work / "checkpoint"
    env = {**os.environ, "JAXPAGE_CACHE": str(work / "cache")}
    if not checkpoint.exists():
        subprocess.run([sys.executable, "-m", "jaxpage.benchmarks.coldstart", "--model",
                        args.model, "--make-checkpoint", str(checkpoint)], check=True, env=env)
    cold = _timed_child(["--child", str(checkpoint), *flags], env)
    warm = _timed_child(["--child", str(checkpoint), *flags], env)
    rows = [{"run": "cold", **cold}, {"run": "warm", **warm}]
    common.print_table(rows, ["run", "first_token_s", "wall_s", "in_process_s", "start_s",
                              "compile_s", "loaded", "compiled"])
    for row in rows:
        for kind, t in row["compile_by_kind"].items():
            print(f"{row['run']}: {kind}: {t['count']} compiled, lowering {t['lower_s']:.1f} s, "
                  f"compiling {t['compile_s']:.1f} s in all (longest {t['max_compile_s']:.1f} s)")
    common.save_results(f"coldstart-{args.model}", {"model": args.model, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
