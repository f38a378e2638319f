"""Baseline: Hugging Face transformers `generate` with a static cache and torch.compile.

vLLM's offline methodology: every request is known up front (random token prompts, fixed output
lengths, EOS ignored through min_new_tokens = max_new_tokens). Requests run in static batches of
similar lengths (as a user would sort them), prompts padded on the left; each batch generates
the longest output of its members and only the requested tokens count. generate compiles its
decode step itself (transformers' default CompileConfig: torch.compile, mode "reduce-overhead",
i.e. CUDA graphs); batches are planned so that one compiled graph serves them all. The batch
size is the largest power of two from --max-batch down that does not run out of device memory.
The first batch is run once untimed (compile and graph capture: reported as compile_s).
Attention: transformers' choice, SDPA for Gemma 3 and eager for Gemma 2 (SDPA has no soft-cap).

    jaxpage bench hf_baseline --model gemma2-2b --workload 1024x128,sharegpt --num-requests 500
    python -m jaxpage.benchmarks.hf_baseline --model gemma3-4b --workload 1024x128 --json -
        (--json -: the JSON row, or list of rows, is the last line of stdout)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
import traceback

import numpy as np
import torch
import transformers
from transformers import Gemma2ForCausalLM, Gemma3ForCausalLM

from jaxpage.convert_hf import to_hf_config
from jaxpage.models.config import GemmaConfig, get_config

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
FIRST_PROMPT_ID = 10  # random prompt ids start here: clear of pad, eos, bos and unk

hf_config = to_hf_config


def hf_model(config: GemmaConfig, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", *,
             attn_implementation: str | None = None, seed: int = 0) -> torch.nn.Module:
    """Gemma2ForCausalLM / Gemma3ForCausalLM of `config` with random weights, built on `device`.

    attn_implementation None is transformers' own choice: "sdpa" where the model supports it
    (Gemma 3), else "eager" (Gemma 2: SDPA has no attention soft-cap).
    """
    cls = Gemma2ForCausalLM if config.family == "gemma2" else Gemma3ForCausalLM
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    torch.manual_seed(seed)
    with torch.device(device):  # parameters are created (and randomly initialised) in place
        model = cls._from_config(hf_config(config), dtype=dtype, **kwargs)
    return model.eval().requires_grad_(False)


def attention_implementation(model: torch.nn.Module) -> str:
    return str(model.config._attn_implementation)


# -- the offline run --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Batch:
    """One static batch: request indices (the first `num_real` real, the rest repeating the last
    real one so that every batch has the same shape), the left-padded prompt width and the
    tokens generated per row."""

    indices: tuple[int, ...]
    num_real: int
    width: int
    new_tokens: int

    @property
    def cache_length(self) -> int:
        return self.width + self.new_tokens


def plan_batches(lengths: list[tuple[int, int]], batch_size: int) -> list[Batch]:
    """Static batches of `batch_size` grouping requests of similar output, then input, length.

    Made so that one compiled decode graph serves every batch: transformers drops an all-ones
    attention mask (a different graph), so once prompt lengths differ every batch has at least
    one padding token; and the batch needing the longest static cache goes first, since
    transformers keeps a static cache at least as long as the previous call's.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not lengths:
        raise ValueError("no requests")
    mixed = len({i for i, _ in lengths}) > 1
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i][1], lengths[i][0], -i),
                   reverse=True)
    batches = []
    for start in range(0, len(order), batch_size):
        real = order[start:start + batch_size]
        indices = tuple(real + real[-1:] * (batch_size - len(real)))
        inputs = [lengths[k][0] for k in indices]
        width = max(inputs) + (1 if mixed and min(inputs) == max(inputs) else 0)
        batches.append(Batch(indices, len(real), width, max(lengths[k][1] for k in indices)))
    longest = max(range(len(batches)), key=lambda k: batches[k].cache_length)
    return [batches[longest]] + batches[:longest] + batches[longest + 1:]


def batch_sizes(max_batch: int, num_requests: int) -> list[int]:
    """Powers of two to try, largest first: from min(max_batch, the smallest power of two that
    holds every request) down to 1."""
    if max_batch < 1 or num_requests < 1:
        raise ValueError(f"max_batch and num_requests must be >= 1, got {max_batch}, "
                         f"{num_requests}")
    top = 1
    while top * 2 <= max_batch and top < num_requests:
        top *= 2
    sizes = []
    while top >= 1:
        sizes.append(top)
        top //= 2
    return sizes


def random_prompts(lengths: list[tuple[int, int]], vocab_size: int,
                   seed: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(FIRST_PROMPT_ID, vocab_size, size=i) for i, _ in lengths]


def run_hf_throughput(config: GemmaConfig, workload: list[tuple[int, int]], *, num_requests: int,
                      max_batch: int, compile: bool = True, device: str = "cuda",
                      dtype: torch.dtype = torch.bfloat16, attn_implementation: str | None = None,
                      seed: int = 0) -> dict:
    """Offline throughput of HF generate on `num_requests` requests whose (input, output)
    lengths cycle through `workload`, at the largest batch size that fits.

    Should torch.compile fail (other than by running out of memory), the run is made
    uncompiled and the row says so ("compiled": false, "compile_error").
    """
    if not workload or any(i < 1 or o < 1 for i, o in workload):
        raise ValueError(f"workload must be a non-empty list of positive (input, output) "
                         f"lengths, got {workload!r}")
    lengths = [workload[k % len(workload)] for k in range(num_requests)]
    if max(i + o for i, o in lengths) > config.max_context:
        raise ValueError(f"a request needs {max(i + o for i, o in lengths)} tokens, more than "
                         f"{config.name}'s max_context {config.max_context}")
    _allow_recompiles()
    t0 = time.perf_counter()
    model = hf_model(config, dtype, device, attn_implementation=attn_implementation, seed=seed)
    build_s = time.perf_counter() - t0
    prompts = random_prompts(lengths, config.vocab_size, seed + 2)
    compile_error = None
    try:
        run = _largest_batch_run(model, lengths, prompts, max_batch, config.pad_id, compile)
    except Exception as e:  # noqa: BLE001 - a failing compiler still leaves a baseline
        if not compile or _is_oom(e):
            raise
        compile_error = f"{type(e).__name__}: {e}"[:2000]
        traceback.print_exc()
    if compile_error is not None:
        print("hf_baseline: torch.compile failed; running uncompiled", file=sys.stderr)
        _forget(model)
        run = _largest_batch_run(model, lengths, prompts, max_batch, config.pad_id, False)
    elif compile and not run.warmup_graphs:
        print("hf_baseline: generate did not compile (transformers compiles on GPUs only)",
              file=sys.stderr)
    seconds = sum(run.times)
    in_tokens, out_tokens = sum(i for i, _ in lengths), sum(o for _, o in lengths)
    row = {
        "model": config.name, "num_requests": num_requests, "batch": run.size,
        "num_batches": len(run.batches), "seconds": seconds,
        "requests_per_s": num_requests / seconds, "output_tokens_per_s": out_tokens / seconds,
        "total_tokens_per_s": (in_tokens + out_tokens) / seconds,
        "input_tokens": in_tokens, "output_tokens": out_tokens,
        # rows x steps generated, padding rows and steps past a request's own length included
        "generated_tokens": sum(run.size * b.new_tokens for b in run.batches),
        "compile_s": max(0.0, run.warmup_s - run.times[0]), "warmup_s": run.warmup_s,
        "build_s": build_s, "out_of_memory_at": run.too_big,
        "compiled": run.warmup_graphs > 0, "compile_error": compile_error,
        "compiled_graphs_warmup": run.warmup_graphs,
        "compiled_graphs_timed": run.timed_graphs,
        "attn_implementation": attention_implementation(model), "dtype": str(dtype),
        "device": _device_name(device), "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if torch.device(device).type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model
    _forget(None)
    return row


@dataclasses.dataclass
class _Run:
    size: int
    batches: list[Batch]
    warmup_s: float
    times: list[float]
    too_big: list[int]
    warmup_graphs: int
    timed_graphs: int


def _largest_batch_run(model, lengths: list[tuple[int, int]], prompts: list[np.ndarray],
                       max_batch: int, pad_id: int, compile: bool) -> _Run:
    """Warm-up then timed run of every batch, at the first batch size down from max_batch
    that does not run out of device memory."""
    too_big = []
    for size in batch_sizes(max_batch, len(lengths)):
        batches = plan_batches(lengths, size)
        graphs = _compiled_graphs()
        try:
            warmup_s = _generate(model, batches[0], prompts, pad_id, compile)
            warmup_graphs = _compiled_graphs() - graphs
            if model.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(model.device)
            times = [_generate(model, b, prompts, pad_id, compile) for b in batches]
            return _Run(size, batches, warmup_s, times, too_big, warmup_graphs,
                        _compiled_graphs() - graphs - warmup_graphs)
        except Exception as e:  # noqa: BLE001 - only running out of memory is retried
            if not _is_oom(e):
                raise
        too_big.append(size)  # outside the except block: its traceback still holds tensors
        _forget(model)
    raise RuntimeError(f"out of memory even at batch size 1 (tried {too_big})")


def _generate(model, batch: Batch, prompts: list[np.ndarray], pad_id: int,
              compile: bool) -> float:
    """Seconds one static batch takes through generate (prompts padded on the left)."""
    ids = np.full((len(batch.indices), batch.width), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, k in enumerate(batch.indices):
        ids[row, batch.width - len(prompts[k]):] = prompts[k]
        mask[row, batch.width - len(prompts[k]):] = 1
    ids_t, mask_t = torch.from_numpy(ids).to(model.device), torch.from_numpy(mask).to(model.device)
    _sync(model.device)
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids_t, attention_mask=mask_t, max_new_tokens=batch.new_tokens,
                         min_new_tokens=batch.new_tokens, do_sample=False, pad_token_id=pad_id,
                         cache_implementation="static", disable_compile=not compile)
    _sync(model.device)
    seconds = time.perf_counter() - t0
    if tuple(out.shape) != (len(batch.indices), batch.cache_length):
        raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected "
                           f"{(len(batch.indices), batch.cache_length)}: EOS was not ignored")
    return seconds


def _is_oom(e: BaseException) -> bool:
    """Out of device memory, also when torch.compile wraps the error."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, _OOM) or "out of memory" in str(e).lower():
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _forget(model) -> None:
    """Drop compiled graphs, CUDA graphs and cached blocks (after an OOM, or when done)."""
    if model is not None:
        for attr in ("_compiled_call", "_last_compile_config", "_previous_max_cache_length"):
            model.__dict__.pop(attr, None)
    torch.compiler.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _allow_recompiles() -> None:
    """Each batch-size attempt compiles its own decode graph: keep dynamo from giving up."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 64))


def _compiled_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return str(device)


# -- command line -----------------------------------------------------------------------------

COLUMNS = ["workload", "batch", "requests_per_s", "output_tokens_per_s", "total_tokens_per_s",
           "seconds", "compile_s", "attn_implementation"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxpage bench hf_baseline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma2-2b")
    parser.add_argument("--workload", default="1024x128",
                        help="comma-separated INxOUT (e.g. 1024x128) or 'sharegpt'")
    parser.add_argument("--num-requests", type=int, default=500)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attn", default=None,
                        help="attn_implementation (default: transformers' choice for the model)")
    parser.add_argument("--no-compile", action="store_true", help="run generate uncompiled")
    parser.add_argument("--seed", type=int, default=1,
                        help="workload seed (throughput.py draws its lengths with seed 1)")
    parser.add_argument("--json", metavar="PATH",
                        help="write the row(s) here instead of results/ ('-': last stdout line)")
    args = parser.parse_args(argv)
    from jaxpage.benchmarks import common  # noqa: PLC0415 - imports JAX; only the CLI needs it

    config = get_config(args.model)
    rows = []
    for spec in args.workload.split(","):
        lengths = common.workload(spec, args.num_requests, seed=args.seed)
        row = run_hf_throughput(config, lengths, num_requests=args.num_requests,
                                max_batch=args.max_batch, compile=not args.no_compile,
                                device=args.device, dtype=_DTYPES[args.dtype],
                                attn_implementation=args.attn)
        rows.append({"workload": spec, **row})
        print(f"{spec}: {row['output_tokens_per_s']:.1f} output tokens/s at batch "
              f"{row['batch']}", file=sys.stderr, flush=True)
    common.print_table(rows, COLUMNS)
    result = rows[0] if len(rows) == 1 else rows
    if args.json == "-":
        print(json.dumps(result, default=float))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=float)
    else:
        common.save_results(f"hf-baseline-{args.model}", {"model": args.model, "rows": rows},
                            plot=lambda path: _plot(rows, path))
    return 0


def _plot(rows: list[dict], path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([r["workload"] for r in rows], [r["output_tokens_per_s"] for r in rows])
    for k, r in enumerate(rows):
        ax.annotate(f"batch {r['batch']}", (k, r["output_tokens_per_s"]), ha="center",
                    va="bottom")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"HF transformers {rows[0]['model']} ({rows[0]['attn_implementation']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
