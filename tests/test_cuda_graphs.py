"""dirotq.cuda_graphs: a quantized transformer's forward replayed from CUDA graphs.

On the CPU the wrapper must be transparent (same outputs, every call eager); the graph capture and
replay themselves run in the CUDA tests (``-m cuda``, part of benchmarks/device_checks.sh)."""

import pytest
import torch

from dirotq.cuda_graphs import call_key, graph_stats, graph_transformer, reset_graphs, ungraph_transformer
from tests.conftest import calibrated_tiny

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.usefixtures("one_thread")


def _quantized_tiny_pixart():
    from dirotq import fusion
    from dirotq.methods import DiRotQLRConfig
    from dirotq.models.base import CONDITIONING
    from dirotq.quantize import quantize_

    adapter, model, stats, example = calibrated_tiny("pixart", layer_kinds={CONDITIONING: "w8a16"})
    quantize_(model, DiRotQLRConfig(rank=16, scale_format="int_ratio"), stats, adapter=adapter, measure_error=False,
              progress=lambda *a: None)
    fusion.fuse_for_inference(model, adapter=adapter)
    return adapter, model, example


def test_call_key_separates_shapes_and_values_not_tensor_contents():
    a = {"x": torch.zeros(2, 3), "t": torch.tensor([1.0, 2.0]), "extra": {"res": None}, "return_dict": False}
    same_shapes = {"x": torch.ones(2, 3), "t": torch.tensor([5.0, 6.0]), "extra": {"res": None}, "return_dict": False}
    assert call_key((), a) == call_key((), same_shapes)  # a new timestep replays the same graph
    assert call_key((), a) != call_key((), {**a, "x": torch.zeros(4, 3)})  # another batch: another graph
    assert call_key((), a) != call_key((), {**a, "x": torch.zeros(2, 3, dtype=torch.float16)})
    assert call_key((), a) != call_key((), {**a, "return_dict": True})
    assert call_key((), a) != call_key((), {**a, "extra": {"res": 3}})
    assert call_key((torch.zeros(1),), {}) != call_key((), {"x": torch.zeros(1)})
    # an unhashable non-tensor argument is keyed by its repr
    assert call_key((), {"opts": [1, {"a": []}]}) == call_key((), {"opts": [1, {"a": []}]})


def test_wrapper_is_transparent_on_the_cpu():
    _, model, example = _quantized_tiny_pixart()
    with torch.no_grad():
        eager = model(**example, return_dict=False)[0]
        graph_transformer(model)
        assert graph_transformer(model) is model  # wrapping twice changes nothing
        wrapped = model(**example, return_dict=False)[0]
        out = model(**example)  # diffusers' output object passes through as well
    assert torch.equal(wrapped, eager) and torch.equal(out.sample, eager)
    assert graph_stats(model) == {"captures": 0, "replays": 0, "eager": 2, "failed": []}
    reset_graphs(model)
    ungraph_transformer(model)
    assert "forward" not in vars(model)
    with pytest.raises(ValueError, match="not wrapped"):
        graph_stats(model)
    with pytest.raises(ValueError, match="warmup"):
        graph_transformer(model, warmup=0)


def test_hooks_and_deep_copies():
    """A forward hook (how calibration records activations) makes calls eager, since a replay would
    skip it; a deep copy of a wrapped model is wrapped, bound to the copy, with no graphs."""
    import copy

    from dirotq.cuda_graphs import GraphedForward

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
    graph_transformer(model)
    graphed = model.forward
    assert isinstance(graphed, GraphedForward) and not graphed.observed()
    handle = model[0].register_forward_hook(lambda *a: None)
    assert graphed.observed()
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda *a: None)
    try:
        assert graphed.observed()
    finally:
        handle.remove()
    assert not graphed.observed()
    twin = copy.deepcopy(model)
    assert isinstance(twin.forward, GraphedForward) and twin.forward is not graphed
    assert twin.forward.forward.__self__ is twin and twin.forward.graphs == {}
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
    assert graph_stats(twin)["eager"] == 1


def test_model_layout_notices_moves_swaps_and_new_kernel_plans():
    """What decides that the graphs must be captured again: a module swapped, a tensor moved or
    re-allocated, a quantized layer's kernel plan rebuilt; not weights overwritten in place."""
    from dirotq.cuda_graphs import GraphedForward

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
    graph_transformer(model)
    graphed: GraphedForward = model.forward
    layout = graphed.model_layout()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(4, 4))  # in place: the graphs read the new values
    assert graphed.model_layout() == layout
    model[0].weight.data = torch.randn(4, 4)  # a new storage
    assert graphed.model_layout() != layout
    layout = graphed.model_layout()
    model[1] = torch.nn.ReLU()
    assert graphed.model_layout() != layout
    layout = graphed.model_layout()
    model[0]._kernel_plan = object()  # a quantized layer's kernels planned again (new tensors)
    assert graphed.model_layout() != layout


def _close_or_equal(a: torch.Tensor, b: torch.Tensor, deterministic: bool) -> None:
    if deterministic:
        assert torch.equal(a, b)
    else:  # K-split atomics add fp32 partials in any order: eager differs from itself as much, and a
        # 4-bit code flipped by the last bit moves the output by up to a few percent (docs/EVALUATION.md)
        assert float((a.float() - b.float()).norm() / b.float().norm()) < 5e-2


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_graphs_replay_the_eager_kernels():
    """A fused W4A4 tiny PixArt on the Triton kernels: each new input shape is captured once, later
    calls (new latents and timesteps) replay it, and every output is the eager forward's."""
    adapter, model, _ = _quantized_tiny_pixart()
    model = model.cuda().to(torch.bfloat16)

    def inputs(seed: int, batch: int = 2) -> dict:
        kw = adapter.example_inputs(model, batch, torch.Generator().manual_seed(seed))
        return {k: v.cuda().to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point()
                else v.cuda() if torch.is_tensor(v) else v for k, v in kw.items()}

    calls = [inputs(1), inputs(2), inputs(3, batch=1), inputs(4)]
    with torch.no_grad():
        eager = [model(**kw, return_dict=False)[0] for kw in calls]
        deterministic = torch.equal(model(**calls[0], return_dict=False)[0], eager[0])
        graph_transformer(model)
        graphed = [model(**kw, return_dict=False)[0] for kw in calls]
        again = model(**calls[1], return_dict=False)[0]
    for g, e in zip(graphed, eager):
        _close_or_equal(g, e, deterministic)
    _close_or_equal(again, eager[1], deterministic)
    # batch 2: eager, captured (and replayed), replayed, replayed; batch 1, called once: eager
    stats = graph_stats(model)
    assert stats["captures"] == 1 and stats["failed"] == [] and stats["replays"] == 3, stats
    # outputs are copies: a later replay does not change an earlier result
    assert graphed[1].data_ptr() != graphed[3].data_ptr()
    assert not torch.equal(graphed[1], graphed[3])
    reset_graphs(model)
    with torch.no_grad():
        for kw in calls[2:3] * 3:
            _close_or_equal(model(**kw, return_dict=False)[0], eager[2], deterministic)
    assert graph_stats(model)["captures"] == 2


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_pair_draws_the_eager_images():
    """generate --cuda-graphs' path on the tiny pipeline: both transformers replay their steps, and
    the images are the eager ones (bit for bit where the kernels are deterministic)."""
    import numpy as np

    import dirotq
    from dirotq.generate import generate_pair, graph_pair, quantized_copy
    from tests.tiny_pipelines import build_tiny_pixart_pipeline

    pipe = build_tiny_pixart_pipeline(seed=0).to("cuda")
    prompt = "a red circle"
    stats = dirotq.calibrate(pipe, [prompt, "two blue squares"], num_inference_steps=4)
    qt = quantized_copy(pipe.transformer, dirotq.DiRotQLRConfig(rank=16, scale_format="int_ratio"), stats)
    kw = {"guidance_scale": 4.5, "max_sequence_length": 16, "use_resolution_binning": False}
    eager = generate_pair(pipe, qt, prompt, 3, num_inference_steps=4, **kw)
    again = generate_pair(pipe, qt, prompt, 3, num_inference_steps=4, **kw)
    report = graph_pair(pipe, qt, prompt, 3, **kw)
    graphed = generate_pair(pipe, qt, prompt, 3, num_inference_steps=4, **kw)
    for side in ("reference", "quantized"):
        assert report[side]["captures"] >= 1 and report[side]["failed"] == [], report
    for e, a, g in zip(eager[:2], again[:2], graphed[:2]):
        e, a, g = (np.asarray(im, dtype=np.float64) / 255 for im in (e, a, g))
        if np.array_equal(e, a):  # deterministic kernels: the replayed image is the eager one exactly
            assert np.array_equal(g, e)
        else:  # 32 tokens take K-split atomics, whose fp32 sums differ from run to run, eager or replayed
            assert 10 * np.log10(1 / max(float(((g - e) ** 2).mean()), 1e-12)) >= 30
