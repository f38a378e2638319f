"""Gemma 2 / Gemma 3 model configurations: one dataclass, a registry of every released size."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

LayerType = Literal["local", "global"]
LOCAL: LayerType = "local"
GLOBAL: LayerType = "global"


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Architecture of a Gemma 2 or Gemma 3 text decoder."""

    name: str
    family: Literal["gemma2", "gemma3"]
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffw_hidden: int
    layer_types: tuple[LayerType, ...]
    sliding_window: int
    query_pre_attn_scalar: float
    attn_logit_softcap: float | None
    final_logit_softcap: float | None
    use_qk_norm: bool
    rope_local_base: float
    rope_global_base: float
    rope_global_scale: float = 1.0  # linear RoPE scaling on global layers (positions / scale)
    rope_local_scale: float = 1.0
    max_context: int = 8192
    rms_norm_eps: float = 1e-6
    bos_id: int = 2
    eos_ids: tuple[int, ...] = (1,)
    pad_id: int = 0

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_layers={self.num_layers}"
            )
        for t in self.layer_types:
            if t not in (LOCAL, GLOBAL):
                raise ValueError(f"layer_types: unknown layer type {t!r} (want 'local' or 'global')")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        for field in ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim", "ffw_hidden",
                      "sliding_window", "max_context"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")

    # -- derived -------------------------------------------------------------------------------
    @property
    def layer_groups(self) -> tuple[LayerType, ...]:
        """KV-cache layer groups present in this model, global first (each has its own page pool)."""
        return tuple(g for g in (GLOBAL, LOCAL) if g in self.layer_types)

    def window_of(self, layer_type: LayerType) -> int | None:
        """Sliding window of a layer type; None for global layers (no window)."""
        return self.sliding_window if layer_type == LOCAL else None

    def rope_of(self, layer_type: LayerType) -> tuple[float, float]:
        """(base frequency, linear scale factor) of RoPE for a layer type."""
        if layer_type == LOCAL:
            return self.rope_local_base, self.rope_local_scale
        return self.rope_global_base, self.rope_global_scale

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["eos_ids"] = list(self.eos_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GemmaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GemmaConfig fields: {', '.join(unknown)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in d and f.default is dataclasses.MISSING)
        if missing:
            raise ValueError(f"GemmaConfig is missing fields: {', '.join(missing)}")
        d = dict(d)
        d["layer_types"] = tuple(d["layer_types"])
        if "eos_ids" in d:
            d["eos_ids"] = tuple(d["eos_ids"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def gemma2_layer_types(num_layers: int) -> tuple[LayerType, ...]:
    """Gemma 2 alternates local, global, local, ..."""
    return tuple(LOCAL if i % 2 == 0 else GLOBAL for i in range(num_layers))


def gemma3_layer_types(num_layers: int) -> tuple[LayerType, ...]:
    """Gemma 3: layer i is global iff i % 6 == 5 (five local layers per global one)."""
    return tuple(GLOBAL if i % 6 == 5 else LOCAL for i in range(num_layers))


def _gemma2(name: str, *, d_model: int, num_layers: int, num_heads: int, num_kv_heads: int,
            head_dim: int, ffw_hidden: int, query_pre_attn_scalar: float,
            vocab_size: int = 256_000, sliding_window: int = 4096,
            max_context: int = 8192) -> GemmaConfig:
    return GemmaConfig(
        name=name, family="gemma2", vocab_size=vocab_size, d_model=d_model,
        num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, ffw_hidden=ffw_hidden, layer_types=gemma2_layer_types(num_layers),
        sliding_window=sliding_window, query_pre_attn_scalar=query_pre_attn_scalar,
        attn_logit_softcap=50.0, final_logit_softcap=30.0, use_qk_norm=False,
        rope_local_base=10_000.0, rope_global_base=10_000.0, max_context=max_context,
        eos_ids=(1, 107),
    )


def _gemma3(name: str, *, d_model: int, num_layers: int, num_heads: int, num_kv_heads: int,
            head_dim: int, ffw_hidden: int, sliding_window: int, rope_global_scale: float,
            query_pre_attn_scalar: float, max_context: int,
            vocab_size: int = 262_144) -> GemmaConfig:
    return GemmaConfig(
        name=name, family="gemma3", vocab_size=vocab_size, d_model=d_model,
        num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, ffw_hidden=ffw_hidden, layer_types=gemma3_layer_types(num_layers),
        sliding_window=sliding_window, query_pre_attn_scalar=query_pre_attn_scalar,
        attn_logit_softcap=None, final_logit_softcap=None, use_qk_norm=True,
        rope_local_base=10_000.0, rope_global_base=1_000_000.0,
        rope_global_scale=rope_global_scale, max_context=max_context, eos_ids=(1, 106),
    )


# Released sizes (Gemma 2 report, Gemma 3 report; 27B query scale is d_model / num_heads).
_RELEASED = [
    _gemma2("gemma2-2b", d_model=2304, num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256,
            ffw_hidden=9216, query_pre_attn_scalar=256),
    _gemma2("gemma2-9b", d_model=3584, num_layers=42, num_heads=16, num_kv_heads=8, head_dim=256,
            ffw_hidden=14336, query_pre_attn_scalar=256),
    _gemma2("gemma2-27b", d_model=4608, num_layers=46, num_heads=32, num_kv_heads=16,
            head_dim=128, ffw_hidden=36864, query_pre_attn_scalar=144),
    _gemma3("gemma3-270m", d_model=640, num_layers=18, num_heads=4, num_kv_heads=1, head_dim=256,
            ffw_hidden=2048, sliding_window=512, rope_global_scale=1.0,
            query_pre_attn_scalar=256, max_context=32_768),
    _gemma3("gemma3-1b", d_model=1152, num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256,
            ffw_hidden=6912, sliding_window=512, rope_global_scale=1.0,
            query_pre_attn_scalar=256, max_context=32_768),
    _gemma3("gemma3-4b", d_model=2560, num_layers=34, num_heads=8, num_kv_heads=4, head_dim=256,
            ffw_hidden=10240, sliding_window=1024, rope_global_scale=8.0,
            query_pre_attn_scalar=256, max_context=131_072),
    _gemma3("gemma3-12b", d_model=3840, num_layers=48, num_heads=16, num_kv_heads=8,
            head_dim=256, ffw_hidden=15360, sliding_window=1024, rope_global_scale=8.0,
            query_pre_attn_scalar=256, max_context=131_072),
    _gemma3("gemma3-27b", d_model=5376, num_layers=62, num_heads=32, num_kv_heads=16,
            head_dim=128, ffw_hidden=21504, sliding_window=1024, rope_global_scale=8.0,
            query_pre_attn_scalar=168, max_context=131_072),
]

# Tiny configurations for tests and the demo: every architectural feature switched on, with
# num_heads * head_dim != d_model, GQA, a short window and a query scale != head_dim.
_TINY = [
    dataclasses.replace(
        _gemma2("gemma2-tiny", d_model=64, num_layers=4, num_heads=4, num_kv_heads=2,
                head_dim=32, ffw_hidden=96, query_pre_attn_scalar=24, vocab_size=512,
                sliding_window=8, max_context=512),
        attn_logit_softcap=5.0, final_logit_softcap=3.0, eos_ids=(1,)),
    dataclasses.replace(
        _gemma3("gemma3-tiny", d_model=64, num_layers=7, num_heads=4, num_kv_heads=2,
                head_dim=32, ffw_hidden=96, sliding_window=8, rope_global_scale=8.0,
                query_pre_attn_scalar=24, max_context=512, vocab_size=512),
        eos_ids=(1,)),
    dataclasses.replace(
        _gemma3("gemma3-demo", d_model=128, num_layers=6, num_heads=4, num_kv_heads=2,
                head_dim=32, ffw_hidden=256, sliding_window=64, rope_global_scale=1.0,
                query_pre_attn_scalar=32, max_context=2048, vocab_size=1024),
        eos_ids=(1,)),
]

CONFIGS: dict[str, GemmaConfig] = {c.name: c for c in _RELEASED + _TINY}
RELEASED_NAMES: tuple[str, ...] = tuple(c.name for c in _RELEASED)


def get_config(name: str) -> GemmaConfig:
    """The registered configuration called `name` (e.g. "gemma3-4b")."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(sorted(CONFIGS))}") from None
