"""The compiled executables a runner serves with: built at start-up, kept by (kind, key).

Each executable is identified by a kind ("forward", "burst", "sample", "penalise", "copy") and a
key (its bucket or plan); the runner says what function it compiles and with which argument
shapes. At start-up every one is loaded from the executable cache (serialized executables on
disk, executable_cache.py) or lowered and compiled, on a pool of threads; compiled ones are
written to the cache later, when the engine is idle, so writing never delays the first token.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Callable, Sequence

import jax

from jaxpage import compat
from jaxpage.executable_cache import ExecutableCache

log = logging.getLogger(__name__)

Key = tuple[str, object]  # (kind, key within the kind)


class Executables:
    """Executables by kind and key; `function(kind, key)` is what one compiles and
    `args(kind, key)` its (donated argument numbers, arguments or their shapes)."""

    def __init__(self, function: Callable[[str, object], Callable],
                 args: Callable[[str, object], tuple[tuple[int, ...], tuple]], *,
                 cache: ExecutableCache | None, workers: int, precompile: bool):
        self._function, self._args = function, args
        self._cache = cache
        self._workers = workers
        self.precompile = precompile  # every executable is built at start-up: none on demand
        self._tables: dict[str, dict] = {}
        self.loaded = 0     # executables start-up (or first use) found in the cache
        self.compiled = 0   # executables it lowered and compiled
        self.compile_seconds = 0.0
        self.compile_times: dict[Key, tuple[float, float]] = {}  # lower, compile seconds
        # (name, executable or its serialized body, from XLA cache) not yet written to the cache
        self._unsaved: list[tuple[str, object, bool]] = []

    def table(self, kind: str) -> dict:
        """The executables of one kind, by key."""
        return self._tables.setdefault(kind, {})

    def get(self, kind: str, key):
        """The executable of `kind`/`key`; built now if start-up did not (precompile off)."""
        table = self.table(kind)
        if key not in table:
            if self.precompile:
                raise KeyError(f"no compiled {kind} executable for {key}: a bucket was missed")
            t0 = time.perf_counter()
            table[key] = self._build_one(kind, key)
            self.compile_seconds += time.perf_counter() - t0
        return table[key]

    def build_all(self, keys: Sequence[Key]) -> float:
        """Load from the executable cache, or else lower and compile, every (kind, key), in the
        order given (longest compiles first pays off: they start first); returns seconds."""
        t0 = time.perf_counter()
        names = [self.cache_name(kind, key) for kind, key in keys]
        with concurrent.futures.ThreadPoolExecutor(self._workers) as pool:
            exes = list(pool.map(self._load, names))
            misses = [i for i, exe in enumerate(exes) if exe is None]
            # Tracing and lowering hold the GIL, XLA's compile mostly does not: lower here and
            # hand each to a compile thread as soon as it is lowered.
            futures, lower_s = {}, {}
            for i in misses:
                lowered, lower_s[i] = _timed(self._lower, *keys[i])
                futures[i] = pool.submit(_timed, compat.compile_lowered, lowered)
            for i in misses:
                (exes[i], from_xla_cache), compile_s = futures[i].result()
                self.compile_times[keys[i]] = (lower_s[i], compile_s)
                self._queue_store(names[i], exes[i], from_xla_cache)
        for (kind, key), exe in zip(keys, exes):
            self.table(kind)[key] = exe
        self.loaded += len(keys) - len(misses)
        self.compiled += len(misses)
        self.compile_seconds = time.perf_counter() - t0
        log.info("%s ready in %.1f s: %d executables loaded from the executable cache, "
                 "%d compiled (%s)",
                 ", ".join(f"{len(t)} {kind}" for kind, t in self._tables.items()),
                 self.compile_seconds, len(keys) - len(misses), len(misses),
                 "executable cache on" if self._cache else "executable cache off")
        return self.compile_seconds

    def compile_time_summary(self) -> dict[str, dict[str, float]]:
        """Per kind of executable: how many were compiled, seconds spent lowering them (one
        thread) and compiling them (summed over threads), and the longest single compile."""
        out: dict[str, dict[str, float]] = {}
        for (kind, _), (lower_s, compile_s) in self.compile_times.items():
            row = out.setdefault(kind, {"count": 0, "lower_s": 0.0, "compile_s": 0.0,
                                        "max_compile_s": 0.0})
            row["count"] += 1
            row["lower_s"] += lower_s
            row["compile_s"] += compile_s
            row["max_compile_s"] = max(row["max_compile_s"], compile_s)
        return out

    @property
    def unsaved(self) -> int:
        """Compiled executables not yet written to the executable cache."""
        return len(self._unsaved)

    def save(self, max_entries: int | None = None) -> int:
        """Serialize and write up to `max_entries` (all by default) compiled executables to the
        executable cache; returns how many were written. For idle moments: each takes tens to
        hundreds of milliseconds of host time."""
        written = 0
        while self._unsaved and (max_entries is None or max_entries > 0):
            name, exe, from_xla_cache = self._unsaved.pop()
            body = exe if isinstance(exe, bytes) else self._cache.serialize(
                name, exe, from_xla_cache)
            written += body is not None and self._cache.write(name, body)
            max_entries = None if max_entries is None else max_entries - 1
        return written

    def cache_name(self, kind: str, key) -> str | None:
        """The executable's entry name in the cache (None: no cache)."""
        return None if self._cache is None else self._cache.name(kind, key, *self._args(kind, key))

    def _lower(self, kind: str, key):
        donate, args = self._args(kind, key)
        return jax.jit(self._function(kind, key), donate_argnums=donate).lower(*args)

    def _load(self, name: str | None):
        return None if name is None else self._cache.load(name)

    def _build_one(self, kind: str, key):
        name = self.cache_name(kind, key)
        exe = self._load(name)
        if exe is not None:
            self.loaded += 1
            return exe
        lowered, lower_s = _timed(self._lower, kind, key)
        (exe, from_xla_cache), compile_s = _timed(compat.compile_lowered, lowered)
        self.compile_times[(kind, key)] = (lower_s, compile_s)
        self._queue_store(name, exe, from_xla_cache)
        self.compiled += 1
        return exe

    def _queue_store(self, name: str | None, exe, from_xla_cache: bool) -> None:
        """Keep a fresh executable for `save`, serialized now where it could not be once it has
        run (compat.serializable_after_running)."""
        if name is None:
            return
        if compat.serializable_after_running(self._cache.platform):
            self._unsaved.append((name, exe, from_xla_cache))
        else:
            body = self._cache.serialize(name, exe, from_xla_cache)
            if body is not None:
                self._unsaved.append((name, body, from_xla_cache))


def _timed(fn, *args):
    """(fn(*args), seconds it took)."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0
