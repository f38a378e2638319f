"""jaxpage checkpoints: save/load round trips, dtype casts, placement, and clear errors."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpage.checkpoint import (CONFIG_FILE, TOKENIZER_FILE, CheckpointError, flatten_params,
                                load_checkpoint, param_shapes, read_config, save_checkpoint)
from jaxpage.models.config import get_config
from jaxpage.models.gemma import Gemma

CONFIG = get_config("gemma3-tiny")


def params_of(model: Gemma) -> dict[str, np.ndarray]:
    return {p: np.asarray(v) for p, v in
            flatten_params(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


@pytest.fixture(scope="module")
def model() -> Gemma:
    return Gemma(CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(7))


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return save_checkpoint(model, CONFIG, tmp_path_factory.mktemp("ckpt") / "tiny")


def edited_copy(saved, tmp_path, edit) -> str:
    """A copy of the saved checkpoint whose jaxpage_config.json went through `edit(dict)`."""
    dst = tmp_path / "edited"
    shutil.copytree(saved, dst)
    meta = json.loads((dst / CONFIG_FILE).read_text())
    edit(meta)
    (dst / CONFIG_FILE).write_text(json.dumps(meta))
    return dst


def test_round_trip_restores_every_param_exactly_and_the_config(model, saved):
    config, loaded = load_checkpoint(saved, dtype="float32")
    assert config == CONFIG and read_config(saved) == CONFIG
    want, got = params_of(model), params_of(loaded)
    assert set(got) == set(want) == set(param_shapes(CONFIG))
    for path in want:
        assert got[path].dtype == np.float32, path
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)
    meta = json.loads((saved / CONFIG_FILE).read_text())
    assert meta["format_version"] == 1 and meta["param_dtype"] == "float32"


def test_load_casts_params_to_the_requested_dtype(model, saved, tmp_path):
    _, as_bf16 = load_checkpoint(saved, dtype=jnp.bfloat16)
    for path, value in params_of(model).items():
        got = params_of(as_bf16)[path]
        assert got.dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(got, value.astype(jnp.bfloat16), err_msg=path)
    # and back up: a bf16 checkpoint loads as float32 holding the same (bf16-exact) values
    bf16_dir = save_checkpoint(as_bf16, CONFIG, tmp_path / "bf16")
    assert json.loads((bf16_dir / CONFIG_FILE).read_text())["param_dtype"] == "bfloat16"
    _, as_f32 = load_checkpoint(bf16_dir, dtype="float32")
    for path, value in params_of(as_bf16).items():
        np.testing.assert_array_equal(params_of(as_f32)[path], value.astype(np.float32))


def test_save_accepts_a_model_its_state_a_nested_dict_or_a_flat_dict(model, tmp_path):
    state = nnx.state(model, nnx.Param)
    want = params_of(model)
    for i, source in enumerate([state, nnx.to_pure_dict(state), want]):
        _, loaded = load_checkpoint(save_checkpoint(source, CONFIG, tmp_path / str(i)),
                                    dtype="float32")
        for path, value in params_of(loaded).items():
            np.testing.assert_array_equal(value, want[path], err_msg=path)


def test_params_restore_onto_one_sharding_or_a_per_param_callable(saved):
    device = jax.devices()[0]
    mesh = jax.sharding.Mesh(np.array([device]), ("model",))
    named = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    _, model = load_checkpoint(saved, dtype="float32", sharding=named)
    for path, leaf in flatten_params(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items():
        assert leaf.sharding == named, path

    asked = []
    sharded_rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model"))
    single = jax.sharding.SingleDeviceSharding(device)

    def place(path: str) -> jax.sharding.Sharding:
        asked.append(path)
        return sharded_rows if path == "embedder/embedding" else single

    _, model = load_checkpoint(saved, dtype="float32", sharding=place)
    assert sorted(asked) == sorted(param_shapes(CONFIG))
    leaves = flatten_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert leaves["embedder/embedding"].sharding == sharded_rows
    assert leaves["layers/5/attn/q_proj"].sharding == single


def test_sharding_callable_must_return_a_sharding(saved):
    with pytest.raises(TypeError, match="sharding\\('embedder/embedding'\\) returned str"):
        load_checkpoint(saved, sharding=lambda path: "cpu:0")


def test_tokenizer_model_is_copied_byte_for_byte(model, tmp_path):
    tok = tmp_path / "spm.model"
    tok.write_bytes(bytes(range(256)) * 3)
    dst = save_checkpoint(model, CONFIG, tmp_path / "with_tok", tokenizer_path=tok)
    assert (dst / TOKENIZER_FILE).read_bytes() == tok.read_bytes()
    with pytest.raises(CheckpointError, match="tokenizer file .*nope.model does not exist"):
        save_checkpoint(model, CONFIG, tmp_path / "bad_tok", tokenizer_path=tmp_path / "nope.model")


def test_save_refuses_params_that_do_not_fit_the_config_or_an_existing_checkpoint(model, saved,
                                                                                  tmp_path):
    params = params_of(model)
    params["layers/2/mlp/down"] = params["layers/2/mlp/down"][:-1]
    with pytest.raises(CheckpointError, match=r"layers/2/mlp/down has shape \(95, 64\) but config "
                                              r"'gemma3-tiny' expects \(96, 64\)"):
        save_checkpoint(params, CONFIG, tmp_path / "bad")
    del params["layers/2/mlp/down"]
    with pytest.raises(CheckpointError, match="missing params .*layers/2/mlp/down"):
        save_checkpoint(params, CONFIG, tmp_path / "bad")
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        save_checkpoint(model, CONFIG, saved)


def test_load_errors_name_what_is_wrong(saved, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory .*nowhere does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty/jaxpage_config.json is missing"):
        load_checkpoint(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    (broken / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="jaxpage_config.json: invalid JSON"):
        read_config(broken)
    with pytest.raises(ValueError, match="dtype must be one of bfloat16, float32, got 'fp8'"):
        load_checkpoint(saved, dtype="fp8")


def test_unknown_config_fields_and_versions_are_rejected(saved, tmp_path):
    extra = edited_copy(saved, tmp_path, lambda m: m["config"].update(num_experts=8))
    with pytest.raises(CheckpointError, match="bad config: unknown GemmaConfig fields: num_exp"):
        load_checkpoint(extra)
    shutil.rmtree(extra)
    future = edited_copy(saved, tmp_path, lambda m: m.update(format_version=99))
    with pytest.raises(CheckpointError, match="format_version 99 is not supported"):
        read_config(future)


def test_params_that_do_not_match_the_config_name_the_param_and_both_shapes(saved, tmp_path):
    wider = edited_copy(saved, tmp_path, lambda m: m["config"].update(ffw_hidden=100))
    with pytest.raises(CheckpointError, match=r"param layers/0/mlp/down has shape \(96, 64\) but "
                                              r"config 'gemma3-tiny' expects \(100, 64\)"):
        load_checkpoint(wider)
    shutil.rmtree(wider)
    deeper = edited_copy(saved, tmp_path, lambda m: m["config"].update(
        num_layers=8, layer_types=m["config"]["layer_types"] + ["local"]))
    with pytest.raises(CheckpointError, match="missing params .*layers/7/"):
        load_checkpoint(deeper)
