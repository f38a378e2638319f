"""Official Gemma Flax/Orbax checkpoints (the `transformer/layer_N/...` layout) -> jaxpage params.

The layout stores einsum weights with heads first (q_einsum/w [H, d, Dh], kv_einsum/w
[2, Hkv, d, Dh] or qkv_einsum/w [3, H, d, Dh], attn_vec_einsum/w [H, Dh, d]), the gated MLP as
gating_einsum/w [2, F, d] or [2, d, F] and linear/w [F, d]; the embedding may carry padding rows
past the vocabulary. The config is not stored: it comes from --model or from matching shapes
against the registry.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from jaxpage.checkpoint import metadata_tree
from jaxpage.convert_common import ConversionError, ParamBuilder, is_float_dtype
from jaxpage.models.config import CONFIGS, GemmaConfig, get_config

PREFIX = "transformer/"
SKIP = (PREFIX + "vision_encoder/", PREFIX + "embedder/mm_")  # Gemma 3 vision parts
_LAYER = re.compile(r"^transformer/layer_(\d+)/(.+)$")
_NORMS = {"pre_attention_norm/scale": "pre_attn_norm/scale",
          "post_attention_norm/scale": "post_attn_norm/scale",
          "pre_ffw_norm/scale": "pre_ffw_norm/scale",
          "post_ffw_norm/scale": "post_ffw_norm/scale",
          "attn/_query_norm/scale": "attn/q_norm/scale",
          "attn/_key_norm/scale": "attn/k_norm/scale"}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts (whose keys may themselves hold '/') -> {'a/b/c': leaf}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, path + "/"))
        else:
            out[path] = value
    return out


def read_orbax(src: Path) -> dict[str, np.ndarray]:
    """Every array of the Orbax checkpoint at `src` as numpy, by '/'-joined path."""
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            tree = metadata_tree(ckptr.metadata(src.absolute()))
            restore_args = {k: ocp.RestoreArgs(restore_type=np.ndarray)
                            for k in flatten(tree)}
            restored = ckptr.restore(src.absolute(), args=ocp.args.PyTreeRestore(
                restore_args=_unflatten_like(tree, restore_args)))
    except Exception as e:  # noqa: BLE001 - Orbax raises many error types for unreadable dirs
        raise ConversionError(f"{src}: not a Hugging Face directory (no config.json) and not a "
                              f"readable Orbax checkpoint: {type(e).__name__}: {e}") from None
    return flatten(restored)


def _unflatten_like(tree: Mapping[str, Any], flat: dict[str, Any], prefix: str = "") -> dict:
    return {k: _unflatten_like(v, flat, f"{prefix}{k}/") if isinstance(v, Mapping)
            else flat[f"{prefix}{k}"] for k, v in tree.items()}


def _layer_params(weights: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    layers: dict[int, dict[str, Any]] = {}
    for path, value in weights.items():
        m = _LAYER.match(path)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    return layers


def infer_config(weights: Mapping[str, Any], src: Path) -> GemmaConfig:
    """The unique registry config whose shapes match the checkpoint, else a ConversionError."""
    layers = _layer_params(weights)
    emb = weights.get(PREFIX + "embedder/input_embedding")
    first = layers.get(0, {})
    try:
        vocab_rows, d = emb.shape
        if "attn/qkv_einsum/w" in first:
            _, h, _, hd = first["attn/qkv_einsum/w"].shape
            kvh = h
        else:
            h, _, hd = first["attn/q_einsum/w"].shape
            kvh = first["attn/kv_einsum/w"].shape[1]
        f = first["mlp/linear/w"].shape[0]
    except (AttributeError, KeyError, ValueError) as e:
        raise ConversionError(f"{src}: cannot read the model shape from the checkpoint ({e}); "
                              "is it an official Gemma checkpoint?") from None
    found = dict(num_layers=len(layers), d_model=d, num_heads=h, num_kv_heads=kvh, head_dim=hd,
                 ffw_hidden=f, use_qk_norm="attn/_query_norm/scale" in first)
    matches = [c for c in CONFIGS.values()
               if all(getattr(c, k) == v for k, v in found.items()) and c.vocab_size <= vocab_rows]
    if len(matches) != 1:
        what = ", ".join(f"{k}={v}" for k, v in found.items())
        which = ("no registered model" if not matches else
                 "several registered models (" + ", ".join(c.name for c in matches) + ")")
        raise ConversionError(f"{src}: shapes ({what}) match {which}; pass --model NAME")
    return matches[0]


def _gating(w: np.ndarray, c: GemmaConfig, where: str) -> np.ndarray:
    """gating_einsum/w [2, F, d] or [2, d, F] -> our [d, 2, F]."""
    d, f = c.d_model, c.ffw_hidden
    if d == f and w.shape == (2, d, d):
        raise ConversionError(f"{where}: gating_einsum/w is [2, {d}, {d}] and d_model == "
                              "ffw_hidden, so its orientation is ambiguous")
    if w.shape == (2, f, d):
        return w.transpose(2, 0, 1)
    if w.shape == (2, d, f):
        return w.transpose(1, 0, 2)
    raise ConversionError(f"{where} has shape {w.shape}, expected (2, {f}, {d}) or "
                          f"(2, {d}, {f}) for config {c.name!r}")


Pieces = list[tuple[str, int | None, np.ndarray]]  # (our param within the layer, part, value)


Rules = dict[str, tuple[tuple[int, ...], Callable[[np.ndarray], Pieces]]]


def _layer_rules(c: GemmaConfig) -> Rules:
    """Official name within a layer -> (its expected shape, the pieces of our params it holds)."""
    d, h, kvh, hd, f = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.ffw_hidden
    heads_last = lambda w: w.transpose(1, 0, 2)  # [N, d, Dh] -> [d, N, Dh]  # noqa: E731
    rules = {
        "attn/q_einsum/w": ((h, d, hd), lambda w: [("attn/q_proj", None, heads_last(w))]),
        "attn/kv_einsum/w": ((2, kvh, d, hd), lambda w: [
            ("attn/kv_proj", i, heads_last(w[i])) for i in range(2)]),
        "attn/attn_vec_einsum/w": ((h, hd, d), lambda w: [("attn/o_proj", None, w)]),
        "mlp/linear/w": ((f, d), lambda w: [("mlp/down", None, w)]),
    }
    if h == kvh:
        rules["attn/qkv_einsum/w"] = ((3, h, d, hd), lambda w: [
            ("attn/q_proj", None, heads_last(w[0]))] + [
            ("attn/kv_proj", i, heads_last(w[i + 1])) for i in range(2)])
    norms = dict(_NORMS) if c.use_qk_norm else {
        k: v for k, v in _NORMS.items() if not k.startswith("attn/")}
    for name, ours in norms.items():
        size = hd if name.startswith("attn/") else d
        rules[name] = ((size,), lambda w, ours=ours: [(ours, None, w)])
    return rules


def _pieces(path: str, w: np.ndarray, c: GemmaConfig, rules, where: str) -> Pieces:
    """Our (param path, part, value) pieces held by the official tensor `path`."""
    if path == PREFIX + "embedder/input_embedding":
        if w.ndim != 2 or w.shape[0] < c.vocab_size or w.shape[1] != c.d_model:
            raise ConversionError(f"{where} has shape {w.shape}, expected ({c.vocab_size} or "
                                  f"more, {c.d_model}) for config {c.name!r}")
        return [("embedder/embedding", None, w[:c.vocab_size])]  # rows past the vocab: padding
    if path == PREFIX + "final_norm/scale":
        _check_shape(w, (c.d_model,), where, c)
        return [("final_norm/scale", None, w)]
    m = _LAYER.match(path)
    if m is None or int(m.group(1)) >= c.num_layers or (
            m.group(2) not in rules and m.group(2) != "mlp/gating_einsum/w"):
        raise ConversionError(f"{where} is not part of config {c.name!r}")
    prefix, name = f"layers/{m.group(1)}/", m.group(2)
    if name == "mlp/gating_einsum/w":
        gating = _gating(w, c, where)
        return [(prefix + "mlp/gating", i, gating[:, i]) for i in range(2)]
    shape, rule = rules[name]
    _check_shape(w, shape, where, c)
    return [(prefix + t, part, v) for t, part, v in rule(w)]


def convert_official(src: Path, builder_for: Callable[[GemmaConfig], ParamBuilder], *,
                     model: str | GemmaConfig | None = None,
                     ) -> tuple[GemmaConfig, dict[str, np.ndarray]]:
    """Read the official checkpoint in `src`; returns its config and the converted params.

    `model` is a registry name or a GemmaConfig; None infers it from the shapes.
    """
    weights = read_orbax(src)
    if not any(k.startswith(PREFIX) for k in weights):  # params saved without the top level
        weights = {PREFIX + k: v for k, v in weights.items()}
    weights = {k: v for k, v in weights.items() if k.startswith(PREFIX) and not k.startswith(SKIP)}
    if not weights:
        raise ConversionError(f"{src}: the Orbax checkpoint has no {PREFIX}* params "
                              "(not an official Gemma checkpoint)")
    if isinstance(model, GemmaConfig):
        config = model
    elif model:
        try:
            config = get_config(model)
        except ValueError as e:
            raise ConversionError(f"--model: {e}") from None
    else:
        config = infer_config(weights, src)
    rules = _layer_rules(config)
    builder = builder_for(config)
    for path in tqdm(sorted(weights), desc="converting", unit="tensor", disable=None):
        w = weights.pop(path)  # free each source tensor once converted
        where = f"{src.name}: tensor {path}"
        if not is_float_dtype(w.dtype):
            raise ConversionError(f"{where} has non-float dtype {w.dtype}")
        for target, part, value in _pieces(path, w, config, rules, where):
            builder.put(target, value, part=part, source=where)
    missing = builder.missing()
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConversionError(f"{src}: no tensor gives our params {', '.join(missing[:5])}{more}")
    return config, builder.params


def _check_shape(w: np.ndarray, shape: tuple[int, ...], where: str, c: GemmaConfig) -> None:
    if tuple(w.shape) != shape:
        raise ConversionError(f"{where} has shape {tuple(w.shape)}, expected {shape} for "
                              f"config {c.name!r}")
