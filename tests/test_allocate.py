"""Claims about rank allocation by model-output error (dirotq/allocate.py) and the plan policies
built on it (analysis/plans.py)."""

from __future__ import annotations

import pytest
import torch

from analysis import plans
from dirotq.allocate import (allocate, allocate_like_uniform, candidate_ranks, layer_params16, output_error,
                             output_error_curves, record_transformer_calls)
from dirotq.calibration import calibrate
from dirotq.eval.protocol import make_config
from dirotq.models import TargetSpec, get_adapter

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_allocate_spends_where_the_error_drops_most_per_cost():
    curves = {"cheap_flat": {0: 1.0, 8: 0.99, 16: 0.98},
              "steep": {0: 1.0, 8: 0.5, 16: 0.4},
              "late": {0: 1.0, 8: 1.0, 16: 0.1}}  # flat, then a big drop: the steepest jump reaches it
    cost = lambda name, r: float(r)  # noqa: E731
    plan = allocate(curves, cost, budget=24)
    assert plan == {"cheap_flat": 0, "steep": 8, "late": 16}
    assert sum(cost(n, r) for n, r in plan.items()) <= 24
    assert allocate(curves, cost, budget=0) == {"cheap_flat": 0, "steep": 0, "late": 0}


def test_allocation_spends_at_most_the_budget_of_a_uniform_rank():
    targets = {n: TargetSpec(n, "w4a4", n, 0, n, d, o) for n, d, o in (("a", 64, 64), ("b", 64, 256), ("c", 128, 64))}
    # only "b" moves the output much: rank elsewhere buys almost nothing
    curves = {n: {r: 10.0 / (1 + r) if n == "b" else 1.0 - 1e-4 * r for r in candidate_ranks(s.in_features)}
              for n, s in targets.items()}
    for method in ("dirotq-lr", "dirotq", "svdquant"):
        cfg = make_config(method, rank=0)
        plan = allocate_like_uniform(curves, targets, cfg, 16)

        def cost(name, r, cfg=cfg):
            return layer_params16(targets[name], cfg, r)

        assert plans.plan_params16(plan, cost) <= plans.plan_params16(plans.fixed_plan(targets, 16), cost) + 1e-9
        assert plan["b"] > 16 and plan["b"] > max(plan["a"], plan["c"])  # the sensitive layer gets more


@pytest.fixture(scope="module")
def tiny_pipe():
    from tiny_pipelines import build_tiny_pixart_pipeline

    pipe = build_tiny_pixart_pipeline(seed=0)
    stats = calibrate(pipe, ["a red circle", "a blue square on the left", "a green star"], num_inference_steps=3,
                      sample_tokens=64, progress=lambda *a: None)
    return pipe, stats


def test_recorded_calls_reproduce_the_transformer_outputs(tiny_pipe):
    pipe, _ = tiny_pipe
    step = type(pipe.scheduler).step
    calls = record_transformer_calls(pipe, ["a red circle", "a green star"], num_inference_steps=3, steps=[0, 2])
    assert len(calls) == 2 and pipe.scheduler.step.__func__ is step  # the scheduler is restored
    args, kwargs = calls[0]
    latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    assert latents.shape[0] == 4  # 2 prompts × classifier-free guidance
    with torch.no_grad():
        again = pipe.transformer(*args, **{**kwargs, "return_dict": False})[0]
    assert output_error([again.double()], [again.double()]) == 0.0


def test_the_recording_knows_what_the_sampler_steps_with(tiny_pipe):
    """The tiny PixArt returns a learned variance beside the noise and runs guidance in one batch:
    the fitted view keeps the noise channels and mixes the halves with the pipeline's guidance, and
    through it the recorded outputs give exactly what the scheduler received."""
    from dirotq.allocate import SamplerView

    pipe, _ = tiny_pipe
    seen = []
    orig = pipe.scheduler.step

    def spy(*a, **kw):
        seen.append(a[0].detach().double().clone())
        return orig(*a, **kw)

    pipe.scheduler.step = spy
    try:
        calls = record_transformer_calls(pipe, ["a red circle", "a green star"], num_inference_steps=3,
                                         pipe_kwargs={"guidance_scale": 3.0})
    finally:
        del pipe.scheduler.step
    latent = pipe.transformer.config.in_channels
    assert pipe.transformer.config.out_channels == 2 * latent  # the premise: a learned variance
    view = calls.view
    assert view.call_batch == 4 and view.keep == latent and view.guidance == pytest.approx(3.0, rel=1e-6)
    with torch.no_grad():
        for (args, kwargs), sampled in zip(calls, seen):
            out = pipe.transformer(*args, **{**kwargs, "return_dict": False})[0].double()
            assert torch.allclose(view(out), sampled, rtol=1e-5, atol=1e-6)
    # merged calls: the view mixes each recorded call's own halves
    two = torch.cat([torch.full((4, 2 * latent, 2, 2), float(i)) for i in range(2)])
    two[1::4] += 1.0  # the second sample of each call's unconditional half
    mixed = view(two)
    assert mixed.shape == (4, latent, 2, 2) and torch.equal(mixed[:2], torch.tensor([0.0, 1 - 3.0]).view(2, 1, 1, 1)
                                                            .expand(2, latent, 2, 2))
    assert SamplerView(call_batch=4)(two) is two


def test_a_sampler_view_is_fitted_only_where_it_reproduces_the_sampler_input():
    from dirotq.allocate import fit_sampler_view

    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(4, 6, 3, 3, generator=g) for _ in range(3)]
    same = fit_sampler_view(outs, [o.clone() for o in outs])  # FLUX-like: the output is what is stepped with
    assert same is not None and same.keep is None and same.guidance is None
    # PixArt-like: half the channels, then uncond + g·(cond − uncond) with the unconditional half first
    guided = [o[:2, :3] + 7.5 * (o[2:, :3] - o[:2, :3]) for o in outs]
    fitted = fit_sampler_view(outs, guided)
    assert fitted.keep == 3 and fitted.guidance == pytest.approx(7.5)
    assert fit_sampler_view(outs, [torch.tanh(x) for x in guided]) is None  # not a guidance mix
    assert fit_sampler_view(outs, [o[:, :, :2] for o in outs]) is None  # a spatial crop is no view
    assert fit_sampler_view(outs, outs[:2]) is None and fit_sampler_view([], []) is None


def test_output_error_curves_fall_with_rank_and_leave_the_model_unchanged(tiny_pipe):
    pipe, stats = tiny_pipe
    model = pipe.transformer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = {n: s for n, s in get_adapter(model).targets(model).items() if s.kind == "w4a4"}
    some = dict(list(targets.items())[:3])
    calls = record_transformer_calls(pipe, ["a red circle"], num_inference_steps=3)
    # on the raw transformer output (a plain list of calls) and on what the sampler steps with
    for recorded, exact in ((list(calls), 1e-6), (calls, 1e-4)):
        curves = output_error_curves(model, recorded, stats, lambda r: make_config("dirotq", rank=r), targets=some)
        assert set(curves) == set(some)
        for name, curve in curves.items():
            d = some[name].in_features
            assert set(curve) == set(candidate_ranks(d)) and curve[0] > 0
            # rank d: that layer is exactly its 16-bit self, up to float32 rounding (which guidance
            # amplifies 4.5× in the sampler's view)
            assert curve[d] < exact * curve[0]
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_budget_matched_policies_stay_within_the_budget():
    targets = {f"l{i}": TargetSpec(f"l{i}", "w4a4", f"l{i}", i, "x", 64, 64) for i in range(4)}
    cfg = make_config("dirotq-lr", rank=0)

    def cost(name, r):
        return layer_params16(targets[name], cfg, r)

    curves = {n: {r: (i + 1) / (1 + r) for r in candidate_ranks(64)} for i, n in enumerate(targets)}
    limit = plans.plan_params16(plans.fixed_plan(targets, 16), cost)
    plan = plans.match_budget(lambda e: plans.fill_plan("error budget", e, targets, layer_curve=curves.get),
                              cost, limit, 1e-6, 1.0, increasing=False)
    assert 0 < plans.plan_params16(plan, cost) <= limit
    with pytest.raises(ValueError, match="unknown policy"):
        plans.fill_plan("magic", 1, targets)


def test_output_error_plan_spends_the_uniform_budget_on_the_sensitive_layers(tiny_pipe):
    from dirotq.allocate import layer_error_curves, output_error_plan

    pipe, stats = tiny_pipe
    cfg = make_config("dirotq-lr", rank=8)
    plan, report = output_error_plan(pipe, stats, cfg, 8, ["a red circle", "a green star"], num_inference_steps=4)
    targets = {n: s for n, s in get_adapter(pipe.transformer).targets(pipe.transformer).items() if s.kind == "w4a4"}
    resolved = plan.resolve(get_adapter(pipe.transformer).targets(pipe.transformer))
    assert {n: resolved[n] for n in targets} == report["ranks"]
    assert 0 < report["spent_params16"] <= report["budget_params16"]
    # measured where the image is made: the noise channels, guidance applied (the pipeline's 4.5)
    assert report["sensitivity_on"] == "what the sampler steps with (first 4 channels, guidance 4.5)"
    # the layers that move the output most per parameter hold more rank than the least sensitive ones
    gain = report["gain"]
    top = max(targets, key=lambda n: gain[n] / (targets[n].in_features + targets[n].out_features))
    low = min(targets, key=lambda n: gain[n])
    assert report["ranks"][top] >= report["ranks"][low]
    curves = layer_error_curves(pipe.transformer, stats, lambda r: make_config("dirotq-lr", rank=r),
                                targets=dict(list(targets.items())[:2]))
    for curve in curves.values():
        ranks = sorted(curve)
        assert curve[ranks[-1]] < 1e-6 and curve[0] > curve[ranks[1]]  # rank d is exact; rank lowers the error


def test_tied_allocation_gives_each_shared_input_group_one_rank_within_the_budget():
    """``tie``: the layers of a unit share one rank, chosen on their summed curves and costs (so a
    fused q/k/v keeps one activation side), and the budget of the uniform rank still holds."""
    from dirotq.allocate import shared_input_units

    spec = lambda n, group, block, d, o: TargetSpec(n, "w4a4", group, block, n, d, o)  # noqa: E731
    targets = {n: spec(n, g, b, 64, o) for n, g, b, o in (
        ("0.q", "0.q", 0, 64), ("0.k", "0.q", 0, 64), ("0.v", "0.q", 0, 64), ("0.ff", "0.ff", 0, 256),
        ("1.q", "1.q", 1, 64), ("1.k", "1.q", 1, 64), ("1.v", "1.q", 1, 64), ("1.ff", "1.ff", 1, 256))}
    # block 0's v and block 1's ff move the output; untied, v alone would take the rank
    curves = {n: {r: (8.0 if n in ("0.v", "1.ff") else 0.1) / (1 + r) for r in candidate_ranks(64)} for n in targets}
    cfg = make_config("dirotq-lr", rank=0)
    untied = allocate_like_uniform(curves, targets, cfg, 16)
    tied = allocate_like_uniform(curves, targets, cfg, 16, tie=shared_input_units(targets))
    assert untied["0.v"] > untied["0.q"]
    assert tied["0.q"] == tied["0.k"] == tied["0.v"] > 0 and tied["1.q"] == tied["1.k"] == tied["1.v"]
    assert tied["1.ff"] > tied["1.q"]

    def cost(name, r):
        return layer_params16(targets[name], cfg, r)

    fixed = plans.plan_params16(plans.fixed_plan(targets, 16), cost)
    assert plans.plan_params16(tied, cost) <= fixed + 1e-9 and plans.plan_params16(untied, cost) <= fixed + 1e-9


def test_weight_only_layers_compete_for_the_uniform_budget_with_their_branches():
    """Weight-only targets in the curves may take a 16-bit branch ((d + o) per rank), paid from the
    budget the fixed plan spends on the W4A4 targets; the fixed plan gives them none."""
    targets = {"a": TargetSpec("a", "w4a4", "a", 0, "a", 64, 64), "b": TargetSpec("b", "w4a4", "b", 0, "b", 64, 64),
               "down": TargetSpec("down", "w4a16", "down", 0, "down", 256, 64)}
    for method in ("dirotq", "dirotq-lr"):
        cfg = make_config(method, rank=0)
        assert layer_params16(targets["down"], cfg, 0) == 0 and layer_params16(targets["down"], cfg, 8) == (256 + 64) * 8
        w4a4_only = {n: {r: 1.0 / (1 + r) for r in candidate_ranks(64)} for n in ("a", "b")}
        budget = sum(layer_params16(targets[n], cfg, 32) for n in ("a", "b"))
        # the weight-only layer moves the output most: it takes a branch, within the same budget
        curves = {**w4a4_only, "down": {r: 50.0 / (1 + r) for r in candidate_ranks(256)}}
        plan = allocate_like_uniform(curves, targets, cfg, 32)
        spent = sum(layer_params16(targets[n], cfg, r) for n, r in plan.items())
        assert plan["down"] > 0 and 0 < spent <= budget
        assert allocate_like_uniform(w4a4_only, targets, cfg, 32) == {"a": 32, "b": 32}  # equal curves: fixed
    with pytest.raises(ValueError, match="PCA method"):
        layer_params16(targets["down"], make_config("svdquant", rank=0), 8)


def test_output_error_plan_with_weight_only_ranks(tiny_pipe):
    from dirotq.allocate import output_error_plan

    pipe, stats = tiny_pipe
    all_targets = get_adapter(pipe.transformer).targets(pipe.transformer)
    weight_only = [n for n, s in all_targets.items() if s.kind != "w4a4"]
    assert weight_only
    cfg = make_config("dirotq", rank=8)
    plain_plan, plain = output_error_plan(pipe, stats, cfg, 8, ["a red circle"], num_inference_steps=4)
    plan, report = output_error_plan(pipe, stats, cfg, 8, ["a red circle"], num_inference_steps=4,
                                     weight_only_ranks=True)
    assert report["weight_only_ranks"] and set(weight_only) <= set(report["ranks"]) <= set(all_targets)
    assert set(weight_only) <= set(report["gain"])
    assert report["budget_params16"] == plain["budget_params16"]  # the fixed plan's budget either way
    assert 0 < report["spent_params16"] <= report["budget_params16"]
    resolved = plan.resolve(all_targets)
    assert all(resolved[n] == report["ranks"][n] for n in report["ranks"])
    assert all(plain_plan.resolve(all_targets)[n] == 0 for n in weight_only)
    with pytest.raises(ValueError, match="PCA method"):
        output_error_plan(pipe, stats, make_config("svdquant", rank=8), 8, ["a red circle"], num_inference_steps=4,
                          weight_only_ranks=True)


def test_every_layer_is_offered_ranks_1_2_4_where_its_curve_bends_most(tiny_pipe):
    """The allocation grid starts at rank 1 for W4A4 layers and weight-only branches alike (one
    direction is an eighth of rank 8's cost), and each small rank is a real point of the curve."""
    from dirotq.allocate import RANK_GRID, layer_error_curves

    assert RANK_GRID[:5] == (0, 1, 2, 4, 8) and candidate_ranks(24) == [0, 1, 2, 4, 8, 16, 24]
    pipe, stats = tiny_pipe
    targets = get_adapter(pipe.transformer).targets(pipe.transformer)
    wo = next(n for n, s in targets.items() if s.kind != "w4a4")
    w4a4 = next(n for n, s in targets.items() if s.kind == "w4a4")
    for method in ("dirotq-lr", "dirotq"):
        curves = layer_error_curves(pipe.transformer, stats, lambda r, m=method: make_config(m, rank=r),
                                    targets={n: targets[n] for n in (wo, w4a4)}, weight_only=True)
        for n in (wo, w4a4):
            assert sorted(curves[n]) == candidate_ranks(targets[n].in_features)
            # each small rank changes the layer's error (a branch / a 16-bit head really runs) and
            # rank 8 keeps more than rank 1
            assert all(0 < curves[n][r] != curves[n][0] for r in (1, 2, 4)), (method, n, curves[n])
            assert curves[n][8] < curves[n][1]
