"""The built-in demo checkpoint: made once, deterministic, safe under concurrent first use."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from flax import nnx

import jaxpage.demo as demo
from jaxpage.checkpoint import CONFIG_FILE, TOKENIZER_FILE, flatten_params, load_checkpoint
from jaxpage.models.config import get_config
from jaxpage.tokenizer import Tokenizer

# A creator process: imports first, waits for the start signal, then builds and holds the
# finished build for a moment before renaming it, so two creators surely overlap.
CREATOR = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import jaxpage.demo as demo
    import jaxpage.checkpoint, jaxpage.models.gemma, jax.numpy
    build = demo._build_demo_checkpoint
    def slow_build(dst):
        out = build(dst)
        print("built", flush=True)
        time.sleep(1.0)
        return out
    demo._build_demo_checkpoint = slow_build
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.01)
    print(demo.demo_checkpoint_dir(sys.argv[1]), flush=True)
""")


@pytest.fixture(scope="module")
def raced(tmp_path_factory):
    """Cache dir where two processes created the demo at the same time, and their outputs."""
    root = tmp_path_factory.mktemp("cache")
    go = tmp_path_factory.mktemp("signal") / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CREATOR, str(root), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    return root, [out.split() for out, _ in results]


def test_concurrent_creators_both_get_the_same_complete_checkpoint(raced):
    root, outputs = raced
    assert all(out[0] == "built" for out in outputs)  # both really built: the race happened
    paths = {out[-1] for out in outputs}
    assert len(paths) == 1
    path = paths.pop()
    assert os.path.dirname(path) == str(root)
    assert os.listdir(root) == [os.path.basename(path)]  # the loser's build was cleaned up
    config, model = load_checkpoint(path, dtype="float32")
    assert config == get_config(demo.DEMO_MODEL)
    assert model.embedder.embedding.shape == (1024, config.d_model)


def test_an_existing_demo_is_reused_not_rebuilt(raced, monkeypatch):
    root, outputs = raced

    def no_build(dst):
        raise AssertionError("the demo was built again")

    monkeypatch.setattr(demo, "_build_demo_checkpoint", no_build)
    monkeypatch.setenv("JAXPAGE_CACHE", str(root))
    assert str(demo.demo_checkpoint_dir()) == outputs[0][-1]


def test_demo_tokenizer_has_gemma_special_ids_and_the_model_vocab(raced):
    _, outputs = raced
    tok = Tokenizer(os.path.join(outputs[0][-1], TOKENIZER_FILE))
    assert tok.vocab_size == get_config(demo.DEMO_MODEL).vocab_size == 1024
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.id_to_piece(tok.start_of_turn_id) == "<start_of_turn>"
    assert tok.id_to_piece(tok.end_of_turn_id) == "<end_of_turn>"
    text = "Any text at all: naïve 😀 日本 \u0007"
    assert tok.decode(tok.encode(text)) == text  # byte fallback: nothing is <unk>


def test_a_second_build_has_identical_tokenizer_config_and_weights(raced, tmp_path):
    _, outputs = raced
    first = outputs[0][-1]
    second = demo.demo_checkpoint_dir(tmp_path)
    for name in (TOKENIZER_FILE, CONFIG_FILE):
        with open(os.path.join(first, name), "rb") as a, open(second / name, "rb") as b:
            assert a.read() == b.read(), name
    params = [_params(load_checkpoint(p, dtype="float32")[1]) for p in (first, second)]
    assert params[0].keys() == params[1].keys()
    for path in params[0]:
        np.testing.assert_array_equal(params[0][path], params[1][path], err_msg=path)
    assert np.std(params[0]["embedder/embedding"]) > 0.5 * demo.EMBEDDING_GAIN  # random, not zeros


def test_leftovers_of_dead_builds_are_removed_but_fresh_ones_kept(raced, tmp_path, monkeypatch):
    _, outputs = raced
    dead, live = tmp_path / ".demo-x.tmp-dead", tmp_path / ".demo-x.tmp-live"
    for d in (dead, live):
        (d / "checkpoint").mkdir(parents=True)
    old = time.time() - demo.STALE_BUILD_S - 60
    os.utime(dead, (old, old))
    monkeypatch.setattr(demo, "_build_demo_checkpoint", lambda dst: shutil.copytree(
        outputs[0][-1], dst))
    demo.demo_checkpoint_dir(tmp_path)
    assert not dead.exists() and live.exists()


def test_cache_location_follows_jaxpage_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXPAGE_CACHE", str(tmp_path))
    assert demo.cache_root() == tmp_path
    monkeypatch.delenv("JAXPAGE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert demo.cache_root() == tmp_path / ".cache" / "jaxpage"


def _params(model) -> dict:
    return flatten_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
