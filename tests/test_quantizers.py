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


def _covering_sse(x: torch.Tensor, qt) -> torch.Tensor:
    """Per-group squared error of format C's covering multiplier k₀ (nothing saturates), brute force."""
    g = x.shape[-1] + (-x.shape[-1]) % 64
    groups = torch.nn.functional.pad(x, (0, g - x.shape[-1])).reshape(x.shape[0], -1, 64)
    s = qt.scale
    k0 = torch.ceil(groups.abs().amax(-1) / (7 * s) - 1e-6).clamp(1, 15)
    step = (k0 * s).unsqueeze(-1)
    v = torch.clamp(torch.round(groups / step), -8, 7) * step
    return (v.double() - groups.double()).pow(2).sum(-1)


def test_int_ratio_format_invariants(x):
    qt = quantize(x, 4, 64, scale_format="int_ratio")
    assert qt.ratio.min() >= 1 and qt.ratio.max() <= 15
    assert qt.q.min() >= -8 and qt.q.max() <= 7
    # the fast kernel's int8 operand k·q
    assert (qt.ratio.to(torch.int32).unsqueeze(-1) * qt.q.reshape(37, 4, 64).to(torch.int32)).abs().max() <= 120
    assert torch.allclose(qt.scale, x.abs().amax(-1, keepdim=True) / 105)
    # the row's largest group uses the top multiplier or the one below it
    assert (qt.ratio.amax(-1) >= 14).all()
    # each group takes the better of k₀ and k₀ − 1: never worse than the covering multiplier, and
    # strictly better in a good share of the groups
    groups = torch.nn.functional.pad(x, (0, 56)).reshape(37, 4, 64)
    sse = (qt.dequantize().double() - x.double()).pow(2)
    sse = torch.nn.functional.pad(sse, (0, 56)).reshape(37, 4, 64).sum(-1)
    cover = _covering_sse(x, qt)
    assert (sse <= cover * (1 + 1e-12)).all()
    assert float((sse < cover * 0.999).float().mean()) > 0.2
    assert groups.shape == (37, 4, 64)


def test_int_ratio_multiplier_is_the_better_of_two_by_brute_force():
    torch.manual_seed(5)
    x = torch.randn(50, 256) * torch.rand(50, 4).repeat_interleave(64, -1)
    qt = quantize(x, 4, 64, scale_format="int_ratio")
    groups = x.reshape(50, 4, 64)
    k0 = torch.ceil(groups.abs().amax(-1) / (7 * qt.scale) - 1e-6).clamp(1, 15)
    for j in range(50):
        for g in range(4):
            errs = {}
            for k in {float(k0[j, g]), max(float(k0[j, g]) - 1, 1.0)}:
                step = torch.tensor(k, dtype=torch.float32) * qt.scale[j, 0]
                v = torch.clamp(torch.round(groups[j, g] / step), -8, 7) * step
                errs[k] = float((v.double() - groups[j, g].double()).pow(2).sum())
            best = min(errs, key=lambda k: (errs[k], -k))  # k₀ on a tie
            assert float(qt.ratio[j, g]) == best


def test_int_ratio_now_matches_or_beats_format_a_on_gaussian_rows():
    torch.manual_seed(6)
    g = torch.randn(256, 1024)
    a = quantization_error(g, fake_quantize(g))["sqnr_db"]
    c = quantization_error(g, fake_quantize(g, scale_format="int_ratio"))["sqnr_db"]
    c_search = quantization_error(g, fake_quantize(g, scale_format="int_ratio", row_search=True))["sqnr_db"]
    assert c > a - 0.05
    assert c_search >= c


def test_int_ratio_row_search_is_never_worse_per_row(x):
    plain = quantize(x, 4, 64, scale_format="int_ratio")
    searched = quantize(x, 4, 64, scale_format="int_ratio", row_search=True)
    e_plain = (plain.dequantize() - x).double().pow(2).sum(-1)
    e_search = (searched.dequantize() - x).double().pow(2).sum(-1)
    assert (e_search <= e_plain * (1 + 1e-12)).all()
    assert (e_search < e_plain).any()
    assert (searched.scale <= plain.scale).all() and searched.ratio.max() <= 15


def test_asymmetric_int_ratio_codes_and_gain_on_shifted_rows(x):
    shifted = x + 1.5
    qt = quantize(shifted, 4, 64, symmetric=False, scale_format="int_ratio")
    assert qt.zero is not None and qt.ratio is not None
    assert qt.q.min() >= 0 and qt.q.max() <= 15
    assert qt.zero.min() >= 0 and qt.zero.max() <= 15
    assert qt.ratio.min() >= 1 and qt.ratio.max() <= 15
    sym = quantization_error(shifted, fake_quantize(shifted, scale_format="int_ratio"))["rel_mse"]
    asym = quantization_error(shifted, qt.dequantize())["rel_mse"]
    assert asym < 0.7 * sym


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
    with pytest.raises(ValueError, match="row_search"):
        quantize(torch.zeros(2, 64), scale_format="exact", row_search=True)
    with pytest.raises(ValueError, match="4-bit codes"):
        pack_int4(torch.full((1, 64), 20, dtype=torch.int8))
    with pytest.raises(ValueError, match="multiple of the group"):
        pack_int4(torch.zeros(1, 40, dtype=torch.int8))


def test_sqnr_matches_rel_mse():
    x = torch.randn(10, 64)
    e = quantization_error(x, fake_quantize(x))
    assert math.isclose(e["sqnr_db"], -10 * math.log10(e["rel_mse"]), rel_tol=1e-9)


def test_asymmetric_format_c_is_an_int8_gemm_plus_a_group_correction():
    """The integer form a format C kernel computes for asymmetric activations (docs/KERNELS.md):
    y = s_t·s_o·(Σ_K (k_t·(u − 8))·(k_w·q_w) − Σ_g (k_t,g·(z_g − 8))·S_g[o]), S_g[o] = Σ_{i∈g} k_w·q_w,i."""
    torch.manual_seed(7)
    a = torch.randn(9, 256) + 0.8 * torch.rand(9, 1)
    w = torch.randn(5, 256)
    qa = quantize(a, 4, 64, symmetric=False, scale_format="int_ratio")
    qw = quantize(w, 4, 64, symmetric=True, scale_format="int_ratio", row_search=True)
    ka = qa.ratio.long().repeat_interleave(64, -1)
    kw = qw.ratio.long().repeat_interleave(64, -1)
    a_op = ka * (qa.q.long() - 8)
    w_op = kw * qw.q.long()
    assert a_op.abs().max() <= 120 and w_op.abs().max() <= 120
    zero_op = qa.ratio.long() * (qa.zero.long() - 8)  # (tokens, groups), int8 range
    assert zero_op.abs().max() <= 120
    s_g = w_op.reshape(5, 4, 64).sum(-1)  # (outputs, groups)
    acc = a_op @ w_op.T - zero_op @ s_g.T  # int32 in a kernel
    y_int = acc.double() * qa.scale.double() * qw.scale.double().T
    y_ref = qa.dequantize(torch.float64) @ qw.dequantize(torch.float64).T
    # equal up to the float32 rounding of the reference's per-group step k·s
    assert torch.allclose(y_int, y_ref, rtol=1e-6, atol=1e-5)


def test_int_ratio_encodes_in_row_blocks_exactly_as_at_once(monkeypatch):
    import dirotq.quantizers as Q

    torch.manual_seed(8)
    x = torch.randn(3, 7, 200) * torch.rand(3, 7, 1)
    whole = {s: quantize(x, 4, 64, symmetric=s, scale_format="int_ratio", row_search=True) for s in (True, False)}
    monkeypatch.setattr(Q, "INT_RATIO_CHUNK_ELEMENTS", 256 * 3)  # three rows per block
    for sym, ref in whole.items():
        got = quantize(x, 4, 64, symmetric=sym, scale_format="int_ratio", row_search=True)
        assert torch.equal(got.q, ref.q) and torch.equal(got.scale, ref.scale) and torch.equal(got.ratio, ref.ratio)
        assert got.q.shape == (3, 7, 256) and got.scale.shape == (3, 7, 1) and got.ratio.shape == (3, 7, 4)
        assert (got.zero is None) == sym and (sym or torch.equal(got.zero, ref.zero))
    empty = quantize(torch.zeros(0, 128), 4, 64, scale_format="int_ratio")
    assert empty.q.shape == (0, 128) and empty.scale.shape == (0, 1)


def test_format_c_sse_units_are_exact_in_any_order():
    """The multiplier choice sums squared code-unit errors as fixed-point integers: the float32 sum
    is exact however it is ordered (the kernel's tile sum and PyTorch's differ), even at the cap."""
    from dirotq.quantizers import SSE_UNIT_CAP, sse_unit, sse_units

    assert (sse_unit(64), sse_unit(128), sse_unit(32), sse_unit(2)) == (1024.0, 512.0, 2048.0, 2.0**14)
    torch.manual_seed(3)
    e = torch.cat([torch.rand(500, 64) - 0.5, torch.full((1, 64), 16.0)])  # the last row hits the cap
    exact = torch.round(torch.clamp(e.double() ** 2, max=SSE_UNIT_CAP) * 1024).sum(-1)
    s = sse_units(e)
    assert s.dtype == torch.float32 and s.max() < 2**24
    assert torch.equal(s.double(), torch.round(torch.clamp((e * e).double(), max=SSE_UNIT_CAP) * 1024).sum(-1))
    assert (s.double() - exact).abs().max() <= 64  # e·e rounds to float32 first: at most ½ unit a term
    perm = torch.randperm(64)
    assert torch.equal(sse_units(e[:, perm]), s)
    assert torch.equal(sse_units(e.flip(-1)), s)


def test_format_c_picks_the_multiplier_with_less_squared_error():
    """Revision 4's fixed-point rule chooses as the exact float64 squared error does, except where
    the two candidates are within its resolution (a ½·1024⁻¹ step² per value)."""
    from dirotq.quantizers import int_ratio_codes

    torch.manual_seed(4)
    groups = torch.randn(400, 24, 64) * torch.rand(400, 24, 1) * torch.linspace(0.2, 2.0, 64)
    s = (groups.abs().amax((-1, -2), keepdim=True).squeeze(-1) / 105).clamp(min=1e-12)
    q, k, _, _ = int_ratio_codes(groups, s, 4, True)
    k0 = torch.ceil(groups.abs().amax(-1) / (7 * s) - 1e-6).clamp(1, 15)
    errs = []
    for kk in (k0, (k0 - 1).clamp(min=1)):
        step = kk * s
        qq = torch.clamp(torch.round(groups * (1 / step).unsqueeze(-1)), -8, 7)
        errs.append((qq * step.unsqueeze(-1) - groups).double().pow(2).sum(-1))
    best = torch.where(errs[1] < errs[0], (k0 - 1).clamp(min=1), k0)
    differ = best != k
    assert differ.float().mean() < 1e-3
    gap = (errs[0] - errs[1]).abs() / (k0 * s).double().pow(2)  # in code steps² of k₀
    assert (gap[differ] < 64 / 1024).all()


def test_format_c_spread_rule_steps_down_unless_the_spread_overshoots():
    """Revision 5's rule for symmetric activations: k₀ − 1 exactly when the group's spread stays
    below 1.25·(k₀ − 1) steps of 7·s, with no per-value comparison; and it keeps nearly all of what
    the squared-error comparison gains over the covering multiplier on Gaussian rows."""
    from dirotq.quantizers import INT_RATIO_STEP_DOWN_REACH

    torch.manual_seed(8)
    x = torch.randn(300, 512) * torch.rand(300, 8).repeat_interleave(64, -1)
    qt = quantize(x, 4, 64, scale_format="int_ratio", k_rule="spread")
    ratio = x.reshape(300, 8, 64).abs().amax(-1) / (7 * qt.scale)
    k0 = torch.ceil(ratio - 1e-6).clamp(1, 15)
    k1 = (k0 - 1).clamp(min=1)
    assert torch.equal(qt.ratio.float(), torch.where(ratio < INT_RATIO_STEP_DOWN_REACH * k1, k1, k0))
    assert {1, 2, 3, 14} <= set(qt.ratio.unique().tolist()) and 15 not in qt.ratio  # k₀ = 15 always steps down
    g = torch.randn(256, 1024)
    covering = g.reshape(256, 16, 64)
    s = (covering.abs().amax((-1, -2), keepdim=True).squeeze(-1) / 105).clamp(min=1e-12)
    step = (torch.ceil(covering.abs().amax(-1) / (7 * s) - 1e-6).clamp(1, 15) * s).unsqueeze(-1)
    first = quantization_error(g, (torch.clamp(torch.round(covering / step), -8, 7) * step).reshape(256, 1024))
    sse = quantization_error(g, fake_quantize(g, scale_format="int_ratio"))["sqnr_db"]
    spread = quantization_error(g, fake_quantize(g, scale_format="int_ratio", k_rule="spread"))["sqnr_db"]
    assert sse - 0.1 < spread <= sse and spread > first["sqnr_db"] + 0.5
    with pytest.raises(ValueError, match="k_rule"):
        quantize(x, 4, 64, scale_format="int_ratio", k_rule="nearest")


def test_layers_quantize_activations_with_the_activation_rule():
    """A QuantLinear's activations follow format C's activation rule ("spread" when symmetric,
    "sse" when asymmetric): what the activation kernel computes."""
    from dirotq.modules import QuantLinear
    from dirotq.quantizers import activation_k_rule

    torch.manual_seed(9)
    w = quantize(torch.randn(16, 128), 4, 64, True, "int_ratio")
    m = QuantLinear(128, 16, method="rtn", weight=w, act_bits=4, scale_format="int_ratio")
    a = torch.randn(40, 128) * torch.rand(40, 2).repeat_interleave(64, -1)
    for symmetric, rule in ((True, "spread"), (False, "sse")):
        m.act_symmetric = symmetric
        assert activation_k_rule(symmetric) == rule
        assert torch.equal(m.quantize_input(a), fake_quantize(a, 4, 64, symmetric, "int_ratio", k_rule=rule))
    m.act_symmetric = True
    assert not torch.equal(m.quantize_input(a), fake_quantize(a, 4, 64, True, "int_ratio", k_rule="sse"))
