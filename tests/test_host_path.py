"""The host side of a quantized transformer's forward through the Triton kernels: no operation that
waits for the GPU (a device-to-host copy or a data-dependent shape), which would make an eager step
the sum of host and GPU time and break CUDA-graph capture, and few torch ops per layer call (each
costs host time in an eager step). Checked on CPU, where the interpreted launches are stubbed out:
the host code is the one that runs on a GPU."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dirotq import fusion, kernels
from dirotq.methods import DiRotQLRConfig
from dirotq.models.base import CONDITIONING
from dirotq.modules import QuantLinear
from dirotq.quantize import quantize_
from tests.conftest import calibrated_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

# ops that make the host wait for the device: .item() / bool(t) / float(t) dispatch _local_scalar_dense
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "equal", "is_nonzero", "item",
           "_unique2", "unique_consecutive"}


class _OpLog(TorchDispatchMode):
    """Every aten op dispatched, by the quantized layer call it ran in (None: outside any)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = None
        self.ops: dict = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[self.layer][func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_kernel_path_forward_never_waits_for_the_device(family, monkeypatch):
    pytest.importorskip("triton")
    if not kernels.kernels_available(torch.device("cpu")):
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on machines without CUDA)")
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setenv("DIROTQ_NO_AUTOTUNE", "1")
    # the conditioning linears outside the blocks as W8A16, as device_checks.sh runs them
    adapter, model, stats, example = calibrated_tiny(family, layer_kinds={CONDITIONING: "w8a16"})
    quantize_(model, DiRotQLRConfig(rank=16, scale_format="int_ratio"), stats, adapter=adapter, measure_error=False,
              progress=lambda *a: None)
    fusion.fuse_for_inference(model, adapter=adapter)  # the deployment form: fused q/k/v, GELU epilogues
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.backend = "triton"
    model = model.to(torch.bfloat16)
    example = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
               for k, v in example.items()}
    # the launches do nothing: what is left is our host code around them
    monkeypatch.setattr(InterpretedFunction, "__getitem__", lambda fn, grid: (lambda *a, **k: None))
    log = _OpLog()
    forward = kernels.kernel_forward

    def logged(module, x):
        log.layer = (module.act_bits, module.weight_bits, id(module))
        try:
            return forward(module, x)
        finally:
            log.layer = None

    monkeypatch.setattr(kernels, "kernel_forward", logged)
    with torch.no_grad():
        model(**example, return_dict=False)  # plans built
        with log:
            model(**example, return_dict=False)
    assert all(m._kernel_backend_used == "triton" for m in layers)
    every = sum(log.ops.values(), collections.Counter())
    assert not SYNCING & set(every), {k: every[k] for k in SYNCING & set(every)}
    calls = {k: sum(c.values()) for k, c in log.ops.items() if k is not None}
    w4a4 = [n for (bits, _, _), n in calls.items() if bits == 4]
    weight_only = [n for (bits, _, _), n in calls.items() if bits is None]
    assert w4a4 and weight_only and any(w_bits == 8 for _, w_bits, _ in calls)
    # a W4A4 call: its output buffers (codes, scales, ratios, c, row maxima, y) and the c GEMM; a split-K
    # call also zeroes its accumulator. A weight-only call: its output.
    assert max(w4a4) <= 8 and max(weight_only) <= 2, (sorted(w4a4), sorted(weight_only))
