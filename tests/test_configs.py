"""Every released Gemma config builds abstractly and has its published parameter count."""

from __future__ import annotations

import numpy as np
from flax import nnx

from jaxpage.checkpoint import abstract_model, flatten_params
from jaxpage.models.config import CONFIGS, RELEASED_NAMES

# Published sizes in billions (Gemma 2 / Gemma 3 reports; Gemma 3 4B+ without the vision tower).
PUBLISHED_B = {
    "gemma2-2b": 2.61, "gemma2-9b": 9.24, "gemma2-27b": 27.2,
    "gemma3-270m": 0.27, "gemma3-1b": 1.0, "gemma3-4b": 3.88, "gemma3-12b": 11.8,
    "gemma3-27b": 27.0,
}
TOLERANCE = 0.03  # relative


def test_every_released_config_has_a_published_size():
    assert set(PUBLISHED_B) == set(RELEASED_NAMES)


def test_released_configs_build_abstractly_with_the_published_parameter_counts():
    rows, wrong = [], []
    for name in RELEASED_NAMES:
        config = CONFIGS[name]
        params = flatten_params(nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param)))
        count = sum(int(np.prod(leaf.shape)) for leaf in params.values())
        layers = {p.split("/")[1] for p in params if p.startswith("layers/")}
        assert len(layers) == config.num_layers, name
        assert params["embedder/embedding"].shape == (config.vocab_size, config.d_model), name
        rel = count / (PUBLISHED_B[name] * 1e9) - 1
        rows.append(f"{name:<12} {count / 1e9:>9.3f} {PUBLISHED_B[name]:>10.2f} {rel:>+8.2%}")
        if abs(rel) > TOLERANCE:
            wrong.append(f"{name}: {count:,} params vs published {PUBLISHED_B[name]}B")
    print("\nmodel        params(B)  published  rel.diff\n" + "\n".join(rows))
    assert not wrong, "; ".join(wrong)
