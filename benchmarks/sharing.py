"""Shared KV pages: prefix-caching throughput, and memory saved by parallel sampling and beams.

    jaxpage bench sharing --model gemma2-2b

1. Shared-prefix workload (the PagedAttention paper's 1-shot / 5-shot prefixes): every request is
   one of a few long few-shot prefixes plus its own short question; throughput with prefix caching
   on vs off.
2. Parallel sampling (n = 2, 4, 6) and beam search (width 2, 4, 6): KV pages the engine holds
   (shared by reference count) against the pages the same sequences would hold each on their own,
   averaged over the steps of the run, global layers. Saved = 1 - shared / unshared.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

from jaxpage.benchmarks import common


def prefix_throughput(model, args, shots: int, caching: bool) -> dict:
    from jaxpage import LLM, SamplingParams  # noqa: PLC0415

    rng = np.random.default_rng(shots)
    vocab = model.config.vocab_size
    prefixes = [rng.integers(10, vocab, size=args.shot_tokens * shots).tolist() for _ in range(4)]
    prompts = [prefixes[i % 4] + rng.integers(10, vocab, size=args.question_tokens).tolist()
               for i in range(args.num_requests)]
    llm = LLM(model=model, enable_prefix_caching=caching, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=max(map(len, prompts)) + args.output_tokens + 16)
    params = SamplingParams(temperature=1.0, max_tokens=args.output_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    return {"shots": shots, "prefix_caching": caching, "seconds": elapsed,
            "requests_per_s": len(prompts) / elapsed,
            "cached_prompt_tokens": sum(o.num_cached_tokens for o in outs)}


def memory_saved(model, args, *, width: int, beam: bool) -> dict:
    """Mean over steps of 1 - (pages held) / (pages each sequence would hold alone)."""
    from jaxpage.config import EngineConfig  # noqa: PLC0415
    from jaxpage.engine import LLMEngine, OutputKind  # noqa: PLC0415
    from jaxpage.sampling_params import SamplingParams  # noqa: PLC0415

    engine = LLMEngine(model, config=EngineConfig(
        max_num_seqs=max(args.max_num_seqs, width * args.sample_requests),
        max_num_batched_tokens=args.max_num_batched_tokens, precompile=False,
        max_model_len=args.sample_prompt + args.sample_output + 16, enable_prefix_caching=False))
    rng = np.random.default_rng(width)
    params = SamplingParams(n=1 if beam else width, best_of=width if beam else None,
                            use_beam_search=beam, temperature=1.0, seed=width,
                            max_tokens=args.sample_output, ignore_eos=True)
    for i in range(args.sample_requests):
        engine.add_request(f"s{i}", params=params, output_kind=OutputKind.FINAL_ONLY,
                           prompt_token_ids=rng.integers(
                               10, engine.model_config.vocab_size, size=args.sample_prompt).tolist())
    page, shared, alone = engine.config.page_size, [], []
    while engine.has_unfinished_requests():
        engine.step()
        live = [s for r in engine.requests.values() for s in r.sequences if not s.finished]
        held = engine.stats().kv["global"].pages_used
        if held:
            shared.append(held)
            alone.append(sum(math.ceil(s.num_computed_tokens / page) for s in live))
    saved = [1 - s / max(a, 1) for s, a in zip(shared, alone) if a]
    return {"mode": "beam search" if beam else "parallel sampling", "width": width,
            "mean_pages_shared": float(np.mean(shared)), "mean_pages_alone": float(np.mean(alone)),
            "memory_saved": float(np.mean(saved))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxpage bench sharing", description=__doc__)
    parser.add_argument("--model", default="gemma2-2b")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--shot-tokens", type=int, default=80, help="tokens per example shot")
    parser.add_argument("--question-tokens", type=int, default=24)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--sample-requests", type=int, default=32)
    parser.add_argument("--sample-prompt", type=int, default=256)
    parser.add_argument("--sample-output", type=int, default=128)
    parser.add_argument("--widths", default="2,4,6")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096)
    args = parser.parse_args(argv)

    model = common.random_model(args.model, dtype=args.dtype)
    prefix_rows = [prefix_throughput(model, args, shots, caching)
                   for shots in (1, 5) for caching in (False, True)]
    widths = [int(w) for w in args.widths.split(",")]
    memory_rows = [memory_saved(model, args, width=w, beam=beam)
                   for beam in (False, True) for w in widths]
    common.print_table(prefix_rows, ["shots", "prefix_caching", "requests_per_s", "seconds",
                                     "cached_prompt_tokens"])
    common.print_table(memory_rows, ["mode", "width", "mean_pages_shared", "mean_pages_alone",
                                     "memory_saved"])
    common.save_results(f"sharing-{args.model}", {"model": args.model, "prefix": prefix_rows,
                                                   "memory": memory_rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
