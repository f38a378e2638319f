"""Shared pieces of the benchmarks: random-weight models, workloads, HBM bandwidth, result files."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpage.models.config import GemmaConfig, get_config
from jaxpage.models.gemma import Gemma

# $JAXPAGE_RESULTS_DIR redirects results (tests use it so runs never touch the recorded ones).
RESULTS_DIR = Path(os.environ.get("JAXPAGE_RESULTS_DIR")
                   or Path(__file__).resolve().parent / "results")


def random_model(name: str, dtype="bfloat16", seed: int = 0) -> Gemma:
    """A registry model with random weights (same speed as real ones), built on the device."""
    return Gemma(get_config(name), dtype=jnp.dtype(dtype), rngs=nnx.Rngs(seed))


def weight_bytes(model: Gemma) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))


def kv_bytes_per_token(config: GemmaConfig, dtype=jnp.bfloat16) -> dict[str, int]:
    """Bytes one token's keys+values take in each layer group (all the group's layers)."""
    per_layer = 2 * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize
    return {g: per_layer * sum(1 for t in config.layer_types if t == g)
            for g in config.layer_groups}


def decode_kv_read_bytes(config: GemmaConfig, context: int, dtype=jnp.bfloat16) -> int:
    """KV bytes one decode query at `context` tokens reads (window layers read the window)."""
    per = kv_bytes_per_token(config, dtype)
    return sum(n * (context if g == "global" else min(context, config.sliding_window))
               for g, n in per.items())


def sharegpt_like(n: int, seed: int = 0, *, mean_in: int = 161, mean_out: int = 338,
                  max_len: int = 2048) -> list[tuple[int, int]]:
    """(input, output) lengths with ShareGPT's means: log-normal, heavy-tailed, clipped."""
    rng = np.random.default_rng(seed)

    def draw(mean, sigma=0.9):
        x = rng.lognormal(np.log(mean) - sigma ** 2 / 2, sigma, size=n)
        return np.clip(np.round(x), 4, max_len).astype(int)

    return list(zip(draw(mean_in).tolist(), draw(mean_out).tolist()))


def workload(spec: str, n: int, seed: int = 0, max_len: int = 2048) -> list[tuple[int, int]]:
    """"1024x128" -> n fixed (1024, 128) requests; "sharegpt" -> the ShareGPT-like mix, each
    length clipped to max_len."""
    if spec == "sharegpt":
        return sharegpt_like(n, seed, max_len=max_len)
    try:
        i, o = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise SystemExit(f"workload must be INxOUT (e.g. 1024x128) or 'sharegpt', got {spec!r}")
    return [(i, o)] * n


def random_prompts(lengths: list[tuple[int, int]], vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(10, vocab, size=i).tolist() for i, _ in lengths]


def hbm_bandwidth(num_bytes: int = 4 << 30, reps: int = 20) -> float:
    """Device copy bandwidth in bytes/s (bytes read + written), measured now."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)  # one read + one write per element
    copy(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        y = copy(x)
    y.block_until_ready()
    return 2 * num_bytes * reps / (time.perf_counter() - t0)


def device_description() -> dict:
    dev = jax.devices()[0]
    return {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
            "jax": jax.__version__, "python": platform.python_version(),
            "host": platform.node()}


def save_results(name: str, payload: dict, *, plot=None) -> list[Path]:
    """Write <date>-<name>.json (+ .png when `plot(path)` is given) to results/ and $OUT."""
    stamp = datetime.date.today().isoformat()
    payload = {"benchmark": name, "date": stamp,
               "command": " ".join(shlex.quote(a) for a in sys.argv), **device_description(),
               **payload}
    dirs = [RESULTS_DIR] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    written = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{stamp}-{name}.json"
        path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
        written.append(path)
        if plot is not None:
            png = path.with_suffix(".png")
            plot(png)
            written.append(png)
    return written


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
    return "-" if v is None else str(v)


@contextlib.contextmanager
def figure(path, **subplots):
    """`with figure(path) as (fig, ax):` draw; the PNG is written and the figure closed after."""
    import matplotlib  # noqa: PLC0415 - plotting only when asked

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(**subplots)
    try:
        yield fig, ax
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
