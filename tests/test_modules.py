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
