"""Configs and rank plans: JSON round-trip and validation that names the field."""

import pytest

from dirotq.config import RankPlan
from dirotq.methods import (DiRotQConfig, DiRotQLRConfig, QuaRotConfig, RTNConfig, SmoothQuantConfig, SVDQuantConfig,
                            W4A16Config)
from dirotq.registry import config_from_dict
from dirotq.registry import method_names as registered_methods


def test_every_method_round_trips_through_json():
    configs = [RTNConfig(), W4A16Config(), SmoothQuantConfig(alpha=0.6), QuaRotConfig(hadamard="block"),
               SVDQuantConfig(rank=16), DiRotQConfig(rank=RankPlan({"_default": 64, "blocks.0.q": 128})),
               DiRotQLRConfig(rank=8, basis="hsvd"), DiRotQConfig.paper()]
    assert {c.method for c in configs} == set(registered_methods())
    for c in configs:
        assert config_from_dict(c.to_dict()) == c


def test_paper_preset():
    c = DiRotQConfig.paper()
    assert c.act_symmetric is False and c.weights == "gptq" and c.gptq_act_order
    assert c.rank.rank_for("x", 1152) == 192


def test_rank_plan_lookup_and_json(tmp_path):
    plan = RankPlan({"_default": 32, "a": 64})
    assert plan.rank_for("a") == 64 and plan.rank_for("b") == 32
    plan.save(tmp_path / "plan.json")
    assert RankPlan.load(tmp_path / "plan.json") == plan


@pytest.mark.parametrize("bad, match", [
    ({"_default": -1}, "≥ 0"),
    ({"_default": 1.5}, "int"),
    ({"_default": "big"}, "int"),
])
def test_bad_rank_plans_are_named(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        RankPlan(bad)


def test_rank_plan_is_resolved_against_a_model_once():
    from dirotq.models import TargetSpec

    targets = {n: TargetSpec(n, kind, n, 0, n, d, d) for n, kind, d in
               (("a", "w4a4", 64), ("b", "w4a4", 128), ("ff", "w4a16", 256))}
    assert RankPlan({"_default": 64, "b": 100}).resolve(targets) == {"a": 64, "b": 100, "ff": 0}
    assert RankPlan({"_default": "paper"}).resolve(targets) == {"a": 64, "b": 64, "ff": 0}
    with pytest.raises(ValueError, match="exceeds its input width 64"):
        RankPlan({"_default": 100}).resolve(targets)
    with pytest.raises(ValueError, match="another model"):
        RankPlan({"zzz": 4}).resolve(targets)
    # _default sizes the W4A4 layers; a weight-only layer gets a 16-bit branch only where it is named
    assert RankPlan({"_default": 8, "ff": 16}).resolve(targets) == {"a": 8, "b": 8, "ff": 16}
    assert RankPlan({"ff": 0}).resolve(targets) == {"a": 0, "b": 0, "ff": 0}
    assert RankPlan({"_default": "paper", "ff": "paper"}).resolve(targets)["ff"] == 64  # d/8 rounded up to 64
    with pytest.raises(ValueError, match="exceeds its input width 256"):
        RankPlan({"ff": 512}).resolve(targets)
    with pytest.raises(ValueError, match="not valid JSON"):
        RankPlan.from_json("{nope")
    with pytest.raises(FileNotFoundError):
        RankPlan.load("/nonexistent/plan.json")


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="weights"):
        RTNConfig(weights="awq")
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuantConfig(alpha=2)
    with pytest.raises(ValueError, match="tail_rotation"):
        DiRotQConfig(tail_rotation="random")
    with pytest.raises(ValueError, match="unknown quantization method"):
        config_from_dict({"method": "fp8"})
    with pytest.raises(ValueError, match="unknown fields"):
        config_from_dict({"method": "rtn", "rank": 3})
