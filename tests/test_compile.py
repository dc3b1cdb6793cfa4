"""torch.compile on quantized transformers (dirotq/compile_ops.py): every QuantLinear is one opaque
custom op in a full graph (no graph break), the compiled model computes what the eager one does, a
copy of a model runs its own layers, blocks compiled one by one share one graph and still run their
own layers, and the op's fake implementation passes PyTorch's op checks."""

import copy

import pytest
import torch

from dirotq import quantize_
from dirotq.methods import QuaRotConfig, RTNConfig
from dirotq.models import ADAPTERS
from dirotq.modules import QuantLinear
from dirotq.quantizers import quantize


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
    _compiled_graphs(model, example)  # the original's layers are known to the op
    twin = copy.deepcopy(model)
    layer = next(m for m in twin.modules() if isinstance(m, QuantLinear) and m.bias is not None)
    with torch.no_grad():
        layer.bias += 1.0  # the copy differs: its compiled graph must call its own layers
        eager = twin(**example).sample
    out, _ = _compiled_graphs(twin, example)
    assert torch.equal(out, eager)
    with torch.no_grad():
        assert not torch.equal(out, model(**example).sample)  # the copy's change reached its output


class _Block(torch.nn.Module):
    """A transformer-like block: a quantized projection between elementwise work."""

    def __init__(self, d: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(d, d, generator=gen) / d**0.5
        self.proj = QuantLinear(d, d, method="rtn", weight=quantize(w, 4, 64, True, "int_ratio"),
                                scale_format="int_ratio", bias=torch.randn(d, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.nn.functional.gelu(self.proj(torch.nn.functional.layer_norm(x, x.shape[-1:])))


def test_blocks_compiled_one_by_one_share_a_graph_and_run_their_own_layers():
    """Regional compilation (each block's ``.compile()``, diffusers' ``compile_repeated_blocks``):
    identical blocks reuse one compiled graph, and each call must still run its own block's
    weights. A layer named by a constant of the graph would run the first block's everywhere."""
    from torch._dynamo.utils import counters

    blocks = torch.nn.ModuleList(_Block(128, seed) for seed in range(4)).eval()
    x = torch.randn(2, 7, 128, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        eager = [x]
        for block in blocks:
            eager.append(block(eager[-1]))
        torch._dynamo.reset()
        counters.clear()
        for block in blocks:
            block.compile(backend="aot_eager", fullgraph=True)
        out = x
        for block, expected in zip(blocks, eager[1:]):
            out = block(out)
            assert torch.equal(out, expected)
    assert counters["stats"]["unique_graphs"] == 1  # one graph for the four blocks
    torch._dynamo.reset()


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


def test_the_op_and_its_fake_implementation():
    model, _ = _quantized("pixart", RTNConfig())
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
    x = torch.randn(3, 5, layer.in_features)
    # not torch.library.opcheck: it calls the op on clones of its arguments, and a clone of the weight
    # buffer names no layer (the op finds its layer by the buffer's address). The fake implementation
    # is checked against the real op directly.
    y = torch.ops.dirotq.quant_linear(x, layer.stored_weight(), layer.out_features)
    assert torch.equal(y, layer(x))
    _assert_fake_matches(torch.ops.dirotq.quant_linear.default, (x, layer.stored_weight(), layer.out_features), y)


def _assert_fake_matches(op, args, real: torch.Tensor) -> None:
    """The op's fake implementation gives the real output's shape, dtype and device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert (fake.shape, fake.dtype, fake.device) == (real.shape, real.dtype, real.device)


def test_the_op_names_a_missing_layer():
    with pytest.raises(RuntimeError, match="no live QuantLinear holds this weight buffer"):
        torch.ops.dirotq.quant_linear(torch.randn(2, 64), torch.zeros(8, 32, dtype=torch.uint8), 8)


def test_a_fused_transformer_compiled_block_by_block_runs_each_blocks_layers():
    """The deployment form (shared inputs fused, GELUs in epilogues) of a four-block PixArt, each
    block compiled in place: the blocks after the first share one graph (the first differs in its
    input's strides), and the output is the eager one, so each block ran its own fused layers."""
    from torch._dynamo.utils import counters

    from dirotq.fusion import fuse_for_inference

    adapter = ADAPTERS["pixart"]
    torch.manual_seed(0)
    model = adapter.model_class()(**{**adapter.tiny_config(), "num_layers": 4}).eval()
    quantize_(model, RTNConfig(), progress=lambda *a: None)
    assert fuse_for_inference(model)["shared_inputs"]["fused"]
    example = adapter.example_inputs(model, 1, torch.Generator().manual_seed(2))
    with torch.no_grad():
        eager = model(**example).sample
        torch._dynamo.reset()
        counters.clear()
        for block in model.transformer_blocks:
            block.compile(backend="aot_eager", fullgraph=True)
        out = model(**example).sample
    assert counters["stats"]["unique_graphs"] <= 2
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
