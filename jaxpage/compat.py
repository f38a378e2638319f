"""Differences between the JAX versions we run on (0.10.2 on CPU hosts, 0.11.2 on GPU hosts).

Every version-dependent spelling lives here; the rest of the code imports it from this module.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Sequence

import jax

JAX_VERSION: tuple[int, ...] = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def default_cache_dir() -> str:
    """$JAXPAGE_CACHE, else ~/.cache/jaxpage: where demo assets and compiled programs live."""
    return os.environ.get("JAXPAGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxpage")


def enable_persistent_compilation_cache(path: str | None = None) -> None:
    """Turn on JAX's on-disk compilation cache (every executable, however fast it compiled)."""
    path = path or os.path.join(default_cache_dir(), "xla")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def executable_cache_dir(path: str | None = None) -> str:
    """Where serialized compiled executables live: `executables/` inside the XLA cache directory
    given to `enable_persistent_compilation_cache`, or beside the default one."""
    return os.path.join(path or default_cache_dir(), "executables")


# --- Serialized executables (jaxpage/executable_cache.py) ----------------------------------------
# jax.experimental.serialize_executable.{serialize, deserialize_and_load}: the same signatures on
# 0.10.2 and 0.11.2 (and the same private fields of the executable read below).
# The payload pickles JAX's own executable object, whose fields are internal: loading it with a
# different JAX fails or misbehaves, so cache keys must carry the exact versions.


_PERSISTENT_CACHE_HIT = "/jax/compilation_cache/cache_hits"  # JAX's monitoring event name
_compile_thread = threading.local()
_hit_listener_lock = threading.Lock()
_hit_listener_on = False
_from_persistent_cache: weakref.WeakSet = weakref.WeakSet()  # executables the cache supplied


def _count_persistent_cache_hit(event: str, **_: Any) -> None:
    if event == _PERSISTENT_CACHE_HIT:  # recorded in the thread that asked for the compile
        _compile_thread.hits = getattr(_compile_thread, "hits", 0) + 1


def compile_lowered(lowered: jax.stages.Lowered) -> tuple[jax.stages.Compiled, bool]:
    """`lowered.compile()`, and whether JAX's persistent compilation cache supplied the result."""
    global _hit_listener_on
    with _hit_listener_lock:
        if not _hit_listener_on:
            jax.monitoring.register_event_listener(_count_persistent_cache_hit)
            _hit_listener_on = True
    _compile_thread.hits = 0
    compiled = lowered.compile()
    # JAX hands the same in-process executable out again for an identical compile of the same
    # function (e.g. a module-level one lowered by two engines), without a second cache event.
    executable = compiled._executable
    with _hit_listener_lock:
        if _compile_thread.hits:
            _from_persistent_cache.add(executable)
        return compiled, executable in _from_persistent_cache


def reserializable(platform: str, from_persistent_cache: bool) -> bool:
    """Whether an executable can be serialized again and still run when loaded.

    XLA:CPU (seen on jaxlib 0.10.2 and 0.11.2) drops the compiled functions when it serializes an
    executable that it had itself loaded from serialized form (JAX's persistent cache): the
    reloaded copy fails with "NOT_FOUND: Function ... not found". Such executables are not
    stored; a fresh compile is. XLA:GPU (0.11.2, H200) round-trips them correctly.
    """
    return not (platform == "cpu" and from_persistent_cache)


def serializable_after_running(platform: str) -> bool:
    """Whether an executable can still be serialized after it has run. XLA:CPU (jaxlib 0.10.2)
    compiles some pieces (a sort's comparator) on first run and then refuses to serialize:
    "UNIMPLEMENTED: `LessThan` is not serializable"."""
    return platform != "cpu"


def serialize_compiled(compiled: jax.stages.Compiled) -> tuple[bytes, Any, Any, tuple[int, ...]]:
    """(payload, in_tree, out_tree, ids of the devices it runs on) of a compiled executable.

    Raises ValueError for one that cannot be reloaded in another process: one that calls back into
    Python (Pallas interpret mode, io_callback) or keeps Python objects alive beside it.
    """
    from jax.experimental import serialize_executable  # noqa: PLC0415 - only the cache needs it

    unloaded = getattr(compiled._executable, "_unloaded_executable", None)
    if unloaded is None:
        raise ValueError("this executable does not support serialization")
    if getattr(unloaded, "host_callbacks", None) or getattr(unloaded, "keepalive", None):
        raise ValueError("the executable calls back into Python (host callbacks)")
    if getattr(unloaded, "ordered_effects", None) or getattr(unloaded, "unordered_effects", None):
        raise ValueError("the executable has side effects")
    devices = tuple(int(d.id) for d in unloaded.device_list)
    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    return payload, in_tree, out_tree, devices


def deserialize_compiled(payload: bytes, in_tree: Any, out_tree: Any,
                         device_ids: Sequence[int]) -> jax.stages.Compiled:
    """Load what `serialize_compiled` returned onto the same devices (ids) of this process."""
    from jax.experimental import serialize_executable  # noqa: PLC0415

    by_id = {d.id: d for d in jax.devices()}
    missing = [i for i in device_ids if i not in by_id]
    if missing or not device_ids:
        raise ValueError(f"the executable runs on devices {list(device_ids)}; this process has "
                         f"{sorted(by_id)}")
    devices = [by_id[i] for i in device_ids]
    return serialize_executable.deserialize_and_load(
        payload, in_tree, out_tree, backend=devices[0].client, execution_devices=devices)


# --- Pallas TPU (Mosaic) -------------------------------------------------------------------------


def tpu_compiler_params(dimension_semantics: tuple[str, ...], **kwargs):
    """Mosaic TPU compiler parameters (`pltpu.CompilerParams`; `TPUCompilerParams` before 0.7)."""
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415 - Pallas is imported on use

    cls = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
    return cls(dimension_semantics=dimension_semantics, **kwargs)


def tpu_interpret_races_found() -> bool:
    """Whether the TPU interpret-mode race detector flagged a race in the last detecting run."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # noqa: PLC0415

    races = interpret_pallas_call.races  # an AttributeError here means JAX moved the flag
    return bool(races is not None and races.races_found)


# --- Pallas Triton lowering (jaxpage/pallas_kernels/gpu*.py) ----------------------------------
# Masked loads/stores and compiler parameters of the Triton lowering, spelled
# jax.experimental.pallas.triton.{load, store, CompilerParams} on both 0.10.2 and 0.11.2.


def _pallas_triton():
    from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415 - only GPU kernels use it

    return plgpu


def triton_load(ref, *, mask=None, other=None):
    """Masked load of an indexed ref (`ref.at[...]`); masked lanes read `other`."""
    return _pallas_triton().load(ref, mask=mask, other=other)


def triton_store(ref, value, *, mask=None) -> None:
    """Masked store into an indexed ref (`ref.at[...]`); masked lanes write nothing."""
    _pallas_triton().store(ref, value, mask=mask)


def triton_compiler_params(*, num_warps: int, num_stages: int):
    """`compiler_params=` value for a Triton-lowered pallas_call."""
    return _pallas_triton().CompilerParams(num_warps=num_warps, num_stages=num_stages)
