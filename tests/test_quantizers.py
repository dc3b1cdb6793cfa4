"""Claims about the reference quantizers: error bounds, formats, packing."""

import math

import pytest
import torch

from dirotq.quantizers import (
    fake_quantize, pack_int4, quantization_error, quantize, unpack_int4,
)


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(37, 200) * torch.linspace(0.1, 3.0, 200)


def test_symmetric_int4_error_is_at_most_half_a_step(x):
    qt = quantize(x, 4, 64, symmetric=True)
    step = qt.group_scales().repeat_interleave(64, dim=-1)[:, :200]
    assert (x - qt.dequantize()).abs().le(step / 2 + 1e-6).all()
    assert qt.q.min() >= -8 and qt.q.max() <= 7
    assert qt.q.shape == (37, 256)  # 200 padded to 4 groups


def test_asymmetric_uses_zero_point_and_full_code_range(x):
    qt = quantize(x + 3.0, 4, 64, symmetric=False)
    assert qt.zero is not None and qt.q.min() >= 0 and qt.q.max() <= 15
    step = qt.group_scales().repeat_interleave(64, dim=-1)[:, :200]
    assert ((x + 3.0) - qt.dequantize()).abs().le(step / 2 + 1e-5).all()
    # a shifted distribution is where a zero point pays off
    sym = quantization_error(x + 3.0, fake_quantize(x + 3.0, symmetric=True))["rel_mse"]
    asym = quantization_error(x + 3.0, qt.dequantize())["rel_mse"]
    assert asym < sym


def test_int8_is_much_finer_than_int4(x):
    e4 = quantization_error(x, fake_quantize(x, 4))["rel_mse"]
    e8 = quantization_error(x, fake_quantize(x, 8))["rel_mse"]
    assert e8 < e4 / 200  # 4 more bits: (127/7)^2 ≈ 329× less squared error


def test_gaussian_int4_sqnr_is_in_the_textbook_range():
    torch.manual_seed(1)
    g = torch.randn(512, 1024)
    sqnr = quantization_error(g, fake_quantize(g))["sqnr_db"]
    assert 17.0 < sqnr < 21.0


def test_int_ratio_format_invariants(x):
    qt = quantize(x, 4, 64, scale_format="int_ratio")
    assert qt.ratio.min() >= 1 and qt.ratio.max() <= 15
    assert qt.q.abs().max() <= 7
    assert (qt.ratio.to(torch.int32) * qt.q.reshape(37, 4, 64).abs().amax(-1).to(torch.int32)).max() <= 105
    # the row's largest group uses the top multiplier
    assert (qt.ratio.amax(-1) == 15).all()
    # step covers each group's abs-max: nothing saturates beyond rounding
    step = qt.group_scales().repeat_interleave(64, dim=-1)[:, :200]
    assert (x - qt.dequantize()).abs().le(step / 2 + 1e-6).all()


def test_int_ratio_costs_little_on_smooth_rows_and_more_on_outlier_rows():
    torch.manual_seed(2)
    smooth = torch.randn(64, 512)
    ea = quantization_error(smooth, fake_quantize(smooth))["rel_mse"]
    ec = quantization_error(smooth, fake_quantize(smooth, scale_format="int_ratio"))["rel_mse"]
    assert ec < 1.3 * ea
    spiky = smooth.clone()
    spiky[:, :64] *= 40  # one group per row dominates: the others get k = 1
    ea2 = quantization_error(spiky[:, 64:], fake_quantize(spiky)[:, 64:])["rel_mse"]
    ec2 = quantization_error(spiky[:, 64:], fake_quantize(spiky, scale_format="int_ratio")[:, 64:])["rel_mse"]
    assert ec2 > 2 * ea2


def test_rounding_is_half_to_even():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, 7.0] + [0.0] * 58])
    qt = quantize(x, 4, 64)  # scale = 7/7 = 1
    assert qt.q[0, :6].tolist() == [0, 2, 2, 0, -2, 7]


def test_zero_rows_quantize_to_zero_without_nans():
    z = torch.zeros(3, 128)
    for fmt in ("exact", "int_ratio"):
        out = fake_quantize(z, scale_format=fmt)
        assert torch.equal(out, z)


def test_pack_roundtrip_and_layout():
    torch.manual_seed(3)
    q = torch.randint(-8, 8, (5, 128), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 64)
    assert torch.equal(unpack_int4(packed), q)
    # byte j of a group: value j in the low nibble, value j + 32 in the high nibble
    b = int(packed[0, 3])
    lo, hi = b & 0xF, b >> 4
    assert (lo - 16 if lo > 7 else lo) == int(q[0, 3]) and (hi - 16 if hi > 7 else hi) == int(q[0, 35])
    u = torch.randint(0, 16, (2, 64), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(u), signed=False), u)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.zeros(2, 64), bits=3)
    with pytest.raises(ValueError, match="scale_format"):
        quantize(torch.zeros(2, 64), scale_format="fp8")
    with pytest.raises(ValueError, match="symmetric"):
        quantize(torch.zeros(2, 64), symmetric=False, scale_format="int_ratio")
    with pytest.raises(ValueError, match="4-bit codes"):
        pack_int4(torch.full((1, 64), 20, dtype=torch.int8))
    with pytest.raises(ValueError, match="multiple of the group"):
        pack_int4(torch.zeros(1, 40, dtype=torch.int8))


def test_sqnr_matches_rel_mse():
    x = torch.randn(10, 64)
    e = quantization_error(x, fake_quantize(x))
    assert math.isclose(e["sqnr_db"], -10 * math.log10(e["rel_mse"]), rel_tol=1e-9)
