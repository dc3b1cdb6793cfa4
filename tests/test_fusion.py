"""Shared-input fusion (dirotq/fusion.py): layers that read one tensor run as one quantized layer,
compute what they computed apart, run once per input (eager, compiled, CUDA-graph-free Triton
path), split back bit for bit, and leave checkpoints in the per-layer form."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from conftest import calibrated_tiny
from test_compile import _assert_fake_matches, _compiled_graphs
from dirotq import fusion, load_quantized, quantize_, save_quantized
from dirotq.config import RankPlan
from dirotq.methods import DiRotQLRConfig, QuaRotConfig
from dirotq.modules import QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module", params=["pixart", "flux"])
def quantized(request):
    """(family, quantized tiny model, inputs): DiRotQ-LR r16, format C, calibrated."""
    adapter, model, stats, example = calibrated_tiny(request.param)
    quantize_(model, DiRotQLRConfig(rank=16, scale_format="int_ratio"), stats, adapter=adapter, measure_error=False,
              progress=lambda *a: None)
    return request.param, model, example


def _out(model, example):
    with torch.no_grad():
        return model(**example, return_dict=False)[0]


def _runs(model):
    stats = fusion.fusion_stats(model).values()
    return sum(s["calls"] for s in stats), sum(s["runs"] for s in stats), sum(s["members"] for s in stats)


def test_fused_model_computes_the_same_and_runs_each_group_once(quantized):
    family, model, example = quantized
    model = copy.deepcopy(model)
    before = _out(model, example)
    report = fusion.fuse_shared_inputs(model)
    # every attention's q/k/v (and FLUX's joint add_q/k/v, single-block proj_mlp + q/k/v) is one layer
    expected = {"pixart": 2, "flux": 6}[family]
    assert len(report["fused"]) == expected and not report["not_fused"]
    if family == "flux":
        single = next(m for n, m in report["fused"].items() if n.startswith("single_transformer_blocks.0"))
        assert {n.rsplit(".", 1)[-1] for n in single} == {"proj_mlp", "to_q", "to_k", "to_v"}
    assert isinstance(model.transformer_blocks[0].attn1.to_q if family == "pixart"
                      else model.transformer_blocks[0].attn.to_q, fusion.SharedInputSlice)
    after = _out(model, example)
    assert torch.equal(after, before)
    calls, runs, members = _runs(model)
    assert calls == members and runs == len(report["fused"])
    assert fusion.fuse_shared_inputs(model)["fused"] == {}  # idempotent
    from dirotq.modules import backend_description

    assert f"({expected} of them fused from {members} layers that share an input)" in backend_description(model)


def test_unfusing_restores_the_layers_bit_for_bit(quantized):
    _, model, example = quantized
    fused = copy.deepcopy(model)
    fusion.fuse_shared_inputs(fused)
    assert fusion.unfuse_shared_inputs(fused) > 0
    a, b = model.state_dict(), fused.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for (n, m), (_, m2) in zip(model.named_modules(), fused.named_modules()):
        if isinstance(m, QuantLinear):
            assert type(m2) is QuantLinear and m2.meta == m.meta and m2.rank == m.rank, n


def test_a_member_called_with_another_input_gets_its_own_output(quantized):
    family, model, _ = quantized
    model = copy.deepcopy(model)
    attn = model.transformer_blocks[0].attn1 if family == "pixart" else model.transformer_blocks[0].attn
    ref_q, ref_k = copy.deepcopy(attn.to_q), copy.deepcopy(attn.to_k)
    fusion.fuse_shared_inputs(model)
    x1, x2 = torch.randn(2, 5, attn.to_q.in_features), torch.randn(2, 5, attn.to_q.in_features)
    with torch.no_grad():
        q = attn.to_q(x1)
        k = attn.to_k(x2)  # not the input q saw: the fused layer runs again
        q_again = attn.to_q(x1)
        x1.mul_(2.0)  # same memory, changed in place: not served from the cache
        k_changed = attn.to_k(x1)
        assert torch.equal(q, ref_q(x1 / 2)) and torch.equal(k, ref_k(x2)) and torch.equal(q_again, q)
        assert torch.equal(k_changed, ref_k(x1))
    with torch.inference_mode():  # inference tensors have no version counter
        x3 = torch.randn(2, 5, attn.to_q.in_features)
        assert torch.equal(attn.to_q(x3), ref_q(x3)) and torch.equal(attn.to_k(x3), ref_k(x3))


def test_only_members_that_agree_are_fused():
    """A rank plan that gives to_v another rank fuses q and k only, and says why v is not fused."""
    adapter, model, stats, example = calibrated_tiny("pixart")
    plan = RankPlan({"_default": 16, "transformer_blocks.0.attn1.to_v": 32})
    quantize_(model, DiRotQLRConfig(rank=plan), stats, adapter=adapter, measure_error=False, progress=lambda *a: None)
    before = _out(model, example)
    report = fusion.fuse_shared_inputs(model)
    assert report["fused"]["transformer_blocks.0.attn1.fused__to_q__to_k"] == [
        "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k"]
    assert "rank" in report["not_fused"]["transformer_blocks.0.attn1.to_v"]
    assert type(model.transformer_blocks[0].attn1.to_v) is QuantLinear
    assert torch.equal(_out(model, example), before)


@pytest.mark.parametrize("form", ["shared inputs", "inference"])
def test_checkpoints_hold_the_per_layer_form_and_load_either_way(quantized, tmp_path, form):
    """Saving a fused model (shared inputs, or also the GELUs in the up-projections' epilogues: the
    inference form) writes the per-layer checkpoint, byte for byte, and it loads unfused or fused."""
    _, model, example = quantized
    model = copy.deepcopy(model)
    save_quantized(model, tmp_path / "plain")
    fuse, load_kwargs = {"shared inputs": (fusion.fuse_shared_inputs, {"fuse_shared_inputs": True}),
                         "inference": (fusion.fuse_for_inference,
                                       {"fuse_shared_inputs": True, "fuse_activations": True})}[form]
    fuse(model)
    save_quantized(model, tmp_path / "from_fused")
    activations_fused = any(isinstance(m, fusion.ProjectionWithActivation) for m in model.modules())
    assert fusion.has_fused_layers(model) and activations_fused == (form == "inference")  # fused again after the save
    files = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "from_fused").iterdir())
    # config.json carries the content hash of every tensor; safetensors' metadata order is not fixed
    assert (tmp_path / "plain" / "config.json").read_text() == (tmp_path / "from_fused" / "config.json").read_text()
    for name in files:
        if name.endswith(".safetensors"):
            a, b = load_file(tmp_path / "plain" / name), load_file(tmp_path / "from_fused" / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    loaded = load_quantized(tmp_path / "from_fused", **load_kwargs)
    assert fusion.has_fused_layers(loaded)
    assert any(isinstance(m, fusion.ProjectionWithActivation) for m in loaded.modules()) == (form == "inference")
    assert torch.equal(_out(loaded, example), _out(model, example))
    plain = load_quantized(tmp_path / "plain")
    assert not fusion.has_fused_layers(plain) and torch.equal(_out(plain, example), _out(model, example))


def test_a_deep_copy_of_a_fused_model_runs_its_own_fused_layers(quantized):
    _, model, example = quantized
    model = copy.deepcopy(model)
    fusion.fuse_shared_inputs(model)
    twin = copy.deepcopy(model)
    slices = [m for m in twin.modules() if isinstance(m, fusion.SharedInputSlice)]
    own = {id(m) for m in twin.modules() if isinstance(m, fusion.FusedQuantLinear)}
    assert slices and all(id(s.fused) in own for s in slices)
    assert torch.equal(_out(twin, example), _out(model, example))


def test_triton_kernels_run_the_fused_layer(monkeypatch):
    """Under the interpreter the fused layer's GEMM (one launch over q/k/v rows) gives the members'
    kernel outputs."""
    pytest.importorskip("triton")
    adapter, model, stats, _ = calibrated_tiny("pixart", batches=1)
    targets = [n for n in adapter.targets(model) if n.startswith("transformer_blocks.0.attn1.to_")
               and not n.endswith("out.0")]
    quantize_(model, DiRotQLRConfig(rank=16, scale_format="int_ratio"), stats, adapter=adapter, targets=targets,
              measure_error=False, progress=lambda *a: None)
    attn = model.transformer_blocks[0].attn1
    members = [attn.to_q, attn.to_k, attn.to_v]
    for m in members:
        m.backend = "triton"
    x = torch.randn(24, attn.to_q.in_features)
    with torch.no_grad():
        apart = torch.cat([m(x) for m in members], dim=-1)
        fusion.fuse_shared_inputs(model)
        fused = attn.fused__to_q__to_k__to_v
        assert fused.backend == "triton"
        together = torch.cat([attn.to_q(x), attn.to_k(x), attn.to_v(x)], dim=-1)
    assert fused._kernel_backend_used == "triton" and fused.runs == 1
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)


def test_a_fused_model_compiles_as_one_graph_and_shares_at_run_time():
    adapter, model, stats, example = calibrated_tiny("flux", batches=1)
    quantize_(model, QuaRotConfig(hadamard="block"), stats, adapter=adapter, measure_error=False,
              progress=lambda *a: None)
    eager = _out(model, example)
    report = fusion.fuse_shared_inputs(model)
    out, graphs = _compiled_graphs(model, example)
    assert len(graphs) == 1  # fullgraph: a break would have raised
    member_ops = [n for n in graphs[0].graph.nodes if "quant_linear_member" in str(n.target)]
    assert len(member_ops) == sum(len(v) for v in report["fused"].values())
    assert torch.equal(out, eager)
    calls, runs, members = _runs(model)
    assert calls == members and runs == len(report["fused"])  # one fused run per group in the graph too


def test_the_member_op_and_its_fake_implementation(quantized):
    _, model, _ = quantized
    model = copy.deepcopy(model)
    fusion.fuse_shared_inputs(model)
    s = next(m for m in model.modules() if isinstance(m, fusion.SharedInputSlice))
    x = torch.randn(3, 4, s.in_features)
    op = torch.ops.dirotq.quant_linear_member
    args = (x, s.fused.stored_weight(), s.index, s.start, s.stop)
    y = op(*args)
    assert torch.equal(y, s(x))
    _assert_fake_matches(op.default, args, y)  # not opcheck: tests/test_compile.py says why


def test_a_lora_on_fused_members_equals_the_lora_on_the_layers():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    adapter, model, stats, example = calibrated_tiny("pixart", batches=1)
    quantize_(model, DiRotQLRConfig(rank=16), stats, adapter=adapter, measure_error=False, progress=lambda *a: None)
    fused = copy.deepcopy(model)
    fusion.fuse_shared_inputs(fused)
    outs = []
    for m in (model, fused):
        peft_model = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v"]))
        layers = [layer for layer in peft_model.modules() if isinstance(layer, LoraLayer)]
        assert len(layers) == 12  # both attentions' q/k/v in both blocks (attn2's K/V: 16-bit nn.Linear)
        slices = [layer for layer in layers if isinstance(layer.get_base_layer(), fusion.SharedInputSlice)]
        assert len(slices) == (6 if m is fused else 0)
        g = torch.Generator().manual_seed(0)
        for layer in layers:
            for lin in (layer.lora_A["default"], layer.lora_B["default"]):
                with torch.no_grad():
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.3)
        outs.append(_out(peft_model, example))
    assert torch.equal(outs[0], outs[1])


def test_a_member_without_a_bias_fuses_and_comes_back_without_one(quantized):
    family, model, example = quantized
    model = copy.deepcopy(model)
    attn = model.transformer_blocks[0].attn1 if family == "pixart" else model.transformer_blocks[0].attn
    attn.to_k.bias = None  # the fused bias holds zeros in its columns
    before = _out(model, example)
    fusion.fuse_shared_inputs(model)
    assert torch.equal(_out(model, example), before)
    fusion.unfuse_shared_inputs(model)
    assert attn.to_k.bias is None and attn.to_q.bias is not None
    assert torch.equal(_out(model, example), before)
