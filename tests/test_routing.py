import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epmoe.config import MoEConfig
from epmoe.routing import Routing, RoutingCapture, check_routing, route


def _cfg(routing="softmax", E=8, K=2, **kw):
    return MoEConfig(hidden=16, intermediate=8, num_experts=E, top_k=K, routing=routing, **kw)


def _by_id(ids, weights):
    """Sort each row by expert id so orders of equal sets compare equal."""
    order = ids.long().argsort(dim=1)
    return ids.long().gather(1, order), weights.float().gather(1, order)


# ---- hand-computed cases ---------------------------------------------------------------


def test_softmax_renormalised_by_hand():
    logits = torch.tensor([[0.0, math.log(2.0), math.log(4.0), 0.0]])  # probs 1,2,4,1 / 8
    r = route(logits, _cfg(E=4, K=2))
    assert r.ids.tolist() == [[2, 1]]
    torch.testing.assert_close(r.weights, torch.tensor([[4 / 6, 2 / 6]]))


def test_softmax_not_renormalised_by_hand():
    logits = torch.tensor([[0.0, math.log(2.0), math.log(4.0), 0.0]])
    r = route(logits, _cfg(E=4, K=2, norm_topk_prob=False))
    torch.testing.assert_close(r.weights, torch.tensor([[4 / 8, 2 / 8]]))


def test_softmax_after_topk_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0 + math.log(3.0)]])
    r = route(logits, _cfg("softmax_after_topk", E=4, K=2))
    assert r.ids.tolist() == [[3, 1]]
    torch.testing.assert_close(r.weights, torch.tensor([[0.75, 0.25]]))


def test_sigmoid_bias_picks_by_biased_weights_by_unbiased():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    bias = torch.tensor([0.0, 0.9, 0.0, 0.0])
    r = route(logits, _cfg("sigmoid_bias", E=4, K=2), correction_bias=bias)
    s = torch.sigmoid(logits[0])
    # choice scores: 0.881, 1.4, 0.731, 0.269 -> experts 1 then 0
    assert r.ids.tolist() == [[1, 0]]
    expect = torch.stack([s[1], s[0]]) / (s[1] + s[0])
    torch.testing.assert_close(r.weights[0], expect)


def test_grouped_topk_by_hand():
    # 8 experts in 4 groups of 2; keep 2 groups, pick 2 experts.
    cfg = _cfg("sigmoid_grouped", E=8, K=2, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.5, 0.2, 0.2, 0.95, 0.01]])
    logits = torch.logit(scores)
    bias = torch.zeros(8)
    r = route(logits, cfg, correction_bias=bias)
    # group sums: g0 1.0, g1 1.0, g2 0.4, g3 0.96 -> groups 0 and 1 (tie-free), expert 6 is excluded
    assert r.ids.tolist() == [[0, 2]]
    torch.testing.assert_close(r.weights[0], torch.tensor([0.9, 0.5]) / 1.4 * 2.5)


def test_grouped_topk_bias_moves_group_choice():
    cfg = _cfg("sigmoid_grouped", E=8, K=2, n_group=4, topk_group=1)
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.1, 0.3, 0.3, 0.2, 0.2]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.7, 0.7])
    r = route(torch.logit(scores), cfg, correction_bias=bias)
    assert sorted(r.ids[0].tolist()) == [6, 7]
    torch.testing.assert_close(r.weights[0], torch.tensor([0.5, 0.5]))  # unbiased 0.2, 0.2


@pytest.mark.parametrize("routing", ["softmax", "softmax_after_topk", "sigmoid_bias", "sigmoid_grouped"])
def test_ties_break_to_lowest_expert_id(routing):
    kw = {"n_group": 2, "topk_group": 2} if routing == "sigmoid_grouped" else {}
    cfg = _cfg(routing, E=8, K=3, **kw)
    logits = torch.zeros(5, 8)
    bias = torch.zeros(8) if cfg.uses_correction_bias else None
    r = route(logits, cfg, correction_bias=bias)
    assert r.ids.tolist() == [[0, 1, 2]] * 5


def test_zero_tokens():
    r = route(torch.empty(0, 8), _cfg())
    assert r.ids.shape == (0, 2) and r.ids.dtype == torch.int32 and r.weights.dtype == torch.float32


# ---- parity with Hugging Face transformers MoE routers (tiny local configs) ------------


def test_matches_hf_mixtral_router():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    hf_cfg = MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2)
    router = MixtralTopKRouter(hf_cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    logits, w_hf, ids_hf = router(x)
    r = route(logits, _cfg(E=8, K=2))
    ids_a, w_a = _by_id(r.ids, r.weights)
    ids_b, w_b = _by_id(ids_hf, w_hf)
    assert torch.equal(ids_a, ids_b)
    torch.testing.assert_close(w_a, w_b)


@pytest.mark.parametrize("norm", [True, False])
def test_matches_hf_qwen3_moe_router(norm):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    hf_cfg = Qwen3MoeConfig(hidden_size=32, num_experts=16, num_experts_per_tok=4, norm_topk_prob=norm)
    router = Qwen3MoeTopKRouter(hf_cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    logits, w_hf, ids_hf = router(x)
    r = route(logits, _cfg(E=16, K=4, norm_topk_prob=norm))
    ids_a, w_a = _by_id(r.ids, r.weights)
    ids_b, w_b = _by_id(ids_hf, w_hf)
    assert torch.equal(ids_a, ids_b)
    torch.testing.assert_close(w_a, w_b)


def test_matches_hf_deepseek_v3_router():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    hf_cfg = DeepseekV3Config(
        hidden_size=32, n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True,
    )
    router = DeepseekV3TopkRouter(hf_cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    router.e_score_correction_bias.copy_(torch.randn(32, generator=torch.Generator().manual_seed(3)) * 0.1)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    logits, w_hf, ids_hf = router(x)
    cfg = _cfg("sigmoid_grouped", E=32, K=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    r = route(logits, cfg, correction_bias=router.e_score_correction_bias)
    ids_a, w_a = _by_id(r.ids, r.weights)
    ids_b, w_b = _by_id(ids_hf, w_hf)
    assert torch.equal(ids_a, ids_b)
    torch.testing.assert_close(w_a, w_b)


# ---- invariants (property tests) -------------------------------------------------------

_MODES = st.sampled_from(["softmax", "softmax_after_topk", "sigmoid_bias", "sigmoid_grouped"])


@settings(max_examples=60, deadline=None)
@given(mode=_MODES, T=st.integers(0, 12), k=st.integers(1, 4), norm=st.booleans(), seed=st.integers(0, 2**16),
       coarse=st.booleans())
def test_routing_invariants(mode, T, k, norm, seed, coarse):
    E = 8
    kw = {"n_group": 4, "topk_group": 2} if mode == "sigmoid_grouped" else {}
    cfg = _cfg(mode, E=E, K=k, norm_topk_prob=norm, **kw)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    if coarse:  # many exact ties
        logits = logits.round()
    bias = torch.randn(E, generator=g) * 0.1 if cfg.uses_correction_bias else None
    r = route(logits, cfg, correction_bias=bias)
    assert r.ids.shape == (T, k) and r.ids.dtype == torch.int32
    check_routing(r, E)  # in range, distinct, finite
    assert bool((r.weights >= 0).all())
    if T and (norm or mode == "softmax_after_topk"):
        torch.testing.assert_close(r.weights.sum(1), torch.ones(T))
    # deterministic: the same logits route the same way
    r2 = route(logits.clone(), cfg, correction_bias=bias)
    assert torch.equal(r.ids, r2.ids) and torch.equal(r.weights, r2.weights)


# ---- routed mode, capture and bad input ------------------------------------------------


def test_external_routing_converts_and_validates():
    r = Routing.external(torch.tensor([[3, 1]]), torch.tensor([[0.5, 0.5]], dtype=torch.float16), 4)
    assert r.ids.dtype == torch.int32 and r.weights.dtype == torch.float32
    with pytest.raises(ValueError, match=r"lie in \[0, 4\)"):
        Routing.external(torch.tensor([[4, 1]]), torch.ones(1, 2), 4)
    with pytest.raises(ValueError, match="repeat an expert within token 1"):
        Routing.external(torch.tensor([[0, 1], [2, 2]]), torch.ones(2, 2), 4)
    with pytest.raises(ValueError, match="NaN or inf"):
        Routing.external(torch.tensor([[0, 1]]), torch.tensor([[float("nan"), 1.0]]), 4)
    with pytest.raises(ValueError, match="int32 or int64"):
        Routing.external(torch.tensor([[0.0, 1.0]]), torch.ones(1, 2), 4)
    with pytest.raises(ValueError, match="exceeds num_experts"):
        Routing.external(torch.tensor([[0, 1, 2]]), torch.ones(1, 3), 2)


def test_capture_records_ids():
    cap = RoutingCapture(max_tokens=8, top_k=2)
    r = route(torch.randn(5, 8), _cfg())
    cap.record(r)
    assert torch.equal(cap.captured(), r.ids) and cap.num_tokens == 5
    with pytest.raises(ValueError, match="larger max_tokens"):
        cap.record(route(torch.randn(9, 8), _cfg()))


def test_route_bad_input():
    with pytest.raises(ValueError, match="NaN or inf"):
        route(torch.tensor([[float("nan")] * 8]), _cfg())
    with pytest.raises(ValueError, match=r"must be \[T, 8\]"):
        route(torch.randn(3, 7), _cfg())
    with pytest.raises(ValueError, match="needs correction_bias"):
        route(torch.randn(3, 8), _cfg("sigmoid_bias"))


@pytest.mark.parametrize("routing", ["sigmoid_bias", "sigmoid_grouped"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_correction_bias_is_refused(routing, bad):
    """A NaN bias used to make every choice score NaN and send every token to experts 0 and 1."""
    cfg = _cfg(routing, n_group=4, topk_group=2)
    bias = torch.zeros(8)
    bias[5] = bad
    with pytest.raises(ValueError, match=r"\(e_score_correction_bias\) holds NaN or inf at experts \[5\]"):
        route(torch.randn(3, 8), cfg, bias)
    with pytest.raises(ValueError, match=r"correction_bias must be \[8\], got \(2, 4\)"):
        route(torch.randn(3, 8), cfg, torch.zeros(2, 4))


def test_config_bad_input():
    with pytest.raises(ValueError, match="exceeds num_experts"):
        _cfg(E=4, K=5)
    with pytest.raises(ValueError, match="unknown activation"):
        _cfg(activation="relu")
    with pytest.raises(ValueError, match="unknown routing"):
        _cfg("topk")
    with pytest.raises(ValueError, match="unknown preset 'nope'; known presets: deepseek-v3"):
        MoEConfig.from_preset("nope")


def test_presets_match_published_configs():
    ds = MoEConfig.from_preset("deepseek-v3")
    assert (ds.hidden, ds.intermediate, ds.num_experts, ds.top_k) == (7168, 2048, 256, 8)
    assert (ds.n_group, ds.topk_group, ds.routed_scaling_factor, ds.shared_experts) == (8, 4, 2.5, 1)
    q = MoEConfig.from_preset("qwen3-30b-a3b")
    assert (q.hidden, q.intermediate, q.num_experts, q.top_k) == (2048, 768, 128, 8)
    g = MoEConfig.from_preset("gpt-oss-120b")
    assert (g.hidden, g.intermediate, g.num_experts, g.top_k, g.activation) == (2880, 2880, 128, 4, "swiglu_clamped")
    assert MoEConfig.from_preset("olmoe-1b-7b").norm_topk_prob is False
    from epmoe.config import preset_names

    for name in preset_names():
        MoEConfig.from_preset(name)  # every preset validates
