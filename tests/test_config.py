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


# ---- MoEConfig.from_hf: transformers configs built in-process, their config.json, a folder ----

transformers = pytest.importorskip("transformers")

# (transformers config class, kwargs as the model's published config.json sets them, preset)
HF_CASES = [
    ("Qwen3MoeConfig", dict(norm_topk_prob=True), "qwen3-30b-a3b"),
    ("MixtralConfig", {}, "mixtral-8x7b"),
    ("DeepseekV3Config", {}, "deepseek-v3"),
    ("GptOssConfig", {}, "gpt-oss-120b"),
    ("OlmoeConfig", dict(intermediate_size=1024), "olmoe-1b-7b"),
]


def _hf(name, kwargs):
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls(**kwargs)


@pytest.mark.parametrize(("name", "kwargs", "preset"), HF_CASES, ids=[c[0] for c in HF_CASES])
def test_from_hf_matches_the_preset_from_object_dict_file_and_folder(tmp_path, name, kwargs, preset):
    hf = _hf(name, kwargs)
    want = MoEConfig.from_preset(preset)
    assert MoEConfig.from_hf(hf) == want
    assert MoEConfig.from_hf(hf.to_dict()) == want
    hf.save_pretrained(tmp_path)  # writes config.json, as a checkpoint folder holds it
    assert MoEConfig.from_hf(tmp_path) == want
    assert MoEConfig.from_hf(str(tmp_path / "config.json")) == want
    # only the fields that differ from transformers' defaults, as many config.json files hold them
    assert MoEConfig.from_hf(hf.to_diff_dict()) == want


def test_from_hf_of_a_small_config_keeps_shapes_and_routing():
    hf = transformers.Qwen3MoeConfig(hidden_size=64, moe_intermediate_size=32, num_experts=8,
                                     num_experts_per_tok=2, norm_topk_prob=False)
    cfg = MoEConfig.from_hf(hf)
    assert (cfg.hidden, cfg.intermediate, cfg.num_experts, cfg.top_k, cfg.routing, cfg.norm_topk_prob) == (
        64, 32, 8, 2, "softmax", False)


def test_from_hf_is_the_one_implementation_behind_integrations_hf():
    from epmoe.integrations.hf import config_from_hf

    hf = transformers.MixtralConfig()
    assert config_from_hf(hf) == MoEConfig.from_hf(hf)


def test_from_hf_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"model_type='llama'\) is not a supported MoE family"):
        MoEConfig.from_hf({"model_type": "llama", "hidden_size": 8})
    with pytest.raises(ValueError, match="no 'model_type'"):
        MoEConfig.from_hf({"hidden_size": 8})
    with pytest.raises(ValueError, match="no Hugging Face config at"):
        MoEConfig.from_hf(tmp_path)
    with pytest.raises(ValueError, match="hidden_act='relu' is not supported"):
        MoEConfig.from_hf(transformers.MixtralConfig(hidden_act="relu"))


def test_from_hf_without_transformers_reads_the_dict_and_names_missing_fields(monkeypatch):
    import sys

    d = transformers.MixtralConfig().to_dict()
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    assert MoEConfig.from_hf(d) == MoEConfig.from_preset("mixtral-8x7b")
    del d["num_local_experts"]
    with pytest.raises(ValueError, match="has no field 'num_local_experts'"):
        MoEConfig.from_hf(d)
