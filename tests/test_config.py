"""MoEConfig validation: every field's type and range, each a ValueError naming the field."""

import pytest

from epmoe.config import MoEConfig


def _cfg(**kw):
    base = dict(hidden=16, intermediate=8, num_experts=8, top_k=2)
    return MoEConfig(**{**base, **kw})


@pytest.mark.parametrize(("field", "value"), [
    ("norm_topk_prob", 1),
    ("norm_topk_prob", "false"),
    ("norm_topk_prob", None),
    ("n_group", 2.0),
    ("n_group", "2"),
    ("n_group", True),
    ("topk_group", 1.0),
    ("shared_experts", 1.0),
    ("shared_experts", "1"),
    ("shared_intermediate", 8.0),
    ("swiglu_limit", 0.0),
    ("swiglu_limit", -7.0),
    ("swiglu_limit", float("nan")),
    ("swiglu_limit", float("inf")),
    ("swiglu_alpha", 0),
    ("swiglu_alpha", "1.702"),
    ("routed_scaling_factor", 0.0),
    ("routed_scaling_factor", -2.5),
    ("routed_scaling_factor", float("nan")),
    ("routed_scaling_factor", True),
])
def test_bad_field_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"MoEConfig\.{field} must be"):
        _cfg(**{field: value})


def test_good_values_pass():
    cfg = _cfg(routing="sigmoid_grouped", n_group=4, topk_group=2, routed_scaling_factor=2, norm_topk_prob=False,
               shared_experts=1, shared_intermediate=4, swiglu_limit=7, swiglu_alpha=1.702)
    assert cfg.shared_width == 4 and cfg.routed_scaling_factor == 2


@pytest.mark.parametrize(("kw", "match"), [
    (dict(n_group=0), "0 < topk_group <= n_group"),
    (dict(n_group=2, topk_group=3), "0 < topk_group <= n_group"),
    (dict(shared_experts=-1), "shared_experts must be >= 0"),
    (dict(shared_intermediate=0), "shared_intermediate must be positive"),
    (dict(hidden=16.0), r"MoEConfig\.hidden must be a positive int"),
])
def test_ranges(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)
