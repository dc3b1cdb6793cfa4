"""torch.compile on quantized transformers (dirotq/compile_ops.py): every QuantLinear is one opaque
custom op in a full graph (no graph break), the compiled model computes what the eager one does, a
copy of a model runs its own layers, and the op's fake implementation passes PyTorch's op checks."""

import copy

import pytest
import torch

from dirotq import quantize_
from dirotq.compile_ops import handle
from dirotq.methods import QuaRotConfig, RTNConfig
from dirotq.models import ADAPTERS
from dirotq.modules import QuantLinear


def _quantized(family: str, config):
    model = ADAPTERS[family].build_tiny(0).eval()
    quantize_(model, config, progress=lambda *a: None)
    example = ADAPTERS[family].example_inputs(model, 1, torch.Generator().manual_seed(2))
    return model, example


def _compiled_graphs(model, example):
    graphs = []

    def record(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, fullgraph=True, backend=record)(**example).sample
    return out, graphs


@pytest.mark.parametrize("family", ["flux", "pixart"])
def test_a_quantized_transformer_compiles_as_one_graph_of_custom_ops(family):
    model, example = _quantized(family, QuaRotConfig(hadamard="block"))
    with torch.no_grad():
        eager = model(**example).sample
    out, graphs = _compiled_graphs(model, example)  # fullgraph=True: a graph break raises
    assert len(graphs) == 1
    calls = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "quant_linear" in str(n.target)]
    assert len(calls) == sum(isinstance(m, QuantLinear) for m in model.modules()) > 0
    assert torch.equal(out, eager)


def test_a_copy_runs_its_own_layers():
    model, example = _quantized("flux", RTNConfig())
    _compiled_graphs(model, example)  # the original's layers get handles
    twin = copy.deepcopy(model)
    layer = next(m for m in twin.modules() if isinstance(m, QuantLinear) and m.bias is not None)
    with torch.no_grad():
        layer.bias += 1.0  # the copy differs: its compiled graph must call its own layers
        eager = twin(**example).sample
    out, _ = _compiled_graphs(twin, example)
    assert torch.equal(out, eager)
    assert handle(layer) != handle(next(m for m in model.modules() if isinstance(m, QuantLinear)))


@pytest.mark.parametrize("fused", [False, True])
def test_inductor_compiles_and_matches_eager(fused, monkeypatch):
    """Inductor compiles a quantized transformer, also in the deployment form (shared inputs fused,
    GELUs in their projections' epilogues: ``fuse_for_inference``), to the eager output."""
    import torch._inductor.config as inductor_config

    from dirotq.fusion import fuse_for_inference

    # compile in this process: no pool of compile workers left running beside the later tests
    monkeypatch.setattr(inductor_config, "compile_threads", 1)
    model, example = _quantized("pixart", RTNConfig())
    if fused:
        assert fuse_for_inference(model)["activations"]["fused"]
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(**example).sample
        out = torch.compile(model, fullgraph=True)(**example).sample
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_the_op_passes_torch_library_checks():
    model, _ = _quantized("pixart", RTNConfig())
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
    x = torch.randn(3, 5, layer.in_features)
    torch.library.opcheck(torch.ops.dirotq.quant_linear.default, (x, handle(layer), layer.out_features),
                          test_utils=("test_schema", "test_faketensor"))
    assert torch.equal(torch.ops.dirotq.quant_linear(x, handle(layer), layer.out_features), layer(x))
