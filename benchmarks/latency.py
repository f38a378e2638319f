"""Latency of one batch: time to first token and time per output step.

    jaxpage bench latency --model gemma2-2b --batches 1,8,64,256 --inputs 32,512,2048 --output 128

Each batch of identical-length random prompts is submitted at once to a warmed-up engine; TTFT is
first token time - arrival, averaged over the batch; time per step is (last token - first token)
/ (output - 1), the decode steps of the batch.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from jaxpage.benchmarks import common


def measure(engine, batch: int, input_len: int, output_len: int, seed: int) -> dict:
    from jaxpage.engine import OutputKind  # noqa: PLC0415
    from jaxpage.sampling_params import SamplingParams  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=1.0, max_tokens=output_len, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{seed}-{i}", params=params, output_kind=OutputKind.FINAL_ONLY,
                           prompt_token_ids=rng.integers(
                               10, engine.model_config.vocab_size, size=input_len).tolist())
    metrics = []
    while engine.has_unfinished_requests():
        metrics += [o.metrics for o in engine.step() if o.finished]
    ttft = np.mean([m.first_token_time - m.arrival_time for m in metrics])
    step = np.mean([(m.last_token_time - m.first_token_time) / max(output_len - 1, 1)
                    for m in metrics])
    return {"batch": batch, "input": input_len, "output": output_len, "ttft_ms": ttft * 1e3,
            "step_ms": step * 1e3, "e2e_s": max(m.finished_time for m in metrics)
            - min(m.arrival_time for m in metrics)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxpage bench latency", description=__doc__)
    parser.add_argument("--model", default="gemma2-2b")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--inputs", default="32,512,2048")
    parser.add_argument("--output", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    inputs = [int(i) for i in args.inputs.split(",")]

    from jaxpage.config import EngineConfig  # noqa: PLC0415
    from jaxpage.engine import LLMEngine  # noqa: PLC0415

    engine = LLMEngine(common.random_model(args.model, dtype=args.dtype), config=EngineConfig(
        max_num_seqs=max(batches), max_num_batched_tokens=max(args.max_num_batched_tokens,
                                                              max(batches)),
        max_model_len=max(inputs) + args.output + 16, attention_backend=args.backend))
    measure(engine, min(batches), min(inputs), 4, seed=0)  # warm-up
    rows = [measure(engine, b, i, args.output, seed=k + 1)
            for k, (b, i) in enumerate((b, i) for b in batches for i in inputs)]
    common.print_table(rows, ["batch", "input", "output", "ttft_ms", "step_ms", "e2e_s"])
    common.save_results(f"latency-{args.model}", {"model": args.model, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
