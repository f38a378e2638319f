"""On-disk cache of serialized compiled executables, so a warm start skips tracing, lowering and
compiling altogether (JAX's persistent compilation cache only skips XLA's compile).

An entry's file name is the hash of everything that determines the executable: the kind and key
the runner gives it, the abstract shapes, dtypes and shardings of every argument, the donated
arguments, the static configuration the traced function closes over (the runner's `context`),
the JAX / jaxlib versions, the backend platform and device kind, XLA_FLAGS and a hash of the
jaxpage source files (so any code change invalidates every entry).

A file is `MAGIC + sha256(body) + body` and is written to a temporary file in the same directory
then renamed into place, so a killed process never leaves a half-written entry under a real
name. An entry that cannot be read, fails its checksum or fails to deserialize is logged,
ignored and recompiled. Entries are pickles that JAX loads as executable code: the directory must
be as trusted as the code itself (it lives in the user's own cache directory).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import platform
import tempfile
from importlib import import_module
from typing import Any, Mapping, Sequence

import jax
import jaxlib

from jaxpage import compat

log = logging.getLogger(__name__)

MAGIC = b"jaxpage-executable-v1\n"
_DIGEST = hashlib.sha256().digest_size
# jax.config options that change what a function lowers to
_JAX_OPTIONS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
                "jax_threefry_partitionable", "jax_numpy_dtype_promotion")


@functools.cache
def source_digest() -> str:
    """sha256 over the jaxpage package's Python sources (jaxpage/**, models/ as jaxpage.models)."""
    h = hashlib.sha256()
    for package in ("jaxpage", "jaxpage.models"):
        for root in import_module(package).__path__:
            files = []
            for folder, dirs, names in os.walk(root):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                files += [os.path.join(folder, n) for n in names if n.endswith(".py")]
            for path in sorted(files):
                h.update(f"{package}/{os.path.relpath(path, root)}\0".encode())
                with open(path, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _cpu_model() -> str:
    """The host CPU's model and feature flags (XLA:CPU code is built for the host's features)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(dict.fromkeys(lines))  # first of each kind
    except OSError:
        return platform.processor()


def environment(device: jax.Device) -> dict[str, Any]:
    """What outside the runner decides how code compiles for `device`."""
    env = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "python": platform.python_version(),
           "platform": device.platform, "device_kind": device.device_kind,
           "platform_version": getattr(device.client, "platform_version", ""),
           "compute_capability": getattr(device, "compute_capability", None),
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
           "LIBTPU_INIT_ARGS": os.environ.get("LIBTPU_INIT_ARGS", ""),
           "options": {name: str(getattr(jax.config, name, None)) for name in _JAX_OPTIONS},
           "source": source_digest()}
    if device.platform == "cpu":
        env["cpu"] = (platform.machine(), _cpu_model())
    return env


def describe_args(args: Sequence[Any]) -> str:
    """The abstract arguments: tree structure, then shape, dtype, weak type, sharding of leaves."""
    leaves, treedef = jax.tree.flatten(tuple(args))
    parts = [str(treedef)]
    for x in leaves:
        sharding = getattr(x, "sharding", None)
        parts.append(f"{tuple(x.shape)}:{x.dtype}:{bool(getattr(x, 'weak_type', False))}:"
                     f"{sharding if sharding is not None else ''}")
    return "\n".join(parts)


class ExecutableCache:
    """Serialized executables of one runner configuration in one directory."""

    def __init__(self, directory: str, context: Mapping[str, Any], device: jax.Device):
        """`context`: the static configuration the runner's traced functions close over (reprs
        must be deterministic across processes); `device`: the one the executables run on."""
        self.directory = directory
        self.platform = device.platform
        h = hashlib.sha256(repr(sorted(context.items())).encode())
        h.update(repr(sorted(environment(device).items())).encode())
        self._context_digest = h.hexdigest()

    def name(self, kind: str, key: Any, donate: Sequence[int], args: Sequence[Any]) -> str:
        """File name of the executable of `kind`/`key` lowered from `args` (abstract or real)."""
        h = hashlib.sha256(self._context_digest.encode())
        h.update(repr((kind, key, tuple(donate))).encode())
        h.update(describe_args(args).encode())
        return f"{kind}-{h.hexdigest()[:40]}.jexe"

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def load(self, name: str) -> jax.stages.Compiled | None:
        """The cached executable, or None when there is none or it cannot be used (logged)."""
        path = self.path(name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("ignoring unreadable executable cache entry %s: %s", path, e)
            return None
        try:
            head, digest = data[:len(MAGIC)], data[len(MAGIC):len(MAGIC) + _DIGEST]
            body = data[len(MAGIC) + _DIGEST:]
            if head != MAGIC or hashlib.sha256(body).digest() != digest:
                raise ValueError("bad header or checksum (truncated or corrupt file)")
            payload, in_tree, out_tree, devices = pickle.loads(body)
            return compat.deserialize_compiled(payload, in_tree, out_tree, devices)
        except Exception as e:  # noqa: BLE001 - any failure means recompile, never a failed start
            log.warning("ignoring executable cache entry %s that cannot be loaded (%s: %s); "
                        "it will be recompiled", path, type(e).__name__, e)
            return None

    def serialize(self, name: str, compiled: jax.stages.Compiled,
                  from_persistent_cache: bool = False) -> bytes | None:
        """The entry body of an executable, or None (logged) when it cannot be serialized.
        `from_persistent_cache`: JAX's persistent cache supplied it (see compat.reserializable).
        Never raises."""
        if not compat.reserializable(self.platform, from_persistent_cache):
            log.debug("not caching %s: loaded from the persistent compilation cache", name)
            return None
        try:
            return pickle.dumps(compat.serialize_compiled(compiled),
                                protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # noqa: BLE001
            log.debug("not caching %s: %s: %s", name, type(e).__name__, e)
            return None

    def write(self, name: str, body: bytes) -> bool:
        """Write a serialized entry atomically; False (logged) when it cannot be written."""
        tmp = None
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.directory)
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + hashlib.sha256(body).digest() + body)
            os.replace(tmp, self.path(name))
            return True
        except OSError as e:
            log.warning("could not write executable cache entry %s: %s", self.path(name), e)
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            return False

    def store(self, name: str, compiled: jax.stages.Compiled,
              from_persistent_cache: bool = False) -> bool:
        """Serialize and write; False when either step fails. Never raises."""
        body = self.serialize(name, compiled, from_persistent_cache)
        return body is not None and self.write(name, body)
