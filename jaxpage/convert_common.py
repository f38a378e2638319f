"""What the checkpoint converters share: the error type and the builder of the target params."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from jaxpage.checkpoint import param_shapes
from jaxpage.models.config import GemmaConfig

TARGET_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}

# Params assembled from several source tensors, and the axis their parts are stacked on.
_STACK_AXIS = {"attn/kv_proj": 0, "mlp/gating": 1}


class ConversionError(Exception):
    """Input a converter cannot use; the message names the file and the tensor."""


def is_float_dtype(dtype) -> bool:
    """True for the floating point dtypes a checkpoint may store weights in (bf16 included)."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype == ml_dtypes.bfloat16


class ParamBuilder:
    """Collects converted params for one config: checks shapes, casts, knows what is missing.

    Params are keyed by checkpoint path ("layers/0/attn/q_proj"). A stacked param (kv_proj:
    keys then values; gating: gate then up) is filled part by part.
    """

    def __init__(self, config: GemmaConfig, dtype: str, *, check_finite: bool = False):
        if dtype not in TARGET_DTYPES:
            raise ConversionError(
                f"--dtype must be one of {', '.join(TARGET_DTYPES)}, got {dtype!r}")
        self.config = config
        self.dtype = TARGET_DTYPES[dtype]
        self.dtype_name = dtype
        self.shapes = param_shapes(config)
        self.check_finite = check_finite
        self.params: dict[str, np.ndarray] = {}
        self._filled: dict[str, set[int]] = {}

    def _stack_axis(self, path: str) -> int | None:
        return next((a for suffix, a in _STACK_AXIS.items() if path.endswith(suffix)), None)

    def put(self, path: str, value: np.ndarray, *, source: str, part: int | None = None) -> None:
        """Store `value` (already in our layout) as param `path`, or as part `part` of it."""
        if path not in self.shapes:
            raise ConversionError(f"{source}: maps to {path}, which config {self.config.name!r} "
                                  "does not have")
        shape = self.shapes[path]
        axis = self._stack_axis(path)
        if (part is None) != (axis is None):
            raise AssertionError(f"param {path}: part={part} but stack axis={axis}")
        want = shape if axis is None else shape[:axis] + shape[axis + 1:]
        if tuple(value.shape) != want:
            raise ConversionError(f"{source}: converted shape {tuple(value.shape)} != {want} "
                                  f"expected for {path}")
        if self.check_finite and not np.isfinite(np.asarray(value, np.float32)).all():
            raise ConversionError(f"{source}: tensor has NaN or infinite values")
        filled = self._filled.setdefault(path, set())
        key = 0 if part is None else part
        if key in filled:
            raise ConversionError(f"{source}: {path} (part {key}) was already given by another "
                                  "tensor")
        if axis is None:
            self.params[path] = np.ascontiguousarray(value, dtype=self.dtype)
        else:
            if path not in self.params:
                self.params[path] = np.empty(shape, self.dtype)
            index = (slice(None),) * axis + (part,)
            self.params[path][index] = value
        filled.add(key)

    def missing(self) -> list[str]:
        """Params (or parts, as "path[part]") that no source tensor has filled yet."""
        out = []
        for path, shape in self.shapes.items():
            axis = self._stack_axis(path)
            parts = [0] if axis is None else range(shape[axis])
            filled = self._filled.get(path, set())
            out += [path if axis is None else f"{path}[{i}]" for i in parts if i not in filled]
        return out
