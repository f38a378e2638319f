"""SamplingParams: invalid values raise ValueError naming the field; valid ones normalise."""

import pytest

from jaxpage import SamplingParams


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", 1.5), ("temperature", -0.1), ("temperature", float("nan")),
    ("top_k", -2), ("top_p", 0.0), ("top_p", 1.1), ("min_p", -0.1), ("min_p", 2.0),
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("repetition_penalty", 0.0),
    ("max_tokens", 0), ("max_tokens", "12"), ("min_tokens", -1), ("stop", [""]),
    ("stop_token_ids", [-1]), ("seed", 1.5), ("logprobs", 21), ("logprobs", -1),
    ("best_of", 0), ("temperature", True),
])
def test_invalid_values_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}\b"):
        SamplingParams(**{field: value})


def test_min_tokens_may_not_exceed_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=4)


def test_defaults_and_normalisation():
    p = SamplingParams(stop="###", top_k=-1)
    assert p.stop == ["###"] and p.top_k == 0 and p.stop_token_ids == []
    assert SamplingParams(temperature=0.0).greedy and not SamplingParams().greedy
    assert SamplingParams(n=2, best_of=4).beam_width == 4
