"""jaxpage checkpoints: an Orbax checkpoint of the model params plus jaxpage_config.json.

Layout of a checkpoint directory:

    DIR/jaxpage_config.json   {"format": "jaxpage", "format_version": 1, "param_dtype": ...,
                               "config": GemmaConfig.to_dict()}
    DIR/params/               Orbax (StandardCheckpointer) checkpoint of the params as a nested dict
                              of the model's param tree (embedder/embedding,
                              layers/<i>/attn/q_proj, ...)
    DIR/tokenizer.model       optional SentencePiece model

Params are addressed by '/'-joined paths such as "layers/3/attn/kv_proj" throughout.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxpage.models.config import GemmaConfig
from jaxpage.models.gemma import Gemma

FORMAT = "jaxpage"
FORMAT_VERSION = 1
CONFIG_FILE = "jaxpage_config.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.model"
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}

ShardingSpec = Union[jax.sharding.Sharding, Callable[[str], jax.sharding.Sharding], None]


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read; the message names the file or param."""


# -- param trees -----------------------------------------------------------------------------
def _path_str(key_path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)


def flatten_params(tree: Mapping) -> dict[str, Any]:
    """Nested param dict -> {"layers/0/attn/q_proj": leaf, ...}."""
    return {_path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten_params(flat: Mapping[str, Any]) -> dict:
    """{"layers/0/attn/q_proj": leaf} -> nested dict, layer indices as ints (as NNX names them)."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = [int(p) if p.isdigit() else p for p in path.split("/")]
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


def abstract_model(config: GemmaConfig, dtype=jnp.float32) -> Gemma:
    """The model with ShapeDtypeStruct params (nothing allocated)."""
    return nnx.eval_shape(lambda: Gemma(config, dtype=dtype, rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=16)
def _param_shapes(config: GemmaConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    state = nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))
    return tuple((path, tuple(leaf.shape)) for path, leaf in flatten_params(state).items())


def param_shapes(config: GemmaConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every param of the model described by `config`, by path."""
    return dict(_param_shapes(config))


def check_param_shapes(shapes: Mapping[str, tuple[int, ...]], config: GemmaConfig, where: str,
                       expected: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Raise CheckpointError unless `shapes` has exactly the config's params and shapes."""
    expected = param_shapes(config) if expected is None else expected
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise CheckpointError(f"{where}: missing params for config {config.name!r}: "
                              f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise CheckpointError(f"{where}: params not in config {config.name!r}: "
                              f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    for path, shape in expected.items():
        if tuple(shapes[path]) != tuple(shape):
            raise CheckpointError(f"{where}: param {path} has shape {tuple(shapes[path])} but "
                                  f"config {config.name!r} expects {tuple(shape)}")


def resolve_dtype(dtype) -> jnp.dtype:
    """"bfloat16" / "float32" / a float dtype -> jnp.dtype; anything else is an error."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return jnp.dtype(DTYPES[dtype])
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}") from None
    if not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"dtype must be a floating point type, got {resolved}")
    return resolved


# -- save ------------------------------------------------------------------------------------
def _as_flat_params(model_or_state) -> dict[str, Any]:
    if isinstance(model_or_state, nnx.Module):
        model_or_state = nnx.state(model_or_state, nnx.Param)
    if isinstance(model_or_state, nnx.State):
        model_or_state = nnx.to_pure_dict(model_or_state)
    if not isinstance(model_or_state, Mapping):
        raise TypeError("save_checkpoint wants a Gemma model, an nnx.State or a dict of params, "
                        f"got {type(model_or_state).__name__}")
    if all(isinstance(k, str) and "/" in k for k in model_or_state):
        return dict(model_or_state)  # already flat
    return flatten_params(model_or_state)


def save_checkpoint(model_or_state, config: GemmaConfig, dst_dir: str | Path, *,
                    tokenizer_path: str | Path | None = None) -> Path:
    """Write params (a Gemma model, its nnx.State, or a nested/flat dict of arrays), the config
    and optionally tokenizer.model into `dst_dir` (created; must not hold a checkpoint yet)."""
    dst = Path(dst_dir).absolute()
    flat = _as_flat_params(model_or_state)
    check_param_shapes({p: tuple(np.shape(x)) for p, x in flat.items()}, config, "save_checkpoint")
    dtypes = sorted({str(x.dtype) for x in flat.values()})
    if len(dtypes) != 1:
        raise CheckpointError(f"save_checkpoint: params mix dtypes {', '.join(dtypes)}")
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise CheckpointError(f"tokenizer file {tokenizer_path} does not exist")
    if (dst / CONFIG_FILE).exists() or (dst / PARAMS_DIR).exists():
        raise CheckpointError(f"{dst} already holds a checkpoint")
    dst.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(dst / PARAMS_DIR, unflatten_params(flat))
        ckptr.wait_until_finished()
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, dst / TOKENIZER_FILE)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "param_dtype": dtypes[0],
            "config": config.to_dict()}
    (dst / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return dst


# -- load ------------------------------------------------------------------------------------
def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is missing (not a checkpoint made by jaxpage convert)")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"{cfg_file}: not a jaxpage checkpoint config "
                              "(want keys format='jaxpage', format_version, config)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file}: format_version {meta.get('format_version')!r} is not "
                              f"supported (this jaxpage reads version {FORMAT_VERSION})")
    return meta


def read_config(path: str | Path) -> GemmaConfig:
    """The GemmaConfig of the checkpoint at `path`."""
    path = Path(path)
    meta = _read_meta(path)
    try:
        return GemmaConfig.from_dict(meta["config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: bad config: {e}") from None


def metadata_tree(meta) -> Mapping:
    """The tree of array metadata inside what `Checkpointer.metadata` returns (the tree itself
    in older Orbax, a StepMetadata / TreeMetadata wrapper in newer)."""
    tree = getattr(meta, "item_metadata", meta)
    return getattr(tree, "tree", tree)


def _stored_shapes(params_dir: Path) -> dict[str, tuple[int, ...]]:
    with ocp.StandardCheckpointer() as ckptr:
        tree = metadata_tree(ckptr.metadata(params_dir))
    return {p: tuple(leaf.shape) for p, leaf in flatten_params(tree).items()}


def _sharding_for(sharding: ShardingSpec) -> Callable[[str], jax.sharding.Sharding]:
    if sharding is None:
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return lambda path: default
    if isinstance(sharding, jax.sharding.Sharding):
        return lambda path: sharding
    if callable(sharding):
        def per_param(path: str) -> jax.sharding.Sharding:
            s = sharding(path)
            if not isinstance(s, jax.sharding.Sharding):
                raise TypeError(f"sharding({path!r}) returned {type(s).__name__}, not a Sharding")
            return s
        return per_param
    raise TypeError("sharding must be a jax.sharding.Sharding, a callable path -> Sharding, "
                    f"or None; got {type(sharding).__name__}")


def load_checkpoint(path: str | Path, *, dtype="bfloat16",
                    sharding: ShardingSpec = None) -> tuple[GemmaConfig, Gemma]:
    """Restore a checkpoint into a Gemma model with params cast to `dtype`.

    `sharding` places the params: one Sharding for all, or a callable from a param path
    ("layers/0/attn/q_proj") to its Sharding; default: the first device.
    """
    path = Path(path).absolute()
    dtype = resolve_dtype(dtype)
    config = read_config(path)
    params_dir = path / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{params_dir} is missing")
    try:
        stored = _stored_shapes(params_dir)
    except (OSError, ValueError, FileNotFoundError) as e:
        raise CheckpointError(f"{params_dir}: cannot read the Orbax checkpoint: {e}") from None
    graphdef, state = nnx.split(abstract_model(config, dtype))
    abstract = flatten_params(nnx.to_pure_dict(state))
    check_param_shapes(stored, config, str(params_dir),
                       expected={p: leaf.shape for p, leaf in abstract.items()})
    place = _sharding_for(sharding)
    target = unflatten_params({p: jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=place(p))
                               for p, leaf in abstract.items()})
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(params_dir, target)
    nnx.replace_by_pure_dict(state, restored)
    return config, nnx.merge(graphdef, state)
