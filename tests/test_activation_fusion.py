"""Activation fusion (dirotq/fusion.py, "Activation fusion"): the GELU after an MLP's quantized
up-projection runs in that projection's GEMM epilogue. The fused model computes what the unfused one
did (bit for bit on the reference path, within float32 rounding through the Triton kernels), in
eager and compiled runs, with or without shared-input fusion in either order; fusion undoes bit for
bit, checkpoints keep the unfused form, and a LoRA on a layer whose epilogue activates is refused."""

import copy

import pytest
import torch
from torch import nn

from conftest import calibrated_tiny
from test_compile import _compiled_graphs
from test_fusion import _out, quantized  # noqa: F401 (quantized: the same module-scoped fixture)
from dirotq import fusion, quantize_
from dirotq.methods import DiRotQLRConfig, QuaRotConfig
from dirotq.modules import QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# the activation modules fused in each tiny model: PixArt's ff.net.0 per block; FLUX's ff.net.0 and
# ff_context.net.0 per double block and act_mlp (after proj_mlp) per single block
EXPECTED = {"pixart": {"transformer_blocks.0.ff.net.0": "transformer_blocks.0.ff.net.0.proj",
                       "transformer_blocks.1.ff.net.0": "transformer_blocks.1.ff.net.0.proj"},
            "flux": {**{f"transformer_blocks.{i}.{ff}.net.0": f"transformer_blocks.{i}.{ff}.net.0.proj"
                        for i in range(2) for ff in ("ff", "ff_context")},
                     **{f"single_transformer_blocks.{i}.act_mlp": f"single_transformer_blocks.{i}.proj_mlp"
                        for i in range(2)}}}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_fused_model_computes_the_same_with_the_activation_in_the_epilogue(quantized):
    family, model, example = quantized
    model = copy.deepcopy(model)
    before, keys = _out(model, example), set(model.state_dict())
    report = fusion.fuse_activations(model)
    assert report == {"fused": EXPECTED[family], "not_fused": {}}
    for act, proj in EXPECTED[family].items():
        site = model.get_submodule(act)
        layer = model.get_submodule(proj)
        assert isinstance(site, fusion.ProjectionWithActivation if proj.startswith(act + ".")
                          else fusion.ActivationInEpilogue)
        assert layer.epilogue_activation == ("gelu_tanh", 0, layer.out_features)
        assert fusion.output_activation(layer) == "gelu_tanh"
    assert set(model.state_dict()) == keys  # ff.net.0.proj keeps its name
    assert torch.equal(_out(model, example), before)  # the reference path: the same GELU on the same values
    assert fusion.fuse_activations(model)["fused"] == {}  # idempotent
    from dirotq.modules import backend_description

    assert backend_description(model).endswith(f"; {len(EXPECTED[family])} apply their gelu_tanh in the GEMM epilogue")
    assert fusion.has_fused_layers(model)
    assert fusion.unfuse_activations(model) == len(EXPECTED[family])
    assert not fusion.has_fused_layers(model)
    assert all(type(model.get_submodule(a)).__name__ == "GELU" for a in EXPECTED[family])
    assert all(model.get_submodule(p).epilogue_activation is None for p in EXPECTED[family].values())
    assert torch.equal(_out(model, example), before)


def test_shared_input_and_activation_fusion_compose_in_either_order(quantized):
    """FLUX's single blocks fuse proj_mlp with q/k/v: the GELU then covers proj_mlp's columns of the
    fused layer only, whichever fusion ran first, and survives the other being undone."""
    family, model, example = quantized
    before, state = _out(model, example), _state(model)
    first = copy.deepcopy(model)
    fusion.fuse_activations(first)
    fusion.fuse_shared_inputs(first)
    second = copy.deepcopy(model)
    report = fusion.fuse_for_inference(second)
    assert report["activations"]["fused"] == EXPECTED[family] and report["shared_inputs"]["fused"]
    for m in (first, second):
        assert torch.equal(_out(m, example), before)
    if family == "flux":
        proj_mlp = second.single_transformer_blocks[0].proj_mlp
        assert isinstance(proj_mlp, fusion.SharedInputSlice)
        assert proj_mlp.fused.epilogue_activation == ("gelu_tanh", proj_mlp.start, proj_mlp.stop)
        q = second.single_transformer_blocks[0].attn.to_q
        assert fusion.output_activation(q) is None and fusion.output_activation(proj_mlp) == "gelu_tanh"
    fusion.unfuse_shared_inputs(second)  # the activation goes back to the member layer
    assert fusion.has_fused_layers(second) and torch.equal(_out(second, example), before)
    fusion.unfuse_activations(second)
    after = _state(second)
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert all(type(m) is not QuantLinear or m.epilogue_activation is None for m in second.modules())


def test_what_cannot_be_fused_is_left_as_it_was_with_the_reason():
    adapter, model, stats, example = calibrated_tiny("flux", batches=1)
    targets = [n for n in adapter.targets(model) if not n.startswith("single_transformer_blocks.1.proj_mlp")]
    quantize_(model, QuaRotConfig(hadamard="block"), stats, adapter=adapter, targets=targets, measure_error=False,
              progress=lambda *a: None)
    model.single_transformer_blocks[0].act_mlp = nn.SiLU()
    before = _out(model, example)
    report = fusion.fuse_activations(model)
    assert "SiLU" in report["not_fused"]["single_transformer_blocks.0.act_mlp"]
    assert "not a quantized layer" in report["not_fused"]["single_transformer_blocks.1.act_mlp"]
    assert isinstance(model.single_transformer_blocks[1].act_mlp, nn.GELU)  # left in place
    assert len(report["fused"]) == 4 and torch.equal(_out(model, example), before)


def test_a_model_with_activations_in_epilogues_compiles_as_one_graph():
    adapter, model, stats, example = calibrated_tiny("flux", batches=1)
    quantize_(model, QuaRotConfig(hadamard="block"), stats, adapter=adapter, measure_error=False,
              progress=lambda *a: None)
    eager = _out(model, example)
    fusion.fuse_for_inference(model)
    out, graphs = _compiled_graphs(model, example)
    assert len(graphs) == 1  # fullgraph: a break would have raised
    gelus = [n for n in graphs[0].graph.nodes if "gelu" in str(n.target)]
    assert not gelus  # every GELU of the model now runs inside a quantized layer's op
    assert torch.equal(out, eager)


def test_triton_kernels_apply_the_activation_in_the_epilogue():
    pytest.importorskip("triton")
    adapter, model, stats, _ = calibrated_tiny("pixart", batches=1)
    quantize_(model, DiRotQLRConfig(rank=16, scale_format="int_ratio"), stats, adapter=adapter,
              targets=["transformer_blocks.0.ff.net.0.proj"], measure_error=False, progress=lambda *a: None)
    ff = model.transformer_blocks[0].ff.net[0]
    ff.proj.backend = "triton"
    x = torch.randn(2, 40, ff.proj.in_features)
    with torch.no_grad():
        apart = ff(x)
        fusion.fuse_activations(model)
        fused = model.transformer_blocks[0].ff.net[0]
        assert isinstance(fused, fusion.ProjectionWithActivation)
        together = fused(x)
    assert fused.proj._kernel_backend_used == "triton"
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,targets", [("pixart", ["ff.net.0.proj"]), ("flux", ["proj_mlp", "ff.net.0.proj"])])
def test_a_lora_on_a_layer_that_activates_in_its_epilogue_comes_before_the_activation(family, targets):
    """PEFT wraps a projection that applies its GELU in the epilogue: the projection stops applying it
    and the module where the GELU was applies it after the LoRA, so the fused model with the LoRA
    computes what the unfused model with the same LoRA does (FLUX: proj_mlp is a fused layer's member)."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    adapter, model, stats, example = calibrated_tiny(family, batches=1)
    quantize_(model, DiRotQLRConfig(rank=16), stats, adapter=adapter, measure_error=False, progress=lambda *a: None)
    fused = copy.deepcopy(model)
    report = fusion.fuse_for_inference(fused)
    assert report["activations"]["fused"]
    without_lora = _out(fused, example)
    outs = []
    for m in (model, fused):
        peft_model = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        layers = [layer for layer in peft_model.modules() if isinstance(layer, LoraLayer)]
        assert layers
        g = torch.Generator().manual_seed(0)
        for layer in layers:
            for lin in (layer.lora_A["default"], layer.lora_B["default"]):
                with torch.no_grad():
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.3)
        outs.append(_out(peft_model, example))
    sites = [s for s in fused.modules() if isinstance(s, (fusion.ProjectionWithActivation, fusion.ActivationInEpilogue))]
    wrapped = [s for s in sites if not s.in_epilogue()]
    assert wrapped and all("applied here, after" in repr(s) for s in wrapped)
    if family == "flux":  # the double blocks' ff_context was not targeted: still in its epilogue
        assert any(s.in_epilogue() for s in sites)
    assert torch.equal(outs[1], outs[0])  # the reference path: the same ops in the same order
    assert not torch.allclose(outs[1], without_lora)  # and the LoRA does change the output


def test_diffusers_load_lora_adapter_on_a_model_with_activations_in_epilogues():
    """diffusers' own LoRA loading (``load_lora_adapter``) on an MLP up-projection that applies its GELU
    in the epilogue: the same output as the unfused model with the same LoRA."""
    pytest.importorskip("peft")
    adapter, model, stats, example = calibrated_tiny("flux", batches=1)
    quantize_(model, QuaRotConfig(hadamard="block"), stats, adapter=adapter, measure_error=False,
              progress=lambda *a: None)
    fused = copy.deepcopy(model)
    fusion.fuse_for_inference(fused)
    names = ["transformer_blocks.0.ff.net.0.proj", "single_transformer_blocks.1.proj_mlp"]
    g = torch.Generator().manual_seed(3)
    sd = {}
    for name in names:
        q = model.get_submodule(name)
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, q.in_features, generator=g) * 0.3
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(q.out_features, 4, generator=g) * 0.3
    outs = []
    for m in (model, fused):
        m.load_lora_adapter(dict(sd), prefix="transformer", adapter_name="x")
        outs.append(_out(m, example))
    assert torch.equal(outs[1], outs[0])
    assert not fused.transformer_blocks[0].ff.net[0].in_epilogue()
    assert fused.transformer_blocks[1].ff.net[0].in_epilogue()  # no LoRA there: still fused
