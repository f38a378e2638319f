"""Hugging Face Gemma 2 / Gemma 3 checkpoints (config.json + *.safetensors) -> jaxpage params.

Tensors are read one at a time from the safetensors files, so converting needs about one copy of
the model in memory (the converted params), not two.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from jaxpage.convert_common import ConversionError, ParamBuilder
from jaxpage.models.config import CONFIGS, GLOBAL, LOCAL, GemmaConfig

INDEX_FILE = "model.safetensors.index.json"
# Text-decoder key prefixes, most specific first (Gemma3ForConditionalGeneration in transformers
# 4.x saves "language_model.model.", in 5.x "model.language_model.").
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
SKIP_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                 "model.multi_modal_projector.")
LM_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")
FLOAT_SAFETENSORS_DTYPES = ("F16", "BF16", "F32", "F64")

# transformers' defaults for keys a config.json may leave out (Gemma2Config, Gemma3TextConfig).
_DEFAULTS = {
    "gemma2": dict(vocab_size=256_000, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6,
                   query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3": dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, max_position_embeddings=131_072, rms_norm_eps=1e-6,
                   query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=None,
                   attn_logit_softcapping=None),
}
_HF_LAYER_TYPES = {"sliding_attention": LOCAL, "full_attention": GLOBAL}
_OK_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")
_NONE_OK = ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window")  # None = off


# -- config ----------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConversionError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


def _linear_factor(params: dict | None, layers: str, where: Path) -> float:
    """Scale of a rope_parameters / rope_scaling dict: 1 for default RoPE, the factor if linear."""
    if not params:
        return 1.0
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return 1.0
    if kind != "linear":
        raise ConversionError(f"{where}: unsupported rope scaling type {kind!r} for {layers} "
                              "layers (only 'linear' is supported)")
    if "factor" not in params:
        raise ConversionError(f"{where}: linear rope scaling for {layers} layers has no factor")
    return float(params["factor"])


def _rope(text: dict, family: str, where: Path) -> dict[str, tuple[float, float]]:
    """(base, linear scale) per layer type from rope_parameters (5.x) or rope_theta & co (4.x)."""
    params = text.get("rope_parameters")
    local_default = 10_000.0 if family == "gemma3" else text.get("rope_theta", 10_000.0)
    global_default = text.get("rope_theta", 1e6 if family == "gemma3" else 10_000.0)
    if isinstance(params, dict) and params and set(params) <= set(_HF_LAYER_TYPES):
        full = params.get("full_attention") or {}  # keyed by layer type (Gemma 3 in 5.x)
        local = params.get("sliding_attention") or {}
        return {
            GLOBAL: (float(full.get("rope_theta", global_default)),
                     _linear_factor(full, "full_attention", where)),
            LOCAL: (float(local.get("rope_theta", text.get("rope_local_base_freq", local_default))),
                    _linear_factor(local, "sliding_attention", where)),
        }
    if family == "gemma2":  # one RoPE for every layer
        flat = params if isinstance(params, dict) else {}
        scaling = flat if ("rope_type" in flat or "type" in flat) else text.get("rope_scaling")
        base = float(flat.get("rope_theta", global_default))
        scale = _linear_factor(scaling, "all", where)
        return {LOCAL: (base, scale), GLOBAL: (base, scale)}
    if isinstance(params, dict) and params:
        raise ConversionError(f"{where}: gemma3 rope_parameters must be keyed by layer type "
                              f"(full_attention, sliding_attention), got {sorted(params)}")
    return {  # transformers 4.x: rope_scaling applies to the global (full attention) layers only
        GLOBAL: (float(global_default),
                 _linear_factor(text.get("rope_scaling"), "full_attention", where)),
        LOCAL: (float(text.get("rope_local_base_freq", local_default)), 1.0),
    }


def _layer_types(text: dict, family: str, num_layers: int, where: Path) -> tuple[str, ...]:
    if text.get("layer_types") is not None:
        types = text["layer_types"]
        unknown = sorted(set(types) - set(_HF_LAYER_TYPES))
        if unknown:
            raise ConversionError(f"{where}: unknown layer_types {unknown} "
                                  f"(want {', '.join(_HF_LAYER_TYPES)})")
        return tuple(_HF_LAYER_TYPES[t] for t in types)
    if family == "gemma2":
        return tuple(LOCAL if i % 2 == 0 else GLOBAL for i in range(num_layers))
    pattern = int(text.get("sliding_window_pattern", text.get("_sliding_window_pattern", 6)))
    return tuple(GLOBAL if (i + 1) % pattern == 0 else LOCAL for i in range(num_layers))


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def _int(text: dict, top: dict, key: str, default: int) -> int:
    value = text.get(key, top.get(key))
    return default if value is None else int(value)


def read_hf_config(src: Path, name: str | None = None) -> tuple[GemmaConfig, bool]:
    """GemmaConfig of the HF checkpoint in `src`, and whether config.json ties the embeddings."""
    where = src / "config.json"
    top = _read_json(where)
    model_type = top.get("model_type")
    if model_type == "gemma2":
        family, text = "gemma2", top
    elif model_type == "gemma3_text":
        family, text = "gemma3", top
    elif model_type == "gemma3":
        family, text = "gemma3", top.get("text_config") or {}
        if not isinstance(text, dict):
            raise ConversionError(f"{where}: text_config must be an object")
    else:
        raise ConversionError(f"{where}: unknown model_type {model_type!r} "
                              "(want gemma2, gemma3_text or gemma3)")
    given = {k: v for k, v in text.items() if v is not None or k in _NONE_OK}
    text = {**_DEFAULTS[family], **given}
    activation = text.get("hidden_activation") or text.get("hidden_act") or _OK_ACTIVATIONS[0]
    if activation not in _OK_ACTIVATIONS:
        raise ConversionError(f"{where}: hidden_activation {activation!r} is not supported "
                              f"(Gemma uses {_OK_ACTIVATIONS[0]})")
    for flag in ("attention_bias", "use_bidirectional_attention"):
        if text.get(flag):
            raise ConversionError(f"{where}: {flag}=true is not supported")

    generation = src / "generation_config.json"
    gen_eos = _read_json(generation).get("eos_token_id") if generation.is_file() else None
    eos: tuple[int, ...] = ()  # every EOS id named anywhere stops generation
    for ids in (text.get("eos_token_id"), top.get("eos_token_id"), gen_eos):
        eos += tuple(i for i in _ids(ids) if i not in eos)
    try:
        rope = _rope(text, family, where)
        num_layers = int(text["num_hidden_layers"])
        max_context = int(text["max_position_embeddings"])
        config = GemmaConfig(
            name=name or f"hf:{src.absolute().name}", family=family,
            vocab_size=int(text["vocab_size"]), d_model=int(text["hidden_size"]),
            num_layers=num_layers, num_heads=int(text["num_attention_heads"]),
            num_kv_heads=int(text["num_key_value_heads"]), head_dim=int(text["head_dim"]),
            ffw_hidden=int(text["intermediate_size"]),
            layer_types=_layer_types(text, family, num_layers, where),
            sliding_window=int(text["sliding_window"] or max_context),
            query_pre_attn_scalar=float(text["query_pre_attn_scalar"]),
            attn_logit_softcap=text["attn_logit_softcapping"],
            final_logit_softcap=text["final_logit_softcapping"],
            use_qk_norm=family == "gemma3",
            rope_local_base=rope[LOCAL][0], rope_local_scale=rope[LOCAL][1],
            rope_global_base=rope[GLOBAL][0], rope_global_scale=rope[GLOBAL][1],
            max_context=max_context, rms_norm_eps=float(text["rms_norm_eps"]),
            bos_id=_int(text, top, "bos_token_id", 2), eos_ids=eos or (1,),
            pad_id=_int(text, top, "pad_token_id", 0),
        )
    except (TypeError, ValueError, KeyError) as e:
        raise ConversionError(f"{where}: {e}") from None
    if name in CONFIGS:
        _check_registry(config, CONFIGS[name], where)
    tied = top.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    return config, tied is not False


_ARCHITECTURE = ("family", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "ffw_hidden", "layer_types", "sliding_window", "query_pre_attn_scalar",
                 "attn_logit_softcap", "final_logit_softcap", "use_qk_norm", "rope_local_base",
                 "rope_global_base", "rope_global_scale", "rope_local_scale")


def _check_registry(config: GemmaConfig, registered: GemmaConfig, where: Path) -> None:
    """--model NAME of a registry model: config.json must describe that architecture."""
    diff = [f"{f}={getattr(config, f)!r} (registry: {getattr(registered, f)!r})"
            for f in _ARCHITECTURE if getattr(config, f) != getattr(registered, f)]
    if diff:
        raise ConversionError(f"{where} does not describe --model {registered.name}: "
                              + "; ".join(diff))


# -- weights ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Spec:
    """Where one HF tensor goes: target param (and part), its HF shape, the layout change."""

    target: str
    part: int | None
    shape: tuple[int, ...]
    transform: Callable[[np.ndarray], np.ndarray]


def _specs(c: GemmaConfig) -> dict[str, _Spec]:
    """HF key (without the model prefix) -> _Spec, for every tensor the config needs."""
    d, h, kvh, hd, f = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.ffw_hidden
    same = lambda w: w  # noqa: E731
    q_in = lambda w: w.reshape(h, hd, d).transpose(2, 0, 1)  # [H*Dh, d] -> [d, H, Dh]  # noqa: E731
    kv_in = lambda w: w.reshape(kvh, hd, d).transpose(2, 0, 1)  # noqa: E731
    o_in = lambda w: w.reshape(d, h, hd).transpose(1, 2, 0)  # [d, H*Dh] -> [H, Dh, d]  # noqa: E731
    specs = {"embed_tokens.weight": _Spec("embedder/embedding", None, (c.vocab_size, d), same),
             "norm.weight": _Spec("final_norm/scale", None, (d,), same)}
    for i in range(c.num_layers):
        hf, ours = f"layers.{i}.", f"layers/{i}/"
        layer = {
            "input_layernorm.weight": ("pre_attn_norm/scale", None, (d,), same),
            "post_attention_layernorm.weight": ("post_attn_norm/scale", None, (d,), same),
            "pre_feedforward_layernorm.weight": ("pre_ffw_norm/scale", None, (d,), same),
            "post_feedforward_layernorm.weight": ("post_ffw_norm/scale", None, (d,), same),
            "self_attn.q_proj.weight": ("attn/q_proj", None, (h * hd, d), q_in),
            "self_attn.k_proj.weight": ("attn/kv_proj", 0, (kvh * hd, d), kv_in),
            "self_attn.v_proj.weight": ("attn/kv_proj", 1, (kvh * hd, d), kv_in),
            "self_attn.o_proj.weight": ("attn/o_proj", None, (d, h * hd), o_in),
            "mlp.gate_proj.weight": ("mlp/gating", 0, (f, d), np.transpose),
            "mlp.up_proj.weight": ("mlp/gating", 1, (f, d), np.transpose),
            "mlp.down_proj.weight": ("mlp/down", None, (d, f), np.transpose),
        }
        if c.use_qk_norm:
            layer["self_attn.q_norm.weight"] = ("attn/q_norm/scale", None, (hd,), same)
            layer["self_attn.k_norm.weight"] = ("attn/k_norm/scale", None, (hd,), same)
        specs.update({hf + k: _Spec(ours + t, p, s, fn) for k, (t, p, s, fn) in layer.items()})
    return specs


def _weight_files(src: Path) -> list[Path]:
    index = src / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index}: has no weight_map object")
        files = sorted({src / name for name in weight_map.values()})
        for file in files:
            if not file.is_file():
                raise ConversionError(f"{index}: lists {file.name}, which does not exist")
        return files
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{src}: no *.safetensors files (and no {INDEX_FILE})")
    return files


def _headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """key -> (file, shape, safetensors dtype) for every tensor, read from the headers only."""
    out: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for file in files:
        try:
            with safe_open(file, framework="numpy") as f:
                for key in f.keys():
                    if key in out:
                        raise ConversionError(f"{file.name}: tensor {key} is also in "
                                              f"{out[key][0].name}")
                    s = f.get_slice(key)
                    out[key] = (file, tuple(s.get_shape()), s.get_dtype())
        except ConversionError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ConversionError(f"{file}: not a readable safetensors file: {e}") from None
    return out


def _strip_prefix(key: str) -> str | None:
    for prefix in TEXT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


Plan = dict[str, tuple[str, Path, _Spec]]  # key without prefix -> (HF key, file, spec)


def _plan(config: GemmaConfig, headers: dict) -> tuple[Plan, list[str]]:
    """Match every tensor to its spec, checking dtype and shape before any data is read.

    Returns the plan and the lm_head keys present.
    """
    specs = _specs(config)
    plan, lm_heads, unexpected, prefixes = {}, [], [], []
    for key, (file, shape, dtype) in headers.items():
        if key.startswith(SKIP_PREFIXES):
            continue
        if key in LM_HEAD_KEYS:
            lm_heads.append(key)
            want = (config.vocab_size, config.d_model)
        else:
            stripped = _strip_prefix(key)
            spec = specs.get(stripped) if stripped is not None else None
            if spec is None:
                unexpected.append(f"{file.name}: {key}")
                continue
            if stripped in plan:
                raise ConversionError(f"{file.name}: tensor {key} duplicates "
                                      f"{plan[stripped][0]} in {plan[stripped][1].name}")
            plan[stripped] = (key, file, spec)
            prefixes.append(key[: len(key) - len(stripped)])
            want = spec.shape
        if dtype not in FLOAT_SAFETENSORS_DTYPES:
            raise ConversionError(f"{file.name}: tensor {key} has non-float dtype {dtype}")
        if shape != want:
            raise ConversionError(f"{file.name}: tensor {key} has shape {shape}, expected {want} "
                                  f"for config {config.name!r}")
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise ConversionError(f"unexpected tensors: {'; '.join(unexpected[:5])}{more}")
    prefix = max(set(prefixes), key=prefixes.count) if prefixes else TEXT_PREFIXES[-1]
    missing = [prefix + k for k in specs if k not in plan]
    if missing:
        names = sorted({f.name for f, _, _ in headers.values()})
        files = ", ".join(names) if len(names) <= 3 else f"the {len(names)} files {names[0]} ..."
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConversionError(f"missing tensors {', '.join(missing[:5])}{more} in {files}")
    return plan, lm_heads


def _host_device() -> jax.Device:
    """Where tensors read by safetensors land: the CPU, unless JAX runs without its CPU backend."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return jax.devices()[0]


def convert_hf(src: Path, builder_for: Callable[[GemmaConfig], ParamBuilder], *,
               name: str | None = None) -> tuple[GemmaConfig, dict[str, np.ndarray]]:
    """Read the HF checkpoint in `src`; returns its config and the converted params by path."""
    config, tied = read_hf_config(src, name)
    headers = _headers(_weight_files(src))
    plan, lm_heads = _plan(config, headers)
    builder = builder_for(config)
    by_file: dict[Path, list[tuple[str, _Spec]]] = {}
    for key, file, spec in plan.values():
        by_file.setdefault(file, []).append((key, spec))
    with jax.default_device(_host_device()), \
            tqdm(total=len(plan), desc="converting", unit="tensor", disable=None) as bar:
        for file, entries in by_file.items():
            with safe_open(file, framework="flax") as f:
                for key, spec in entries:
                    value = spec.transform(np.asarray(f.get_tensor(key)))
                    builder.put(spec.target, value, part=spec.part, source=f"{file.name}: {key}")
                    bar.update()
        for key in lm_heads if not tied else ():
            file = headers[key][0]
            with safe_open(file, framework="flax") as f:
                head = np.asarray(f.get_tensor(key)).astype(builder.dtype)
            if not np.array_equal(head, builder.params["embedder/embedding"]):
                raise ConversionError(f"{file.name}: tensor {key} differs from the input "
                                      "embedding; untied output embeddings are not supported")
    return config, builder.params


# -- the other direction (tests and the HF baseline benchmark build HF models of our configs) -----

_HF_LAYER_TYPE = {LOCAL: "sliding_attention", GLOBAL: "full_attention"}


def _hf_rope(base: float, scale: float) -> dict:
    if scale == 1.0:
        return {"rope_type": "default", "rope_theta": base}
    return {"rope_type": "linear", "factor": scale, "rope_theta": base}


def to_hf_config(c: GemmaConfig):
    """The transformers Gemma2Config / Gemma3TextConfig of the architecture `c` describes."""
    from transformers import Gemma2Config, Gemma3TextConfig  # noqa: PLC0415 - test/bench only

    common = dict(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffw_hidden,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_context, rms_norm_eps=c.rms_norm_eps,
        query_pre_attn_scalar=c.query_pre_attn_scalar, sliding_window=c.sliding_window,
        layer_types=[_HF_LAYER_TYPE[t] for t in c.layer_types],
        attn_logit_softcapping=c.attn_logit_softcap, final_logit_softcapping=c.final_logit_softcap,
        bos_token_id=c.bos_id, eos_token_id=list(c.eos_ids), pad_token_id=c.pad_id,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
    )
    if c.family == "gemma2":
        if (c.rope_local_base, c.rope_local_scale) != (c.rope_global_base, c.rope_global_scale):
            raise ValueError(f"{c.name}: Gemma 2 in transformers has one RoPE for every layer")
        return Gemma2Config(**common,
                            rope_parameters=_hf_rope(c.rope_global_base, c.rope_global_scale))
    return Gemma3TextConfig(**common, rope_parameters={
        "full_attention": _hf_rope(c.rope_global_base, c.rope_global_scale),
        "sliding_attention": _hf_rope(c.rope_local_base, c.rope_local_scale)})
