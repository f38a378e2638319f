"""`jaxpage convert`: accepted source layouts, and bad input giving a non-zero exit and a one-line
message that names the file and the tensor; a failed conversion leaves nothing at --dst."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from hf_models import copy_hf_dir, edit_config, hf_dir, save_orbax
from jaxpage import checkpoint as checkpoint_module
from jaxpage import convert as convert_module
from jaxpage.checkpoint import flatten_params, load_checkpoint
from jaxpage.convert import main as convert_main
from jaxpage.convert_common import ConversionError, ParamBuilder
from jaxpage.convert_hf import read_hf_config
from jaxpage.convert_official import convert_official
from jaxpage.models.config import get_config

REPO = Path(__file__).resolve().parents[1]
G2, G3 = "gemma2-tiny", "gemma3-tiny"


def run(capsys, src: Path, dst: Path, *extra: str) -> tuple[int, str]:
    """Run the converter's command line; (exit code, stderr)."""
    rc = convert_main(["--src", str(src), "--dst", str(dst), "--dtype", "float32", *extra])
    err = capsys.readouterr().err
    return rc, err


def assert_fails(capsys, src: Path, dst: Path, *needles: str, extra: tuple = ()) -> str:
    rc, err = run(capsys, src, dst, *extra)
    assert rc != 0
    lines = [line for line in err.splitlines() if line.startswith("jaxpage convert: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]
    return lines[0]


def params(path: Path) -> dict[str, np.ndarray]:
    _, model = load_checkpoint(path, dtype="float32")
    return {k: np.asarray(v) for k, v in
            flatten_params(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


def assert_same_params(a: Path, b: Path) -> None:
    pa, pb = params(a), params(b)
    assert set(pa) == set(pb)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def rewrite_tensors(path: Path, edit) -> None:
    """Load `path` (a .safetensors file), let edit(dict) change it, save it back."""
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Path]:
    """Plain conversions of the tiny HF models, to compare other layouts against."""
    out = {}
    for name in (G2, G3):
        dst = tmp_path_factory.mktemp("ref") / name
        assert convert_main(["--src", str(hf_dir(name)), "--dst", str(dst), "--dtype",
                             "float32"]) == 0
        out[name] = dst
    return out


# -- Hugging Face: accepted layouts ------------------------------------------------------------
def test_sharded_checkpoint_with_index_gives_the_same_params(reference, tmp_path, capsys):
    src = hf_dir(G3, sharded=True)
    assert len(list(src.glob("*.safetensors"))) > 5
    assert (src / "model.safetensors.index.json").exists()
    assert run(capsys, src, tmp_path / "out")[0] == 0
    assert_same_params(tmp_path / "out", reference[G3])


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_multimodal_checkpoint_prefixes_accepted_and_vision_weights_skipped(prefix, reference,
                                                                            tmp_path, capsys):
    src = copy_hf_dir(G3, tmp_path / "mm", tokenizer=False)
    text_config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({
        "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": text_config, "vision_config": {"model_type": "siglip_vision_model"},
        "eos_token_id": [1, 106]}))
    vision_root = "model." if prefix.startswith("model.") else ""

    def to_multimodal(t):
        for key in list(t):
            t[prefix + key.removeprefix("model.")] = t.pop(key)
        rng = np.random.default_rng(0)
        t[vision_root + "vision_tower.vision_model.embeddings.patch_embedding.weight"] = (
            rng.standard_normal((8, 3, 2, 2)).astype(np.float32))
        t[vision_root + "multi_modal_projector.mm_input_projection_weight"] = (
            rng.standard_normal((8, 64)).astype(np.float32))

    rewrite_tensors(src / "model.safetensors", to_multimodal)
    assert run(capsys, src, tmp_path / "out")[0] == 0
    assert_same_params(tmp_path / "out", reference[G3])
    config, _ = load_checkpoint(tmp_path / "out", dtype="float32")
    assert config.eos_ids == (1, 106)


def test_transformers_4_config_keys_give_the_same_config(tmp_path):
    new, _ = read_hf_config(hf_dir(G3))
    src = copy_hf_dir(G3, tmp_path / "old", tokenizer=False)
    edit_config(src, rope_parameters=None, layer_types=None, rope_theta=1e6,
                rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
                sliding_window_pattern=6)
    old, tied = read_hf_config(src)
    assert tied and dataclasses.replace(old, name=new.name) == new
    assert new.rope_global_scale == 8.0 and new.rope_local_scale == 1.0

    g2_new, _ = read_hf_config(hf_dir(G2))
    src2 = copy_hf_dir(G2, tmp_path / "old2", tokenizer=False)
    edit_config(src2, rope_parameters=None, layer_types=None, rope_theta=10_000.0)
    assert dataclasses.replace(read_hf_config(src2)[0], name=g2_new.name) == g2_new
    edit_config(src2, rope_scaling={"type": "linear", "factor": 2.0})  # Gemma 2: every layer
    scaled = read_hf_config(src2)[0]
    assert (scaled.rope_local_scale, scaled.rope_global_scale) == (2.0, 2.0)


def test_config_json_keys_left_out_take_transformers_defaults(tmp_path):
    src = copy_hf_dir(G3, tmp_path / "sparse", tokenizer=False)
    edit_config(src, query_pre_attn_scalar=None, rms_norm_eps=None, rope_parameters=None)
    config, _ = read_hf_config(src)
    assert config.query_pre_attn_scalar == 256 and config.rms_norm_eps == 1e-6
    assert (config.rope_global_base, config.rope_global_scale) == (1e6, 1.0)
    assert (config.rope_local_base, config.rope_local_scale) == (1e4, 1.0)


def test_model_flag_names_the_config_and_must_match_a_registered_architecture(tmp_path, capsys):
    assert read_hf_config(hf_dir(G3), "my-model")[0].name == "my-model"
    assert read_hf_config(hf_dir(G3), G3)[0] == get_config(G3)
    assert_fails(capsys, hf_dir(G3), tmp_path / "out", "does not describe --model gemma2-tiny",
                 "num_layers=7 (registry: 4)", extra=("--model", G2))


def test_lm_head_is_ignored_when_tied_and_must_equal_the_embedding_when_untied(tmp_path, capsys):
    src = copy_hf_dir(G2, tmp_path / "head", tokenizer=False)
    edit_config(src, tie_word_embeddings=False)
    rewrite_tensors(src / "model.safetensors", lambda t: t.update(
        {"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    assert run(capsys, src, tmp_path / "ok")[0] == 0
    rewrite_tensors(src / "model.safetensors", lambda t: t.update(
        {"lm_head.weight": t["lm_head.weight"] + 1}))
    assert_fails(capsys, src, tmp_path / "bad", "model.safetensors: tensor lm_head.weight differs")
    edit_config(src, tie_word_embeddings=True)
    assert run(capsys, src, tmp_path / "tied")[0] == 0


# -- Hugging Face: bad input -------------------------------------------------------------------
def test_missing_config_json_and_no_orbax_checkpoint(tmp_path, capsys):
    src = copy_hf_dir(G2, tmp_path / "noconfig", tokenizer=False)
    (src / "config.json").unlink()
    assert_fails(capsys, src, tmp_path / "out", str(src), "no config.json",
                 "not a readable Orbax checkpoint")
    assert_fails(capsys, tmp_path / "nowhere", tmp_path / "out", "nowhere is not a directory")


def test_unknown_model_type(tmp_path, capsys):
    src = copy_hf_dir(G2, tmp_path / "llama", tokenizer=False)
    edit_config(src, model_type="llama")
    assert_fails(capsys, src, tmp_path / "out", "llama/config.json", "unknown model_type 'llama'")


def test_missing_tensor_is_named(tmp_path, capsys):
    src = copy_hf_dir(G2, tmp_path / "missing", tokenizer=False)
    rewrite_tensors(src / "model.safetensors", lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    assert_fails(capsys, src, tmp_path / "out", "missing tensors model.layers.2.mlp.up_proj.weight",
                 "model.safetensors")


def test_wrong_shaped_tensor_names_file_tensor_and_shapes(tmp_path, capsys):
    src = copy_hf_dir(G2, tmp_path / "shape", tokenizer=False)
    rewrite_tensors(src / "model.safetensors", lambda t: t.update({
        "model.layers.1.self_attn.k_proj.weight": np.zeros((32, 64), np.float32)}))
    assert_fails(capsys, src, tmp_path / "out", "model.safetensors: tensor "
                 "model.layers.1.self_attn.k_proj.weight has shape (32, 64), expected (64, 64)")


def test_integer_tensor_is_rejected(tmp_path, capsys):
    src = copy_hf_dir(G2, tmp_path / "int", tokenizer=False)
    rewrite_tensors(src / "model.safetensors", lambda t: t.update({
        "model.norm.weight": np.arange(64, dtype=np.int32)}))
    assert_fails(capsys, src, tmp_path / "out",
                 "model.safetensors: tensor model.norm.weight has non-float dtype I32")


def test_unexpected_tensor_is_named_with_its_file(tmp_path, capsys):
    src = copy_hf_dir(G2, tmp_path / "extra", tokenizer=False)
    rewrite_tensors(src / "model.safetensors", lambda t: t.update({
        "model.layers.9.mlp.up_proj.weight": np.zeros((96, 64), np.float32)}))
    assert_fails(capsys, src, tmp_path / "out",
                 "unexpected tensors: model.safetensors: model.layers.9.mlp.up_proj.weight")


@pytest.mark.parametrize("rope", [
    {"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 8.0},
                         "sliding_attention": {"rope_type": "default"}}},
    {"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
])
def test_unsupported_rope_scaling_is_named(rope, tmp_path, capsys):
    src = copy_hf_dir(G3, tmp_path / "rope", tokenizer=False)
    edit_config(src, **rope)
    kind = "yarn" if "rope_parameters" in rope and rope["rope_parameters"] else "dynamic"
    assert_fails(capsys, src, tmp_path / "out", "rope/config.json",
                 f"unsupported rope scaling type '{kind}' for full_attention layers")


def test_index_listing_a_missing_shard(tmp_path, capsys):
    src = copy_hf_dir(G3, tmp_path / "shards", sharded=True, tokenizer=False)
    victim = sorted(src.glob("*.safetensors"))[3]
    victim.unlink()
    assert_fails(capsys, src, tmp_path / "out", "model.safetensors.index.json",
                 f"lists {victim.name}, which does not exist")


# -- all or nothing at --dst -------------------------------------------------------------------
def test_failure_while_reading_the_last_shard_leaves_no_dst(tmp_path, capsys):
    src = copy_hf_dir(G3, tmp_path / "nan", sharded=True, tokenizer=False)
    last = sorted(src.glob("*.safetensors"))[-1]
    key = next(iter(load_file(last)))
    rewrite_tensors(last, lambda t: t[key].__setitem__((0,) * t[key].ndim, np.nan))
    assert_fails(capsys, src, tmp_path / "out", f"{last.name}: {key}", "NaN",
                 extra=("--check-finite",))


def test_failure_after_params_were_written_leaves_no_dst(tmp_path, capsys, monkeypatch):
    def copy_fails(*args, **kwargs):  # the tokenizer copy comes after the params are saved
        raise OSError("disk full")

    src = hf_dir(G2)
    monkeypatch.setattr(checkpoint_module, "shutil", types.SimpleNamespace(copyfile=copy_fails))
    assert_fails(capsys, src, tmp_path / "out", "disk full")


def test_existing_dst_is_refused_kept_on_failure_and_replaced_on_success(tmp_path, capsys,
                                                                          reference):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    rc, err = run(capsys, hf_dir(G2), dst)
    assert rc == 1 and "already exists (pass --overwrite" in err
    bad = copy_hf_dir(G2, tmp_path / "bad", tokenizer=False)
    edit_config(bad, model_type="gpt2")
    rc, err = run(capsys, bad, dst, "--overwrite")
    assert rc == 1 and (dst / "keep.txt").read_text() == "old"
    assert run(capsys, hf_dir(G2), dst, "--overwrite")[0] == 0
    assert not (dst / "keep.txt").exists()
    assert_same_params(dst, reference[G2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "out"]


# -- official Orbax layout ---------------------------------------------------------------------
def random_official(c, *, qkv: bool = False, gating_f_first: bool = True, seed: int = 0) -> dict:
    """Random weights of config `c` in the official layout (flat module keys)."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    d, h, kvh, hd, f = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.ffw_hidden
    tree = {"transformer/embedder": {"input_embedding": r(c.vocab_size, d)},
            "transformer/final_norm": {"scale": r(d)}}
    for i in range(c.num_layers):
        layer = {"attn/attn_vec_einsum": r(h, hd, d), "mlp/linear": r(f, d),
                 "mlp/gating_einsum": r(2, f, d) if gating_f_first else r(2, d, f)}
        if qkv:
            layer["attn/qkv_einsum"] = r(3, h, d, hd)
        else:
            layer["attn/q_einsum"], layer["attn/kv_einsum"] = r(h, d, hd), r(2, kvh, d, hd)
        for name, size in [("pre_attention_norm", d), ("post_attention_norm", d),
                           ("pre_ffw_norm", d), ("post_ffw_norm", d)] + (
                [("attn/_query_norm", hd), ("attn/_key_norm", hd)] if c.use_qk_norm else []):
            layer[name] = r(size)
        for name, w in layer.items():
            tree[f"transformer/layer_{i}/{name}"] = {"scale" if "norm" in name else "w": w}
    return tree


def convert_raw(tree: dict, path: Path, config):
    save_orbax(tree, path)
    return convert_official(path, lambda c: ParamBuilder(c, "float32"), model=config)


def test_official_qkv_einsum_gives_the_same_params_as_q_and_kv_einsum(tmp_path):
    config = dataclasses.replace(get_config(G2), name="mha-tiny", num_kv_heads=4)
    qkv_tree = random_official(config, qkv=True)
    split_tree = {k: v for k, v in qkv_tree.items() if "qkv_einsum" not in k}
    for i in range(config.num_layers):
        w = qkv_tree[f"transformer/layer_{i}/attn/qkv_einsum"]["w"]
        split_tree[f"transformer/layer_{i}/attn/q_einsum"] = {"w": w[0]}
        split_tree[f"transformer/layer_{i}/attn/kv_einsum"] = {"w": w[1:]}
    _, a = convert_raw(qkv_tree, tmp_path / "qkv", config)
    _, b = convert_raw(split_tree, tmp_path / "split", config)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    q_einsum = qkv_tree["transformer/layer_1/attn/qkv_einsum"]["w"][0]
    np.testing.assert_array_equal(a["layers/1/attn/q_proj"][5, 2], q_einsum[2, 5])  # [d,h] vs [h,d]


def test_official_gating_orientations_agree_and_d_equal_f_is_ambiguous(tmp_path):
    config = get_config(G2)
    f_first = random_official(config, gating_f_first=True)
    d_first = {k: ({"w": v["w"].transpose(0, 2, 1)} if k.endswith("gating_einsum") else v)
               for k, v in f_first.items()}
    _, a = convert_raw(f_first, tmp_path / "f", config)
    _, b = convert_raw(d_first, tmp_path / "d", config)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    square = dataclasses.replace(config, name="square", ffw_hidden=config.d_model)
    with pytest.raises(ConversionError, match="tensor transformer/layer_0/mlp/gating_einsum/w: "
                                              "gating_einsum/w is .2, 64, 64. and d_model == "
                                              "ffw_hidden, so its orientation is ambiguous"):
        convert_raw(random_official(square), tmp_path / "sq", square)


def test_official_params_without_the_transformer_level_and_vision_parts(tmp_path):
    config = get_config(G3)
    tree = random_official(config)
    _, want = convert_raw(tree, tmp_path / "plain", config)
    bare = {k.removeprefix("transformer/"): v for k, v in tree.items()}
    bare["embedder/mm_input_projection"] = {"w": np.ones((8, 64), np.float32)}
    bare["vision_encoder/siglip/block_0"] = {"w": np.ones((4, 4), np.float32)}
    _, got = convert_raw(bare, tmp_path / "bare", None)  # config inferred: gemma3-tiny
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_official_config_inference_needs_a_unique_match(tmp_path, capsys):
    odd = dataclasses.replace(get_config(G2), name="odd", d_model=48)
    src = save_orbax(random_official(odd), tmp_path / "odd")
    assert_fails(capsys, src, tmp_path / "out", "match no registered model; pass --model NAME",
                 "d_model=48")
    assert_fails(capsys, src, tmp_path / "out", "transformer/embedder/input_embedding has shape "
                 "(512, 48), expected (512 or more, 64) for config 'gemma2-tiny'",
                 extra=("--model", G2))


def test_official_bad_tensors_are_named(tmp_path, capsys):
    tree = random_official(get_config(G2))
    tree["transformer/layer_1/attn/kv_einsum"]["w"] = np.zeros((2, 2, 64, 16), np.float32)
    src = save_orbax(tree, tmp_path / "shape")
    assert_fails(capsys, src, tmp_path / "out", "tensor transformer/layer_1/attn/kv_einsum/w has "
                 "shape (2, 2, 64, 16), expected (2, 2, 64, 32)", extra=("--model", G2))
    tree = random_official(get_config(G2))
    tree["transformer/final_norm"]["scale"] = np.arange(64, dtype=np.int32)
    src = save_orbax(tree, tmp_path / "int")
    assert_fails(capsys, src, tmp_path / "out",
                 "int: tensor transformer/final_norm/scale has non-float dtype int32")
    tree = random_official(get_config(G2))
    del tree["transformer/layer_3/post_ffw_norm"]
    src = save_orbax(tree, tmp_path / "missing")
    assert_fails(capsys, src, tmp_path / "out", "no tensor gives our params "
                 "layers/3/post_ffw_norm/scale", extra=("--model", G2))


# -- entry points ------------------------------------------------------------------------------
def test_script_converts_and_the_cli_exits_nonzero_with_one_line(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    ok = subprocess.run([sys.executable, str(REPO / "scripts" / "convert.py"), "--src",
                         str(hf_dir(G2)), "--dst", str(tmp_path / "out")],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "jaxpage_config.json").exists()
    assert load_checkpoint(tmp_path / "out")[0].name == f"hf:{G2}"
    bad = subprocess.run([sys.executable, "-m", "jaxpage.cli", "convert", "--src",
                          str(tmp_path / "none"), "--dst", str(tmp_path / "out2")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        f"jaxpage convert: error: --src {tmp_path / 'none'} is not a directory"]


def test_convert_module_is_wired_for_the_cli():
    assert callable(convert_module.add_arguments) and callable(convert_module.run)
