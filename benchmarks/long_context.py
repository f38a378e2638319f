"""Gemma 3 long context: how many 32k-token requests fit at once, with and without giving local
(sliding-window) layers' pages back as the window moves on.

    jaxpage bench long_context --model gemma3-4b --context 32768

The engine sizes its KV pools from free device memory. With recycling, a request holds every
global-layer page but only window + chunk worth of local-layer pages; without, every layer holds
every page, so the same bytes hold context * (all layers) per request. Capacity is what the
allocator can hold concurrently (its own `pages_for` rule); --admit also checks it live by
admitting that many requests and counting how many run at once.
"""

from __future__ import annotations

import argparse
import sys

from jaxpage.benchmarks import common


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxpage bench long_context", description=__doc__)
    parser.add_argument("--model", default="gemma3-4b")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--output", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--num-pages", type=int, default=None,
                        help="global pool size (default: from free device memory)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--admit", action="store_true",
                        help="also run that many requests and count how many run at once")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args(argv)

    from jaxpage.config import EngineConfig  # noqa: PLC0415
    from jaxpage.engine import LLMEngine  # noqa: PLC0415
    from jaxpage.kv_cache import page_bytes  # noqa: PLC0415

    model = common.random_model(args.model, dtype=args.dtype)
    config = model.config
    total = args.context + args.output
    engine = LLMEngine(model, config=EngineConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=total + 16, precompile=False, num_pages=args.num_pages,
        gpu_memory_utilization=args.gpu_memory_utilization))
    kv = engine.kv
    pools = {g: p.num_pages - 1 for g, p in kv.pools.items()}
    # Held at once per request: every global page; the window's local pages (+1 partial, +1 for
    # the page the window edge sits in). The prefill chunk in flight is shared by all requests.
    per_request = {g: kv.pages_for(total, g) + 1 if kv.windows[g] else kv.pages_for(total, g)
                   for g in kv.groups}
    chunk_pages = -(-args.max_num_batched_tokens // kv.page_size)
    with_recycling = min(engine.config.max_num_seqs, *(
        (pools[g] - (chunk_pages if kv.windows[g] else 0)) // per_request[g] for g in kv.groups))
    kv_bytes = sum(pools[g] * page_bytes(config, g, kv.page_size) for g in kv.groups)
    all_layers_per_token = sum(common.kv_bytes_per_token(config).values())
    without = min(engine.config.max_num_seqs, kv_bytes // (total * all_layers_per_token))
    row = {"model": args.model, "context": args.context, "kv_cache_GiB": kv_bytes / 2**30,
           "pool_pages": pools, "pages_per_request": per_request,
           "fit_with_recycling": int(with_recycling), "fit_without_recycling": int(without),
           "ratio": with_recycling / max(without, 1),
           "layer_mix": f"{config.layer_types.count('global')} global / "
                        f"{config.layer_types.count('local')} local, window {config.sliding_window}"}
    if args.admit:
        row["running_at_once"] = _admit(engine, with_recycling + 1, args.context)
    common.print_table([row], ["model", "context", "kv_cache_GiB", "fit_with_recycling",
                               "fit_without_recycling", "ratio", "layer_mix"])
    common.save_results(f"long-context-{args.model}", row)
    return 0


def _admit(engine, n: int, context: int) -> int:
    """Submit n requests of `context` tokens that keep decoding until all could have been
    prefilled; the most that held a whole prompt's pages at the same time."""
    import numpy as np  # noqa: PLC0415

    from jaxpage.sampling_params import SamplingParams  # noqa: PLC0415

    rng = np.random.default_rng(0)
    steps = -(-n * context // engine.config.max_num_batched_tokens) + 4
    prompt = engine.max_model_len - steps  # prompt + output stay within the context
    if prompt < context // 2:
        raise SystemExit(f"--admit needs {steps} decode steps: too many for this context")
    for i in range(n):
        engine.add_request(f"L{i}", prompt_token_ids=rng.integers(
            10, engine.model_config.vocab_size, size=prompt).tolist(),
            params=SamplingParams(max_tokens=steps, ignore_eos=True))
    most = 0
    while engine.has_unfinished_requests():
        engine.step()  # count those past prefill: they hold their whole prompt's pages
        most = max(most, sum(s.num_output_tokens > 0 for s in engine.scheduler.running))
    return most


if __name__ == "__main__":
    sys.exit(main())
