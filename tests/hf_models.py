"""Tiny Hugging Face Gemma 2 / Gemma 3 models with every weight random, saved like real ones.

Built from our registry configs gemma2-tiny / gemma3-tiny (N*H != d, GQA, window 8, query scale
!= head_dim, soft-caps 5/3 on Gemma 2, linear RoPE x8 on Gemma 3 global layers). Models and
their saved directories are cached per process, so every test module shares one build.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import Gemma2ForCausalLM, Gemma3ForCausalLM

from jaxpage.convert_hf import to_hf_config
from jaxpage.models.config import GemmaConfig, get_config

_ROOT = Path(tempfile.mkdtemp(prefix="jaxpage-hf-models-"))
atexit.register(shutil.rmtree, _ROOT, True)


def hf_config(c: GemmaConfig):
    """The transformers config of the same architecture as `c`, on eager attention."""
    cfg = to_hf_config(c)
    cfg._attn_implementation = "eager"
    return cfg


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every weight random, norms included (transformers initialises those to zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # RMSNorm scales, used as (1 + w)
                std = 0.3
            elif "embed_tokens" in name:  # logits ~ 2 before the cap: soft-capped, not saturated
                std = 0.15
            else:  # Linear [out, in]; q/k a bit larger so the attention soft-cap matters
                std = (2.0 if ("q_proj" in name or "k_proj" in name) else 1.0) / p.shape[1] ** 0.5
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)


@functools.cache
def hf_model(name: str, seed: int = 0) -> torch.nn.Module:
    """The random fp32 HF model for registry config `name` ("gemma2-tiny" or "gemma3-tiny")."""
    c = get_config(name)
    cls = Gemma2ForCausalLM if c.family == "gemma2" else Gemma3ForCausalLM
    torch.manual_seed(seed)
    model = cls(hf_config(c)).eval()
    randomize_(model, seed)
    return model


@functools.cache
def tokenizer_model() -> Path:
    """A small trained SentencePiece model (stands in for Gemma's tokenizer.model)."""
    import sentencepiece as spm  # noqa: PLC0415

    out = _ROOT / "spm"
    out.mkdir()
    words = ["paged", "attention", "gemma", "cache", "token", "serve", "window", "layer"]
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=8)) for _ in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(out / "m"),
                                   vocab_size=40, model_type="bpe", minloglevel=2)
    return out / "m.model"


@functools.cache
def hf_dir(name: str, *, sharded: bool = False, tokenizer: bool = True) -> Path:
    """`save_pretrained` directory of hf_model(name): one file, or many small shards + index."""
    out = _ROOT / f"{name}{'-sharded' if sharded else ''}{'' if tokenizer else '-notok'}"
    hf_model(name).save_pretrained(out, max_shard_size="40KB" if sharded else "1GB")
    if tokenizer:
        shutil.copyfile(tokenizer_model(), out / "tokenizer.model")
    return out


def copy_hf_dir(name: str, dst: Path, **kw) -> Path:
    """A private, editable copy of hf_dir(name, **kw) at `dst`."""
    shutil.copytree(hf_dir(name, **kw), dst)
    return dst


def edit_config(path: Path, **changes) -> None:
    """Rewrite keys of `path`/config.json (a value of None deletes the key)."""
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    cfg_file.write_text(json.dumps(cfg))


def official_layout(model: torch.nn.Module, c: GemmaConfig, *, gating_f_first: bool,
                    pad_rows: int = 0, flat_keys: bool = True, seed: int = 0) -> dict:
    """The HF model's weights in the official Gemma Flax layout (numpy, fp32).

    flat_keys: 'transformer/layer_0/attn/q_einsum' -> {'w': ...} as in released checkpoints;
    else fully nested dicts. pad_rows random rows are appended to the embedding.
    """
    d, h, kvh, hd = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    emb = sd["model.embed_tokens.weight"]
    pad = np.random.default_rng(seed).standard_normal((pad_rows, d)).astype(np.float32)
    flat = {"embedder/input_embedding": np.concatenate([emb, pad]),
            "final_norm/scale": sd["model.norm.weight"]}
    for i in range(c.num_layers):
        w = lambda k: sd[f"model.layers.{i}.{k}.weight"]  # noqa: E731, B023
        # [n*Dh, d] -> [n, d, Dh]
        heads = lambda x, n: x.reshape(n, hd, d).transpose(0, 2, 1)  # noqa: E731
        gate, up = w("mlp.gate_proj"), w("mlp.up_proj")  # [F, d]
        layer = {
            "attn/q_einsum/w": heads(w("self_attn.q_proj"), h),
            "attn/kv_einsum/w": np.stack([heads(w("self_attn.k_proj"), kvh),
                                          heads(w("self_attn.v_proj"), kvh)]),
            "attn/attn_vec_einsum/w": w("self_attn.o_proj").reshape(d, h, hd).transpose(1, 2, 0),
            "mlp/gating_einsum/w": (np.stack([gate, up]) if gating_f_first
                                    else np.stack([gate.T, up.T])),
            "mlp/linear/w": w("mlp.down_proj").T,
            "pre_attention_norm/scale": w("input_layernorm"),
            "post_attention_norm/scale": w("post_attention_layernorm"),
            "pre_ffw_norm/scale": w("pre_feedforward_layernorm"),
            "post_ffw_norm/scale": w("post_feedforward_layernorm"),
        }
        if c.use_qk_norm:
            layer["attn/_query_norm/scale"] = w("self_attn.q_norm")
            layer["attn/_key_norm/scale"] = w("self_attn.k_norm")
        flat.update({f"layer_{i}/{k}": np.ascontiguousarray(v) for k, v in layer.items()})
    if flat_keys:  # {'transformer/layer_0/attn/q_einsum': {'w': array}}
        out: dict = {}
        for path, v in flat.items():
            module, leaf = path.rsplit("/", 1)
            out.setdefault(f"transformer/{module}", {})[leaf] = v
        return out
    nested: dict = {}
    for path, v in flat.items():
        node = nested.setdefault("transformer", {})
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return nested


def save_orbax(tree: dict, path: Path) -> Path:
    """Save a raw param tree with Orbax's PyTreeCheckpointer, as official checkpoints are."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(path.absolute(), tree)
    return path
