"""QuantLinear storage invariants under dtype and device moves."""

import torch

from dirotq.methods import RTNConfig
from dirotq.quantize import quantize_layer


def test_dtype_cast_keeps_fp16_scales_and_drops_the_dequantized_cache():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64)
    q = quantize_layer(lin, None, RTNConfig(), rank=0)
    x = torch.randn(5, 128)
    q(x)  # fills the dequantized-weight cache
    scale = q.weight_scale.clone()
    assert scale.dtype == torch.float16
    q.to(torch.bfloat16)
    assert q.weight_scale.dtype == torch.float16 and torch.equal(q.weight_scale, scale)
    assert q.bias.dtype == torch.bfloat16
    assert q._dequantized is None
    y = q(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_dequantized_weight_is_kept_on_the_cpu_only(monkeypatch):
    """The reference path keeps W_q in float32 on the CPU (it is the forward there); on a GPU, where it
    is a fallback, a kept copy would double the 16-bit model's weight memory."""
    from dirotq.modules import keeps_dequantized_weight

    assert keeps_dequantized_weight(torch.device("cpu"))
    assert not keeps_dequantized_weight(torch.device("cuda", 0)) and not keeps_dequantized_weight("meta")
    torch.manual_seed(0)
    q = quantize_layer(torch.nn.Linear(128, 64), None, RTNConfig(), rank=0)
    x = torch.randn(5, 128)
    y = q(x)
    kept = q._dequantized
    assert kept is not None and q.dequantized_weight() is kept
    # a layer on another device (its buffers' device is what counts) rebuilds W_q on every call
    q._dequantized = None
    monkeypatch.setattr(q, "_device", lambda: torch.device("cuda"))
    w = q.dequantized_weight()
    assert q._dequantized is None and torch.equal(w, kept)
    assert torch.equal(q.reference_forward(x), y)
