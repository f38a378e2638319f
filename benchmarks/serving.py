"""Serving benchmark: a Poisson load generator against `jaxpage serve` (streamed /v1/completions).

As vLLM's benchmark_serving: N requests sent with exponential inter-arrival times at a given
rate (req/s; "inf" sends them all at once), random token-id prompts of fixed or ShareGPT-like
lengths, "ignore_eos" so that each request generates exactly its max_tokens. Per request: time
to first token (TTFT), inter-token latencies (ITL, gaps between streamed chunks), end-to-end
latency (E2E) and output tokens (the usage chunk); TPOT = (E2E - TTFT) / (output tokens - 1).
Reports throughput and mean / median / p99 of each, one row per rate.

    jaxpage bench serving --server-args "--checkpoint out/gemma2-2b --max-num-seqs 256" \\
        --workload 1024x128 --num-prompts 500 --rates 2,8,inf
    jaxpage bench serving --url http://127.0.0.1:8000 --rates 4    (a server already running)
    jaxpage bench serving --model gemma2-2b --workload sharegpt --rates 4,16,inf

Without --url it starts `jaxpage serve` on a free 127.0.0.1 port and stops it at the end. Only
loopback servers are accepted. Standard library HTTP client, one thread per request in flight.
--model NAME serves a registry model with random weights (same speed as real ones): a child
process writes its checkpoint, with a stand-in tokenizer of the model's vocabulary size, to
--workdir (kept and reused) or to a temporary directory (removed at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import math
import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

LOOPBACK = ("127.0.0.1", "localhost", "::1")
FIRST_PROMPT_ID = 10  # clear of pad, eos, bos, unk
DEFAULT_VOCAB = 1000  # prompt ids below this are valid for every Gemma and the demo model
PERCENTILES = (50, 99)


@dataclasses.dataclass
class RequestResult:
    """One streamed request; times in seconds, `start` from the start of the run."""

    prompt_len: int
    max_tokens: int
    start: float = 0.0
    ok: bool = False
    error: str = ""
    ttft: float = math.nan
    e2e: float = math.nan
    output_tokens: int = 0
    finish_reason: str | None = None
    itl: list[float] = dataclasses.field(default_factory=list)

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first (NaN with fewer than 2 tokens)."""
        if self.output_tokens < 2:
            return math.nan
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def check_loopback(url: str) -> tuple[str, int]:
    """(host, port) of an http:// URL on this machine; ValueError for anything else."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK or parts.port is None:
        raise ValueError(f"--url must be http://127.0.0.1:PORT (a server on this machine), "
                         f"got {url!r}")
    return parts.hostname, parts.port


def _get_json(host: str, port: int, path: str, timeout: float = 10.0) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, (json.loads(body) if body else {})
    finally:
        conn.close()


def stream_completion(host: str, port: int, body: dict, result: RequestResult, t0: float,
                      timeout: float) -> RequestResult:
    """POST a streamed completion and time its chunks into `result` (errors are recorded)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    sent = time.perf_counter()
    result.start = sent - t0
    chunk_times: list[float] = []
    usage = None
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            result.error = f"HTTP {resp.status}: {resp.read()[:300].decode(errors='replace')}"
            return result
        while True:
            line = resp.readline()
            now = time.perf_counter()
            if not line:
                result.error = "the stream ended without [DONE]"
                return result
            if now - sent > timeout:
                result.error = f"no [DONE] after {timeout} s"
                return result
            if not line.startswith(b"data:"):
                continue  # blank separators and ": keep-alive" comments
            data = line[5:].strip()
            if data == b"[DONE]":
                result.e2e = now - sent
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = f"in-stream error: {chunk['error'].get('message')}"
                return result
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                chunk_times.append(now)
                result.finish_reason = choice.get("finish_reason") or result.finish_reason
    except Exception as e:  # noqa: BLE001 - a broken response fails its request, not the run
        result.error = f"{type(e).__name__}: {e}"
        return result
    finally:
        conn.close()
    if not chunk_times:
        result.error = "no tokens were streamed"
        return result
    result.ttft = chunk_times[0] - sent
    result.itl = np.diff(chunk_times).tolist()
    result.output_tokens = int((usage or {}).get("completion_tokens", len(chunk_times)))
    result.ok = True
    return result


def random_prompts(lengths: list[int], vocab_size: int, seed: int) -> list[list[int]]:
    """Random token ids in [10, vocab_size), a fresh stream for every seed."""
    rng = np.random.default_rng(seed)
    return [rng.integers(FIRST_PROMPT_ID, vocab_size, size=n).tolist() for n in lengths]


def arrival_times(n: int, rate: float, seed: int = 0) -> np.ndarray:
    """Send times (s) of n requests: a Poisson process at `rate` req/s starting at 0; all 0
    when the rate is infinite."""
    if rate <= 0 or math.isnan(rate):
        raise ValueError(f"request rate must be positive (or inf), got {rate}")
    if math.isinf(rate):
        return np.zeros(n)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


def run_load(url: str, model: str, prompts: list[list[int]], output_lens: list[int], *,
             rate: float, seed: int = 0, max_concurrency: int | None = None,
             timeout: float = 600.0, temperature: float = 0.0
             ) -> tuple[list[RequestResult], float]:
    """Send every prompt at Poisson arrival times; (results in prompt order, seconds from the
    first send until the last request finished)."""
    host, port = check_loopback(url)
    if len(prompts) != len(output_lens) or not prompts:
        raise ValueError("need one output length per prompt, and at least one prompt")
    sends = arrival_times(len(prompts), rate, seed)
    results = [RequestResult(len(p), o) for p, o in zip(prompts, output_lens)]
    workers = max_concurrency or len(prompts)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="serving-load") as pool:
        t0 = time.perf_counter()
        futures = []
        for k, (prompt, out) in enumerate(zip(prompts, output_lens)):
            delay = t0 + sends[k] - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            body = {"model": model, "prompt": prompt, "max_tokens": out, "ignore_eos": True,
                    "temperature": temperature, "stream": True,
                    "stream_options": {"include_usage": True}}
            futures.append(pool.submit(stream_completion, host, port, body, results[k], t0,
                                       timeout))
        for f in futures:
            f.result()
    ends = [r.start + r.e2e for r in results if r.ok]
    return results, (max(ends) if ends else time.perf_counter() - t0)


def summarize(results: list[RequestResult], duration: float) -> dict:
    """vLLM benchmark_serving's metrics (latencies in ms) over the completed requests."""
    done = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    out = {"completed": len(done), "failed": len(results) - len(done),
           "short": sum(r.output_tokens != r.max_tokens for r in done),
           "duration_s": duration, "input_tokens": input_tokens, "output_tokens": output_tokens,
           "request_throughput": len(done) / duration,
           "output_throughput": output_tokens / duration,
           "total_token_throughput": (input_tokens + output_tokens) / duration}
    samples = {"ttft": [r.ttft for r in done],
               "tpot": [r.tpot for r in done if r.output_tokens > 1],
               "itl": [g for r in done for g in r.itl], "e2el": [r.e2e for r in done]}
    for name, values in samples.items():
        ms = np.asarray(values, dtype=np.float64) * 1000.0
        out[f"mean_{name}_ms"] = float(ms.mean()) if ms.size else math.nan
        out[f"std_{name}_ms"] = float(ms.std()) if ms.size else math.nan
        for p in PERCENTILES:
            key = "median" if p == 50 else f"p{p}"
            out[f"{key}_{name}_ms"] = float(np.percentile(ms, p)) if ms.size else math.nan
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        out["errors"] = errors[:10]
    return out


# -- the server -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launched_server(server_args: list[str], *, startup_timeout: float = 900.0) -> Iterator[str]:
    """`jaxpage serve` on a free 127.0.0.1 port for the duration of the block; yields its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "jaxpage.cli", "serve", *server_args, "--host", "127.0.0.1",
           "--port", str(port)]
    log = tempfile.NamedTemporaryFile(prefix="jaxpage-serving-bench-", suffix=".log",
                                      delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    failed = True
    try:
        deadline = time.monotonic() + startup_timeout
        while not _healthy(port):
            if proc.poll() is not None:
                raise RuntimeError(f"`jaxpage serve` exited with {proc.returncode}:\n"
                                   f"{_tail(log.name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"`jaxpage serve` not healthy after {startup_timeout} s:\n"
                                   f"{_tail(log.name)}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
        failed = False
    finally:
        _stop(proc)
        if failed:
            print(f"server log: {log.name}", file=sys.stderr)
        else:
            os.unlink(log.name)


def _healthy(port: int) -> bool:
    try:
        return _get_json("127.0.0.1", port, "/health", timeout=5.0)[0] == 200
    except (OSError, http.client.HTTPException, ValueError):
        return False


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it is its own session), SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(path: str, chars: int = 4000) -> str:
    return Path(path).read_text(errors="replace")[-chars:]


def served_model(url: str) -> tuple[str, int]:
    """(model name, max_model_len) the server reports at /v1/models."""
    host, port = check_loopback(url)
    status, body = _get_json(host, port, "/v1/models")
    if status != 200 or not body.get("data"):
        raise RuntimeError(f"/v1/models answered {status}: {body}")
    card = body["data"][0]
    return card["id"], int(card.get("max_model_len") or 0)


# -- a random-weight checkpoint ----------------------------------------------------------------

CHECKPOINT_CONFIG = "jaxpage_config.json"  # jaxpage.checkpoint.CONFIG_FILE (not imported: orbax)


def stand_in_tokenizer(vocab_size: int, dst: str | os.PathLike) -> Path:
    """A SentencePiece model for a random-weight model of `vocab_size` ids: the demo tokenizer
    (1024 pieces, Gemma's special ids), extended with ordinary pieces "▁w<ID>" up to
    `vocab_size` so that every id the model can sample decodes to text (a smaller model's ids
    are all in the demo tokenizer already). Written to `dst`; returned."""
    import sentencepiece as spm  # noqa: PLC0415

    from jaxpage.demo import build_demo_tokenizer  # noqa: PLC0415

    dst = Path(dst)
    data = build_demo_tokenizer(dst).read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=data)
    have = sp.get_piece_size()
    low = min(sp.get_score(i) for i in range(have))
    # A ModelProto's pieces are its repeated field 1 (SentencePiece: piece = 1, score = 2, type
    # = 3, NORMAL by default): appending encoded entries appends pieces, without protobuf.
    extra = bytearray()
    for k, i in enumerate(range(have, vocab_size)):
        text = f"\u2581w{i}".encode()
        piece = b"\x0a" + _varint(len(text)) + text + b"\x15" + struct.pack("<f", low - 1 - k)
        extra += b"\x0a" + _varint(len(piece)) + piece
    dst.write_bytes(data + bytes(extra))
    return dst


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def make_random_checkpoint(model: str, dst: str | os.PathLike) -> Path:
    """Write registry model `model` with random weights (bfloat16) and a stand-in tokenizer to
    `dst` (built beside it and renamed into place: a killed run leaves no half checkpoint)."""
    from jaxpage.benchmarks import common  # noqa: PLC0415
    from jaxpage.checkpoint import save_checkpoint  # noqa: PLC0415

    dst = Path(dst).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        m = common.random_model(model)
        tokenizer = stand_in_tokenizer(m.config.vocab_size, work / "tokenizer.model")
        save_checkpoint(m, m.config, work / "checkpoint", tokenizer_path=tokenizer)
        os.rename(work / "checkpoint", dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dst


@contextlib.contextmanager
def random_checkpoint(model: str, workdir: str | None = None) -> Iterator[Path]:
    """A random-weight checkpoint of `model` (a directory named after it, so that the server
    reports that name) for the duration of the block. Made in a child process, so that this
    one never holds the accelerator the server needs; under `workdir` it is reused when there,
    and kept, else it lives in a temporary directory removed at the end."""
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="jaxpage-serving-"))
    dst = root / model
    try:
        if not (dst / CHECKPOINT_CONFIG).is_file():
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "jaxpage.benchmarks.serving", "--model",
                                   model, "--make-checkpoint", str(dst)])
            if proc.returncode != 0:
                raise SystemExit(f"writing the random {model} checkpoint failed "
                                 f"(exit {proc.returncode})")
            print(f"random {model} checkpoint written in {time.perf_counter() - t0:.1f} s: "
                  f"{dst}", file=sys.stderr, flush=True)
        yield dst
    finally:
        if not workdir:
            shutil.rmtree(root, ignore_errors=True)


# -- command line -----------------------------------------------------------------------------

COLUMNS = ["rate", "completed", "failed", "request_throughput", "output_throughput",
           "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
           "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "median_e2el_ms", "p99_e2el_ms"]


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"rates must be numbers or inf, got {text!r}") from None
    if any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be positive (or inf), got {text!r}")
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxpage bench serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an already running server (http://127.0.0.1:PORT)")
    parser.add_argument("--server-args", default="",
                        help="flags for the `jaxpage serve` started when no --url is given")
    parser.add_argument("--model", help="serve this registry model (e.g. gemma2-2b) with "
                        "random weights; not with --url or a --checkpoint in --server-args")
    parser.add_argument("--workdir", help="with --model: keep its checkpoint here, and reuse it "
                        "when it is there (default: a temporary directory)")
    parser.add_argument("--make-checkpoint", help=argparse.SUPPRESS)  # the --model child
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--rates", type=_rates, default=[math.inf],
                        help="comma-separated request rates in req/s, 'inf' for all at once")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--workload", default="1024x128",
                        help="INxOUT (e.g. 1024x128) or 'sharegpt'")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"prompt token ids are drawn from [10, vocab-size) (default: "
                             f"{DEFAULT_VOCAB}, or the --model's vocabulary when smaller)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds one request may take before it counts as failed")
    parser.add_argument("--seed", type=int, default=1,
                        help="lengths, prompts and arrivals (throughput.py draws lengths with 1)")
    parser.add_argument("--json", metavar="PATH",
                        help="write the results here instead of results/ ('-': stdout)")
    args = parser.parse_args(argv)
    if args.make_checkpoint:
        if not args.model:
            parser.error("--make-checkpoint needs --model")
        make_random_checkpoint(args.model, args.make_checkpoint)
        return 0
    if args.num_prompts < 1 or (args.vocab_size or DEFAULT_VOCAB) <= FIRST_PROMPT_ID:
        parser.error("--num-prompts must be >= 1 and --vocab-size > 10")
    if args.url:
        try:
            check_loopback(args.url)
        except ValueError as e:
            parser.error(str(e))
    server_args = shlex.split(args.server_args)
    if args.model:
        if args.url:
            parser.error("--model starts a server of its own: give --model or --url")
        if any(a == "--checkpoint" or a.startswith("--checkpoint=") for a in server_args):
            parser.error("--model serves its own random checkpoint: no --checkpoint in "
                         "--server-args")
    from jaxpage.benchmarks import common  # noqa: PLC0415 - imports JAX (no device is used)
    from jaxpage.models.config import get_config  # noqa: PLC0415

    model_vocab = None
    if args.model:
        try:
            model_vocab = get_config(args.model).vocab_size
        except ValueError as e:
            parser.error(str(e))
        if args.vocab_size and args.vocab_size > model_vocab:
            parser.error(f"--vocab-size {args.vocab_size} is more than {args.model}'s "
                         f"{model_vocab}")
    args.vocab_size = args.vocab_size or min(DEFAULT_VOCAB, model_vocab or DEFAULT_VOCAB)

    lengths = common.workload(args.workload, args.num_prompts, seed=args.seed)
    outputs = [o for _, o in lengths]
    if not args.url and not any(a.startswith("--max-queued-requests") for a in server_args):
        server_args += ["--max-queued-requests", str(args.num_prompts)]  # no 503s at rate inf
    with contextlib.ExitStack() as stack:
        if args.model:
            checkpoint = stack.enter_context(random_checkpoint(args.model, args.workdir))
            server_args = ["--checkpoint", str(checkpoint), *server_args]
        url = stack.enter_context(
            contextlib.nullcontext(args.url) if args.url else
            launched_server(server_args, startup_timeout=args.startup_timeout))
        model, max_model_len = served_model(url)
        longest = max(i + o for i, o in lengths)
        if max_model_len and longest > max_model_len:
            raise SystemExit(f"a request needs {longest} tokens; the server's max_model_len "
                             f"is {max_model_len}")
        probe_prompt = random_prompts([8], args.vocab_size, seed=args.seed + len(args.rates))
        probe, _ = run_load(url, model, probe_prompt, [4], rate=math.inf, timeout=args.timeout)
        if not probe[0].ok or probe[0].output_tokens != 4:
            raise SystemExit(f"the probe request failed: {probe[0].error or probe[0]}")
        rows, details = [], []
        for k, rate in enumerate(args.rates):
            # fresh prompts for every rate: none is served from an earlier rate's prefix cache
            prompts = random_prompts([i for i, _ in lengths], args.vocab_size, seed=args.seed + k)
            results, duration = run_load(url, model, prompts, outputs, rate=rate,
                                         seed=args.seed, max_concurrency=args.max_concurrency,
                                         timeout=args.timeout, temperature=args.temperature)
            rows.append({"rate": _rate_label(rate), **summarize(results, duration)})
            details.append({"rate": _rate_label(rate), "requests": [
                {"start": r.start, "ttft": r.ttft, "e2e": r.e2e, "prompt_len": r.prompt_len,
                 "output_tokens": r.output_tokens, "error": r.error} for r in results]})
            print(f"rate {rate}: {rows[-1]['completed']} done, {rows[-1]['failed']} failed, "
                  f"{rows[-1]['output_throughput']:.1f} output tokens/s", file=sys.stderr,
                  flush=True)
    common.print_table(rows, COLUMNS)
    payload = _strict_json({
        "model": model, "random_weights": bool(args.model), "workload": args.workload,
        "num_prompts": args.num_prompts, "max_concurrency": args.max_concurrency,
        "server_args": server_args, "url": args.url,
        "rows": rows, "requests": details})
    if args.json == "-":
        print(json.dumps(payload, allow_nan=False))
    elif args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    else:
        common.save_results(f"serving-{model}", payload, plot=lambda path: _plot(rows, path))
    return 0 if all(r["failed"] == 0 for r in rows) else 1


def _rate_label(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def _strict_json(obj):
    """`obj` with NaN (no samples) as None, so that the file is standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_strict_json(v) for v in obj]
    return obj


def _plot(rows: list[dict], path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    labels = [str(r["rate"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, metric in zip(axes, ("ttft", "tpot", "itl")):
        for stat in ("mean", "median", "p99"):
            ax.plot(labels, [r[f"{stat}_{metric}_ms"] for r in rows], marker="o", label=stat)
        ax.set_title(f"{metric.upper()} (ms)")
        ax.set_xlabel("request rate (req/s)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
