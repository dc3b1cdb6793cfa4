"""A method is one file: a toy method defined in this test file alone (config, handler, cost, label,
colour, flags) shows up in every list of methods the project has: the CLI's choices, the
evaluation's method lists, the explorer's menu and curves, the cost model and the figures' legend,
and it quantizes a model and round-trips through JSON like the built-in ones."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from dirotq import quantize_, registry
from dirotq.calibration import LayerStats
from dirotq.config import RankedConfig
from dirotq.methods.common import make_quant_linear, quantize_weight, weight_and_bias
from dirotq.registry import MethodCost, MethodSpec

from conftest import calibrated_tiny


@dataclass(frozen=True)
class LargestChannelsConfig(RankedConfig):
    """Keep the r input channels with the largest abs-max in 16-bit, RTN W4A4 for the rest."""

    method: ClassVar[str] = "toy-channels"


def quantize_largest_channels(linear: nn.Linear, stats: Any, config: LargestChannelsConfig, *, rank: int,
                              spec: Any = None, cache: Any = None):
    w, b = weight_and_bias(linear)
    d = w.shape[1]
    keep = torch.argsort(stats.abs_max.double(), descending=True)[:rank]
    down = torch.zeros(d, rank, dtype=torch.float64)
    down[keep, torch.arange(rank)] = 1.0  # c = x[:, keep]
    w_res = w.clone()
    w_res[:, keep] = 0.0
    fields = dict(down=down, up=w[:, keep], project_out=True) if rank else {}
    return make_quant_linear(linear, config, quantize_weight(w_res, None, config), method="toy-channels",
                             rank=rank, bias=b, **fields)


def cost_largest_channels(d: int, o: int, rank: int, config: LargestChannelsConfig) -> MethodCost:
    bits = {"down": 16.0 * d * rank, "up": 16.0 * o * rank} if rank else {}
    return MethodCost(bits, flops16=4.0 * d * rank + 2.0 * rank * o)


@pytest.fixture
def toy():
    spec = registry.register_method(MethodSpec(
        config_cls=LargestChannelsConfig, handler=quantize_largest_channels, cost=cost_largest_channels,
        label="Toy: largest channels in 16-bit", color="#17becf", ranked=True, needs_stats=True))
    yield spec
    registry.unregister(spec.name)
    assert "toy-channels" not in registry.method_names()


def planted(d=128, o=96, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, [5, 70]] *= 30.0
    st = LayerStats.empty(d, sample_tokens=256, seed=seed)
    st.update(x)
    torch.manual_seed(seed)
    return nn.Linear(d, o), st


def test_a_new_method_is_one_file(toy):
    from analysis import costs, figures, session, stats
    from dirotq.cli import build_parser
    from dirotq.eval import protocol

    name = toy.name
    # the CLI: a choice of --method and --methods, listed in the help
    parser = build_parser()
    args = parser.parse_args(["quantize", "--method", name, "--rank", "8"])
    assert args.method == name
    assert parser.parse_args(["evaluate", "--methods", f"rtn,{name}"]).methods == ["rtn", name]
    sub = parser._subparsers._group_actions[0].choices["quantize"]  # noqa: SLF001 - argparse keeps it there
    assert name in sub.format_help()
    # the evaluation's lists, and its configs
    assert name in protocol.default_methods() and name in protocol.sweep_methods()
    assert name in protocol.method_choices()
    cfg = protocol.make_config(name, rank=8, weights="gptq")
    assert isinstance(cfg, LargestChannelsConfig) and cfg.weights == "gptq"
    assert registry.config_from_dict(cfg.to_dict()) == cfg
    # the explorer's menu and its error-vs-rank curves, drawn with the method's label and colour
    assert name in session.methods()
    lin, st = planted()
    cur = stats.error_curves(lin, st, ranks=[0, 2, 8])
    assert name in cur["curves"]
    rtn = cur["references"]["rtn"]["rel_mse"]
    assert cur["curves"][name]["rel_mse"][1] < 0.2 * rtn  # the two planted channels kept 16-bit
    fig = figures.error_vs_rank_figure(cur, 2, "sqnr_db", "layer")
    trace = next(t for t in fig.data if t.name == "Toy: largest channels in 16-bit")
    assert trace.line.color == "#17becf"
    # the cost model: its own cost function, equal to what the module stores
    q = toy.handler(lin, st, LargestChannelsConfig(rank=8), rank=8)
    assert costs.layer_cost(128, 96, name, 8)["bits"] == pytest.approx(q.storage_bits())


def test_a_new_method_quantizes_a_model(toy):
    _, model, stats, x = calibrated_tiny(batches=2, sample_tokens=128)
    m = copy.deepcopy(model)
    report = quantize_(m, LargestChannelsConfig(rank=4), stats, progress=lambda *a: None)
    kinds = {v["kind"]: v["method"] for v in report["layers"].values()}
    assert kinds["w4a4"] == "toy-channels" and kinds.get("w4a16", "w4a16") == "w4a16"
    with torch.no_grad():
        assert torch.isfinite(m(**x).sample).all()


def test_registration_errors_are_named():
    with pytest.raises(ValueError, match="already registered"):
        registry.register_method(registry.get_method("rtn"))
    with pytest.raises(TypeError, match="QuantConfig subclass"):
        registry.register_method(MethodSpec(config_cls=dict, handler=print, cost=print, label="x", color="#000000",
                                            ranked=False, needs_stats=False))
    with pytest.raises(ValueError, match="unknown quantization method 'nope'"):
        registry.get_method("nope")
    with pytest.raises(ValueError, match="has no settings"):
        registry.make_config("rtn", rank=3)  # a typo'd or foreign setting is an error, not ignored
