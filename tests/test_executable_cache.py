"""The executable cache: a warm start loads every compiled step from disk instead of tracing,
lowering and compiling it again; anything that could change an executable changes its key; a bad
entry is recompiled, never fatal; with the compilation cache off nothing is written."""

import hashlib
import logging
import os
import pickle
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as xla_cache

from engine_utils import make_engine, random_requests
from jaxpage import compat, executable_cache
from jaxpage.engine import OutputKind
from jaxpage.executable_cache import MAGIC, ExecutableCache
from jaxpage.executables import Executables
from jaxpage.sampling_params import SamplingParams

SMALL = dict(precompile=True, max_num_batched_tokens=32)  # buckets 16, 32: 11 executables
REQUESTS = random_requests(seed=3, n=6, max_prompt=30, max_output=8)
PARAMS = [SamplingParams(temperature=0.0, max_tokens=6, logprobs=2),
          SamplingParams(temperature=0.9, top_p=0.8, seed=4, max_tokens=7),
          SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=5)]


@pytest.fixture(scope="module", autouse=True)
def fresh_compiles():
    """Compile afresh while these tests run: on CPU an executable that JAX's persistent
    compilation cache supplied is not stored (see compat.reserializable), and the suite's own
    persistent cache (conftest) would otherwise supply most of them; JAX's in-memory caches
    would hand out again one that an earlier test in this worker had from it (a module-level
    function such as sampler.penalise, lowered with the same shapes)."""
    jax.config.update("jax_enable_compilation_cache", False)
    xla_cache.reset_cache()
    jax.clear_caches()
    yield
    jax.config.update("jax_enable_compilation_cache", True)
    xla_cache.reset_cache()


def use_dir(monkeypatch, path) -> None:
    """Engines built from here on keep their serialized executables in `path`."""
    monkeypatch.setattr(compat, "executable_cache_dir", lambda xla_dir=None: str(path))


@pytest.fixture
def exe_dir(tmp_path, monkeypatch):
    path = tmp_path / "executables"
    use_dir(monkeypatch, path)
    return path


@pytest.fixture
def lowered(monkeypatch):
    """Every (kind, key) the runners in this test trace and lower."""
    calls = []
    original = Executables._lower

    def spy(self, kind, key):
        calls.append((kind, key))
        return original(self, kind, key)

    monkeypatch.setattr(Executables, "_lower", spy)
    return calls


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """(directory, the SMALL gemma2 engine that filled it by compiling every executable)."""
    path = tmp_path_factory.mktemp("filled") / "executables"
    # JAX hands out its in-memory executable again for an identical compile, and one that an
    # earlier test in this process had from the persistent cache is not stored on the CPU
    # (compat.compile_lowered): compile from scratch.
    jax.clear_caches()
    with pytest.MonkeyPatch.context() as mp:
        use_dir(mp, path)
        engine = make_engine("gemma2", **SMALL)
        engine.save_executables()
    keys = engine.runner.executable_keys()
    assert engine.runner.executables.compiled == len(keys) == len(entries(path))
    return path, engine


@pytest.fixture
def copy_of_filled(filled, tmp_path, monkeypatch):
    """A private copy of the filled directory, used by engines built in this test."""
    path = tmp_path / "executables"
    shutil.copytree(filled[0], path)
    use_dir(monkeypatch, path)
    return path


def entries(path) -> list[str]:
    return sorted(n for n in os.listdir(path) if not n.startswith(".")) if path.exists() else []


def outputs(engine, requests=REQUESTS) -> dict[str, tuple]:
    """Token ids and logprobs of every request, batched together."""
    for i, (prompt, _) in enumerate(requests):
        engine.add_request(f"r{i}", prompt_token_ids=prompt, params=PARAMS[i % len(PARAMS)],
                           output_kind=OutputKind.FINAL_ONLY)
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                results[out.request_id] = (c.token_ids, c.logprobs)
    return results


# -- a warm start loads everything ----------------------------------------------------------------

def test_a_second_engine_with_the_same_config_loads_every_executable_and_samples_the_same_tokens(
        filled, copy_of_filled, lowered):
    expected = outputs(filled[1])  # the engine that compiled everything
    second = make_engine("gemma2", **SMALL)
    assert lowered == []  # nothing traced, lowered or compiled
    assert second.runner.executables.loaded == len(second.runner.executable_keys())
    assert second.runner.executables.compiled == 0
    assert outputs(second) == expected


def test_engines_that_compile_on_first_use_store_and_load_the_same_way(exe_dir, lowered):
    first = make_engine("gemma2", **(SMALL | {"precompile": False}))
    expected = outputs(first)
    assert first.save_executables() == 0
    compiled = list(lowered)
    assert compiled and first.runner.executables.loaded == 0
    assert len(entries(exe_dir)) == len(compiled) == first.runner.executables.compiled

    lowered.clear()
    second = make_engine("gemma2", **(SMALL | {"precompile": False}))
    assert outputs(second) == expected
    assert lowered == []
    assert second.runner.executables.loaded == len(compiled)


def test_start_up_logs_how_many_executables_were_loaded_and_compiled(copy_of_filled, caplog):
    with caplog.at_level(logging.INFO, logger="jaxpage.executables"):
        runner = make_engine("gemma2", **SMALL).runner
    n = len(runner.executable_keys())
    assert any(f"{n} executables loaded from the executable cache, 0 compiled" in r.getMessage()
               for r in caplog.records)


# -- when entries are written ----------------------------------------------------------------------

def test_start_up_writes_nothing_and_each_save_writes_what_was_asked(exe_dir):
    engine = make_engine("gemma2", **SMALL)
    n = len(engine.runner.executable_keys())
    assert entries(exe_dir) == [] and engine.runner.executables.unsaved == n
    assert engine.save_executables(max_entries=2) == n - 2
    assert len(entries(exe_dir)) == 2
    assert engine.save_executables() == 0
    assert len(entries(exe_dir)) == n


def test_the_server_loop_saves_executables_once_it_is_idle(exe_dir):
    from jaxpage.engine_client import EngineClient  # noqa: PLC0415

    client = EngineClient(lambda: make_engine("gemma2", **SMALL), stats_interval=0.05)
    client.start(timeout=300)
    try:
        n = len(client.engine.runner.executable_keys())
        deadline = time.monotonic() + 120
        while len(entries(exe_dir)) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(entries(exe_dir)) == n
        assert client.engine.runner.executables.unsaved == 0
    finally:
        client.shutdown()


def test_start_up_records_lowering_and_compile_seconds_of_every_executable(exe_dir):
    runner = make_engine("gemma2", **SMALL).runner
    summary = runner.executables.compile_time_summary()
    kinds = [kind for kind, _ in runner.executable_keys()]
    assert {k: row["count"] for k, row in summary.items()} == {
        k: kinds.count(k) for k in set(kinds)}
    assert all(row["compile_s"] >= row["max_compile_s"] > 0 and row["lower_s"] > 0
               for row in summary.values())


def test_the_longest_compiles_are_lowered_first(exe_dir, lowered):
    make_engine("gemma2", **SMALL)
    rank = {"forward": 0, "burst": 0, "copy": 1, "sample": 2, "penalise": 3}
    kinds = [kind for kind, _ in lowered]
    assert kinds == sorted(kinds, key=rank.get) and "burst" in kinds
    buckets = [key[0] for kind, key in lowered if kind in ("forward", "burst")]
    assert buckets == sorted(buckets, reverse=True)
    plain = [i for i, (kind, key) in enumerate(lowered) if kind == "sample" and not (
        key[0].filtering or key[0].num_logprobs or key[1])]
    assert plain and plain[0] > max(i for i, (kind, key) in enumerate(lowered)
                                    if kind == "sample" and key[0].filtering and key[0].num_logprobs)


# -- what changes the key -------------------------------------------------------------------------

def test_a_larger_token_budget_reuses_every_executable_whose_inputs_did_not_change(
        copy_of_filled, lowered):
    engine = make_engine("gemma2", **(SMALL | {"max_num_batched_tokens": 64}))
    engine.save_executables()
    runner, exes = engine.runner, engine.runner.executables
    # a new bucket (64), and a larger local-layer KV pool for every step, burst and the page
    # copy; the sampler plans and penalty steps see the same inputs and are loaded
    bursts = {("burst", key) for key in runner._burst_keys()}
    assert set(lowered) == {("forward", (16, False)), ("forward", (32, False)),
                            ("forward", (64, False)), ("copy", None)} | bursts and bursts
    # one row bucket: 2 x 2 x 2 sampler plans; one token-list length: one penalty step
    assert exes.loaded == len(exes.table("sample")) + len(exes.table("penalise")) == 8 + 1
    # beside them, the old entries of what was lowered again: two forward steps, the copy, bursts
    assert len(entries(copy_of_filled)) == len(runner.executable_keys()) + 3 + len(bursts)


@pytest.mark.parametrize("change, reused", [
    (dict(sliding_window=4), set()),
    (dict(page_size=8, num_pages=48), set()),
    (dict(kv_cache_dtype="bfloat16"), {"sample", "penalise"}),  # they never see the KV cache
], ids=["model_config", "page_size", "kv_dtype"])
def test_a_different_model_or_cache_layout_misses_every_executable_it_could_change(
        copy_of_filled, change, reused):
    runner = make_engine("gemma2", **(SMALL | change | {"precompile": False})).runner
    names = {kind: {runner.executables.cache_name(k, key)
                    for k, key in runner.executable_keys() if k == kind}
             for kind in ("forward", "sample", "penalise", "copy")}
    present = set(entries(copy_of_filled))
    assert {kind for kind, ns in names.items() if ns & present} == reused
    assert all(ns <= present for kind, ns in names.items() if kind in reused)


def _names() -> set[str]:
    """Names a fixed context gives three executables in the current environment."""
    cache = ExecutableCache("/nonexistent", {"model": "m"}, jax.devices()[0])
    arg = jax.ShapeDtypeStruct((4,), jnp.int32)
    return {cache.name("forward", (16, False), (1,), (arg, arg)),
            cache.name("sample", "plan", (), (arg,)), cache.name("copy", None, (0,), (arg, arg))}


@pytest.mark.parametrize("ingredient", ["jax_version", "jaxlib_version", "source", "xla_flags",
                                        "device_kind", "matmul_precision"])
def test_every_ingredient_of_the_environment_changes_every_name(ingredient, monkeypatch):
    before = _names()
    if ingredient == "jax_version":
        monkeypatch.setattr(jax, "__version__", "0.0.1")
    elif ingredient == "jaxlib_version":
        monkeypatch.setattr(executable_cache.jaxlib, "__version__", "0.0.1")
    elif ingredient == "source":  # any edit to a jaxpage .py file
        monkeypatch.setattr(executable_cache, "source_digest", lambda: "edited")
    elif ingredient == "xla_flags":
        monkeypatch.setenv("XLA_FLAGS", (os.environ.get("XLA_FLAGS", "") + " --xla_foo").strip())
    elif ingredient == "device_kind":
        real = executable_cache.environment
        monkeypatch.setattr(executable_cache, "environment",
                            lambda d: real(d) | {"device_kind": "another chip"})
    if ingredient == "matmul_precision":
        with jax.default_matmul_precision("highest"):
            after = _names()
    else:
        after = _names()
    assert len(after) == 3 and not before & after


def test_names_depend_on_context_key_donation_and_argument_shapes():
    device = jax.devices()[0]
    a = ExecutableCache("/x", {"page_size": 16}, device)
    b = ExecutableCache("/x", {"page_size": 32}, device)
    i4, i8 = jax.ShapeDtypeStruct((4,), jnp.int32), jax.ShapeDtypeStruct((8,), jnp.int32)
    f4 = jax.ShapeDtypeStruct((4,), jnp.float32)
    base = a.name("forward", (16, False), (1,), (i4,))
    assert base == ExecutableCache("/x", {"page_size": 16}, device).name(
        "forward", (16, False), (1,), (i4,))  # deterministic
    variants = {base, b.name("forward", (16, False), (1,), (i4,)),
                a.name("forward", (16, True), (1,), (i4,)),
                a.name("forward", (16, False), (), (i4,)),
                a.name("forward", (16, False), (1,), (i8,)),
                a.name("forward", (16, False), (1,), (f4,)),
                a.name("forward", (16, False), (1,), ([i4],))}
    assert len(variants) == 7


def test_editing_a_model_source_file_changes_the_source_digest(tmp_path, monkeypatch):
    import jaxpage.models  # noqa: PLC0415 - models/ is installed as jaxpage.models

    digest = executable_cache.source_digest.__wrapped__  # uncached: reads the files again
    assert digest() == executable_cache.source_digest()
    copy = tmp_path / "models"
    shutil.copytree(jaxpage.models.__path__[0], copy,
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(jaxpage.models, "__path__", [str(copy)])
    before = digest()
    (copy / "gemma.py").write_text((copy / "gemma.py").read_text() + "\n# edited\n")
    assert digest() != before


# -- bad entries ----------------------------------------------------------------------------------

def _envelope(body: bytes) -> bytes:
    return MAGIC + hashlib.sha256(body).digest() + body


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad_checksum", "undeserializable"])
def test_a_corrupt_entry_is_ignored_logged_and_recompiled(copy_of_filled, lowered, caplog,
                                                          damage):
    victim = copy_of_filled / next(n for n in entries(copy_of_filled) if n.startswith("forward-"))
    data = victim.read_bytes()
    victim.write_bytes({
        "truncated": data[:len(data) // 2],  # what a killed writer would leave, were it not atomic
        "garbage": np.random.default_rng(0).bytes(len(data)),
        "bad_checksum": data[:-100] + bytes(b ^ 0xFF for b in data[-100:]),
        "undeserializable": _envelope(pickle.dumps((b"not an executable", None, None, (0,)))),
    }[damage])

    with caplog.at_level(logging.WARNING, logger="jaxpage"):
        engine = make_engine("gemma2", **SMALL)
    assert len(lowered) == 1 and lowered[0][0] == "forward"  # only the damaged one
    assert engine.runner.executables.loaded == len(engine.runner.executable_keys()) - 1
    assert any(victim.name in r.getMessage() for r in caplog.records)
    assert outputs(engine, REQUESTS[:2])  # and it serves

    engine.save_executables()
    lowered.clear()
    make_engine("gemma2", **SMALL)  # the recompiled entry was written back
    assert lowered == []


def test_an_entry_that_fails_to_load_on_this_device_is_recompiled(copy_of_filled, lowered,
                                                                  monkeypatch):
    def fail(*args):
        raise RuntimeError("built for another device")

    monkeypatch.setattr(compat, "deserialize_compiled", fail)
    engine = make_engine("gemma2", **(SMALL | {"precompile": False}))
    assert outputs(engine, REQUESTS[:2])
    assert lowered and engine.runner.executables.loaded == 0
    assert engine.runner.executables.compiled == len(lowered)


def test_a_failed_write_leaves_neither_an_entry_nor_a_temporary_file(tmp_path, monkeypatch):
    cache = ExecutableCache(str(tmp_path), {}, jax.devices()[0])
    x = jax.ShapeDtypeStruct((4,), jnp.float32)
    compiled = jax.jit(lambda v: v * 2).lower(x).compile()
    name = cache.name("copy", None, (), (x,))

    def interrupted(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", interrupted)
    assert cache.store(name, compiled) is False
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    assert cache.store(name, compiled) is True
    assert os.listdir(tmp_path) == [name]
    np.testing.assert_array_equal(cache.load(name)(np.arange(4, dtype=np.float32)),
                                  np.arange(4) * 2)


def test_an_executable_that_calls_back_into_python_is_not_stored(tmp_path):
    # Pallas interpret mode (pallas_tpu on a CPU host) runs kernels through host callbacks:
    # such an executable cannot be reloaded in another process, so it is simply recompiled.
    cache = ExecutableCache(str(tmp_path), {}, jax.devices()[0])
    x = jax.ShapeDtypeStruct((4,), jnp.float32)
    compiled = jax.jit(lambda v: jax.pure_callback(np.sin, x, v)).lower(x).compile()
    assert cache.store("cb", compiled) is False
    assert os.listdir(tmp_path) == []


def test_on_cpu_an_executable_from_the_persistent_compilation_cache_is_not_stored(tmp_path):
    # XLA:CPU serializes such an executable without its compiled functions; loaded back it
    # fails with "Function ... not found". compile_lowered tells the two apart.
    suite_dir = jax.config.jax_compilation_cache_dir
    compat.enable_persistent_compilation_cache(str(tmp_path / "xla"))
    jax.config.update("jax_enable_compilation_cache", True)
    xla_cache.reset_cache()
    try:
        x = jax.ShapeDtypeStruct((64,), jnp.float32)
        fresh, hit = compat.compile_lowered(jax.jit(lambda v: jnp.tanh(v) / 3).lower(x))
        again, hit_again = compat.compile_lowered(jax.jit(lambda v: jnp.tanh(v) / 3).lower(x))
        # one function compiled twice in this process: the second time JAX hands out its
        # in-memory copy of what the persistent cache supplied, with no cache event
        same = lambda v: jnp.tanh(v) / 3  # noqa: E731 - a lambda: the HLO of the two above
        _, first_same = compat.compile_lowered(jax.jit(same).lower(x))
        _, repeat_same = compat.compile_lowered(jax.jit(same).lower(x))
    finally:
        jax.config.update("jax_compilation_cache_dir", suite_dir)
        jax.config.update("jax_enable_compilation_cache", False)
        xla_cache.reset_cache()
    assert (hit, hit_again) == (False, True)
    assert (first_same, repeat_same) == (True, True)
    cache = ExecutableCache(str(tmp_path / "exe"), {}, jax.devices()[0])
    assert cache.store("fresh", fresh, from_persistent_cache=hit)
    assert cache.store("again", again, from_persistent_cache=hit_again) is (
        jax.devices()[0].platform != "cpu")
    v = np.linspace(-2, 2, 64, dtype=np.float32)
    np.testing.assert_allclose(cache.load("fresh")(v), np.tanh(v) / 3, rtol=1e-6)


# -- off switch -----------------------------------------------------------------------------------

def test_nothing_is_written_when_the_compilation_cache_is_off(exe_dir, lowered):
    engine = make_engine("gemma2", **(SMALL | {"precompile": False, "compilation_cache_dir": None}))
    assert outputs(engine, REQUESTS[:2])
    assert not exe_dir.exists()
    assert engine.runner.executables.compiled == len(lowered) > 0
    assert engine.runner.executables.loaded == 0


def test_a_custom_compilation_cache_dir_keeps_executables_inside_it():
    assert compat.executable_cache_dir("/some/dir") == os.path.join("/some/dir", "executables")
    assert compat.executable_cache_dir() == os.path.join(compat.default_cache_dir(), "executables")
