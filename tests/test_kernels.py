"""Triton kernels against the reference path (docs/KERNELS.md "Testing without a GPU"; issue #6 "Tests").

On CPU the kernels run under ``TRITON_INTERPRET=1`` (set here before triton is imported, as
tests/conftest.py also does): fp32 inputs, tiny shapes. Integer parts are compared byte for byte
(int8 activation codes and scales against ``quantizers.quantize`` on the kernel's own transformed
input, the weight operand against ``unpack_int4``, the int32 sums against an integer matmul);
float outputs within tolerance. CUDA tests (real shapes, bf16, a tiny-model generation) skip
without a GPU.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from dirotq.bases import hadamard  # noqa: E402
from dirotq.modules import QuantLinear, quantize_weight  # noqa: E402
from dirotq.quantizers import activation_k_rule, quantize  # noqa: E402

triton = pytest.importorskip("triton")

from dirotq import kernels, modules  # noqa: E402
from dirotq.kernels.act_quant import quantize_activations  # noqa: E402
from dirotq.kernels.layout import get_plan, kernel_weight_codes  # noqa: E402
from dirotq.kernels.w4a4_gemm import w4a4_gemm, zero_point_sums  # noqa: E402

FORMATS = ("exact", "int_ratio")
CUDA = torch.cuda.is_available()


def _orth(d: int, r: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))
    return q.float()  # column-major strides on purpose: kernels take strides


def make_layer(structure: str, fmt: str, d: int = 128, o: int = 48, r: int = 16, seed: int = 0,
               bias: bool = True, act_bits: int | None = 4, dtype=torch.float32) -> QuantLinear:
    """A QuantLinear of each method structure (docs/ARCHITECTURE.md table), random but consistent."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(o, d, generator=gen)
    b = torch.randn(o, generator=gen) if bias else None
    f: dict = {}
    wq = w
    if structure == "rtn":
        pass
    elif structure == "smoothquant":
        s = torch.rand(d, generator=gen) * 3 + 0.25
        f["smooth"] = s
        wq = w * s
    elif structure == "svdquant":
        s = torch.rand(d, generator=gen) * 3 + 0.25
        ws = w * s
        u, sv, vh = torch.linalg.svd(ws.double(), full_matrices=False)
        f.update(smooth=s, down=vh[:r].T.float(), up=(u[:, :r] * sv[:r]).float())
        wq = ws - f["up"] @ f["down"].T
    elif structure == "dirotq-lr":
        v = _orth(d, r, gen) if r else None
        signs = (torch.randint(0, 2, (d,), generator=gen) * 2 - 1).float()
        f["hadamard_signs"] = signs
        res = w
        if r:
            f.update(down=v, up=w @ v, project_out=True)
            res = w - (w @ v) @ v.T
        h = hadamard(64, torch.float32)
        wq = ((res * signs).reshape(o, d // 64, 64) @ h).reshape(o, d)
    elif structure == "dirotq":
        t = _orth(d, d, gen)
        f.update(down=t[:, :r].contiguous(), up=w @ t[:, :r], rotation=t[:, r:].contiguous())
        wq = w @ t[:, r:]
    elif structure == "quarot-dense":
        t = _orth(d, d, gen)
        f["rotation"] = t
        wq = w @ t
    else:
        raise ValueError(structure)
    weight = quantize(wq, 4, 64, True, fmt)
    return QuantLinear(d, o, method=structure, weight=weight, act_bits=act_bits, scale_format=fmt, bias=b,
                       dtype=dtype, **f)


def make_input(n: int, d: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    x[:, 3] *= 25.0  # a planted outlier channel
    x[: max(1, n // 3), 7] *= -40.0
    return x


def _weight_operand(m: QuantLinear) -> torch.Tensor:
    qw = m.quantized_weight()
    if qw.ratio is None:
        return qw.q
    return qw.q * qw.ratio.repeat_interleave(m.group_size, -1)


def _exact_output(m: QuantLinear, qt, c: torch.Tensor | None) -> torch.Tensor:
    """y in float64 from the activation codes ``qt`` (a QuantizedTensor), the module's dequantized
    weight, its 16-bit branch on the kernel's ``c`` and its bias: what the GEMM must compute."""
    y = qt.dequantize(torch.float64) @ m.dequantized_weight().double().T
    if c is not None and m.up is not None:
        y = y + c.double() @ m.up.double().T
    if m.bias is not None:
        y = y + m.bias.double()
    return y


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def quantize_acts(a: torch.Tensor, g: int, symmetric: bool, fmt: str):
    """The reference quantizer as the activation kernel must reproduce it (format C's multiplier
    rule for activations)."""
    return quantize(a, 4, g, symmetric, fmt, k_rule=activation_k_rule(symmetric))


# --- activation kernel + GEMM, every structure, both formats ------------------------------------
CASES = [
    # structure, d, o, r, n
    ("rtn", 100, 40, 0, 5),  # d not a multiple of the group, odd tokens
    ("smoothquant", 128, 48, 0, 19),
    ("svdquant", 128, 48, 16, 17),
    ("dirotq-lr", 128, 48, 64, 33),  # rank 64, three token tiles
    ("dirotq-lr", 128, 48, 0, 7),  # rank 0 = QuaRot block
    ("dirotq", 96, 40, 16, 9),  # full rotation: d_q = 80, not a multiple of the group
    ("quarot-dense", 64, 32, 0, 3),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("structure,d,o,r,n", CASES)
def test_act_quant_and_gemm_match_reference(structure, d, o, r, n, fmt):
    m = make_layer(structure, fmt, d=d, o=o, r=r)
    x = make_input(n, d)
    plan = get_plan(m, x)
    assert plan.kind == "w4a4", plan.reason
    act = quantize_activations(m, plan, x, store_a=True)
    c_ref, a_ref = m.transform_input(x)
    g = m.group_size
    # transforms within float tolerance
    a_ref_p = torch.nn.functional.pad(a_ref, (0, act["a"].shape[1] - a_ref.shape[1]))
    assert torch.allclose(act["a"], a_ref_p, rtol=1e-5, atol=1e-4 * float(a_ref.abs().max()))
    if r:
        assert torch.allclose(act["c"], c_ref, rtol=1e-5, atol=1e-5 * float(c_ref.abs().max()))
    # integer parts byte-exact against the reference quantizer on the same input
    qt = quantize_acts(act["a"][:, : m.quant_in_features], g, True, fmt)
    if fmt == "exact":
        assert torch.equal(act["codes"], qt.q)
        assert torch.equal(act["scale"], qt.scale)
    else:
        assert torch.equal(act["codes"], qt.q * qt.ratio.repeat_interleave(g, -1))
        assert torch.equal(act["scale"], qt.scale[:, 0])
        assert torch.equal(act["ratio"], qt.ratio)
        assert int(act["codes"].abs().max()) <= 120
    # ... and the reference's own codes differ at most by rare rounding-boundary flips
    q_ref = quantize_acts(a_ref, g, True, fmt).q
    assert float((q_ref != qt.q).float().mean()) <= 0.01
    # int32 accumulators byte-exact
    wop = _weight_operand(m)
    acc = w4a4_gemm(m, plan, act, torch.float32, debug_int=True)
    assert torch.equal(acc.long(), act["codes"].long() @ wop.long().T)
    # float output: exact math on the kernel's codes (fp64), and the module's reference path
    y = w4a4_gemm(m, plan, act, torch.float32)
    assert _rel(y, _exact_output(m, qt, act["c"] if r else None)) < 2e-6
    assert _rel(y, m.reference_forward(x)) < 2e-3


def _format_c_edge_rows(d: int) -> torch.Tensor:
    """Rows that sit on format C's decision edges, in groups of 64: a zero row; a row below the
    1e-12 scale floor; groups whose abs-max is exactly k/15 of the row's (k₀ on the ceil's edge),
    and groups at 1.25·k/15 (the "spread" rule's edge, k = 1 … 4), each slightly above and slightly
    below too; values on half-steps of the step (rounding ties); the row maximum in every group
    (k₀ = 15); one huge outlier over noise (most groups at k = 1)."""
    gen = torch.Generator().manual_seed(7)
    groups = d // 64
    rows = [torch.zeros(d), torch.full((d,), 3e-14) * torch.sign(torch.randn(d, generator=gen))]
    ratios = [float(1 + i % 15) for i in range(groups)], [1.25 * (1 + i % 4) for i in range(groups)]
    for ratio_of_group in ratios:
        for nudge in (1.0, 1.0 + 2e-7, 1.0 - 2e-7):
            row = torch.randn(d, generator=gen).clamp(-1, 1)
            for gi in range(groups):
                k = ratio_of_group[gi]
                grp = row[gi * 64:(gi + 1) * 64]
                grp *= (k / 15) / grp.abs().max()
                grp[0] = (k / 15) * nudge * (1 if gi % 2 else -1)
            row[-1] = 1.0  # the row's abs-max: s = 1/105
            rows.append(row)
    half = torch.randint(-15, 16, (d,), generator=gen).float() * 0.5 / 105  # ties for k = 1 … 2
    half[0] = 1.0
    rows += [half, torch.ones(d) * torch.sign(torch.randn(d, generator=gen)),
             torch.cat([torch.tensor([1e4]), torch.randn(d - 1, generator=gen) * 1e-2])]
    return torch.stack(rows)


@pytest.mark.parametrize("symmetric", [True, False])
def test_format_c_codes_on_the_decision_edges(symmetric):
    """The kernel's format C codes, multipliers, scales and zero points equal the reference
    quantizer's bit for bit on inputs built to sit on its edges (both multiplier rules: "spread"
    for symmetric codes, "sse" for asymmetric ones): the kernel leaves out the clamp of the
    covering multiplier's codes and the cap on squared errors, and writes codes through the
    magic-number bits, each exact only by an argument about ranges (dirotq/kernels/act_quant.py)."""
    _check_format_c_edges(symmetric, "cpu")


def _check_format_c_edges(symmetric: bool, device: str) -> None:
    d = 1024  # 16 groups a row: every multiplier's edge in one row
    m = make_layer("rtn", "int_ratio", d=d, o=32, r=0).to(device)
    m.act_symmetric = symmetric
    x = _format_c_edge_rows(d)
    if not symmetric:
        x = x + 0.3 * x.abs().amax(-1, keepdim=True)  # shifted rows: zero points away from 8
    x = x.to(device)
    plan = get_plan(m, x)
    act = {k: v.cpu() for k, v in quantize_activations(m, plan, x, store_a=True).items() if v is not None}
    x = x.cpu()  # the reference quantizer on the CPU: the one every path is checked against
    assert torch.equal(act["a"], x)  # no transform: the edges reach the quantizer as built
    qt = quantize_acts(x, 64, symmetric, "int_ratio")
    k = qt.ratio.to(torch.int32)
    # the edges are there: both ends of the multiplier, and groups on either side of the rule's edge
    assert 1 in k and int(k.max()) >= 14 and len(k.unique()) >= 10
    codes = (qt.q.int() if symmetric else qt.q.int() - 8) * k.repeat_interleave(64, -1)
    assert torch.equal(act["codes"].int(), codes)
    assert torch.equal(act["ratio"], qt.ratio) and torch.equal(act["scale"], qt.scale[:, 0])
    if not symmetric:
        assert torch.equal(act["zero"].int(), (qt.zero.int() - 8) * k)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("structure,r", [("dirotq-lr", 16), ("svdquant", 8)])
def test_act_quant_several_groups_per_program(structure, r, fmt, monkeypatch):
    """Small ``TARGET_PROGRAMS`` forces the group-block loop (GPB > 1, G = 5 not a multiple of it):
    codes and scales must equal those of one group per program."""
    from dirotq.kernels import act_quant

    m = make_layer(structure, fmt, d=320, o=32, r=r)
    x = make_input(37, 320)
    plan = get_plan(m, x)
    one = quantize_activations(m, plan, x)
    monkeypatch.setattr(act_quant, "TARGET_PROGRAMS", 1)
    assert act_quant.groups_per_program(37, 5, False) == 5
    monkeypatch.setattr(act_quant, "TARGET_PROGRAMS", 4)
    assert act_quant.groups_per_program(37, 5, False) == 2
    several = quantize_activations(m, plan, x)
    for key in ("codes", "scale", "ratio", "c"):
        if one[key] is not None:
            assert torch.equal(one[key], several[key]), key


ONE_LAUNCH_CASES = [("dirotq-lr", 320, 40, 64, 37, "exact", True), ("dirotq-lr", 320, 40, 16, 37, "int_ratio", True),
                    ("dirotq-lr", 320, 40, 16, 21, "int_ratio", False), ("svdquant", 128, 48, 8, 19, "int_ratio", True),
                    ("rtn", 100, 40, 0, 5, "int_ratio", True), ("dirotq-lr", 128, 48, 96, 17, "int_ratio", True)]


@pytest.mark.parametrize("structure,d,o,r,n,fmt,symmetric", ONE_LAUNCH_CASES)
def test_one_launch_activation_kernel_matches_the_launch_grid(structure, d, o, r, n, fmt, symmetric):
    """One launch per layer (c computed in the kernel for r ≤ 64, format C's row scale from a first
    sweep over the groups): the codes are the reference quantizer's on the kernel's own transformed
    input, and input, c, scales and codes match the (token, group) grid with c from a GEMM (up to c's
    summation order); rank 96 keeps c outside the kernel."""
    from dirotq.kernels import act_quant

    m = make_layer(structure, fmt, d=d, o=o, r=r)
    m.act_symmetric = symmetric
    x = make_input(n, d) + (0.0 if symmetric else 0.7)
    plan = get_plan(m, x)
    assert act_quant.one_launch_enabled(plan, True) and not act_quant.one_launch_enabled(plan, None)
    one = quantize_activations(m, plan, x, store_a=True, one_launch=True)
    grid = quantize_activations(m, plan, x, store_a=True, one_launch=False)
    g = m.group_size
    qt = quantize_acts(one["a"][:, : m.quant_in_features], g, symmetric, fmt)
    k = qt.ratio.to(torch.int32).repeat_interleave(g, -1) if fmt == "int_ratio" else 1
    assert torch.equal(one["codes"].int(), (qt.q.int() - (0 if symmetric else 8)) * k)
    if fmt == "int_ratio":
        assert torch.equal(one["scale"], qt.scale[:, 0]) and torch.equal(one["ratio"], qt.ratio)
    else:
        assert torch.equal(one["scale"], qt.scale)
    if r:
        assert torch.allclose(one["c"], grid["c"], rtol=1e-5, atol=1e-6 * float(grid["c"].abs().max()))
    assert torch.allclose(one["a"], grid["a"], rtol=1e-5, atol=1e-5 * float(grid["a"].abs().max()))
    assert float((one["codes"] != grid["codes"]).float().mean()) <= 0.01
    assert torch.allclose(one["scale"], grid["scale"], rtol=1e-5, atol=0)
    if not r:  # no c: the same transformed input, so the same numbers bit for bit
        assert all(torch.equal(one[key], grid[key]) for key in ("a", "codes", "scale", "ratio"))
    # the GEMM on the one-launch operands is exact math on them (a code flipped at a rounding boundary
    # by c's other summation order moves an output by a step, so the reference is not the yardstick)
    y = w4a4_gemm(m, plan, one, torch.float32)
    assert _rel(y, _exact_output(m, qt, one["c"] if r else None)) < 2e-6


@pytest.mark.parametrize("structure,d,r,n,fmt,symmetric", [
    ("dirotq-lr", 320, 16, 37, "int_ratio", True), ("dirotq-lr", 320, 16, 21, "int_ratio", False),
    ("dirotq-lr", 320, 64, 37, "exact", True), ("svdquant", 128, 8, 19, "int_ratio", True),
    ("rtn", 100, 0, 5, "int_ratio", True), ("dirotq", 128, 16, 9, "int_ratio", True),
    ("dirotq-lr", 192, 96, 13, "int_ratio", True)])  # r > 64: the projection in two chunks, loaded per group
def test_prefetching_the_next_group_changes_no_code(structure, d, r, n, fmt, symmetric):
    """The activation kernel's PREFETCH (group g + 1's x tile loaded before group g is transformed; an
    autotuning choice) computes the same input, scales, multipliers and codes bit for bit, in both
    passes and with several groups per program (a dense rotation ignores it)."""
    import triton

    from dirotq.kernels.act_quant import act_quant_kernel, activation_launch

    m = make_layer(structure, fmt, d=d, o=40, r=r)
    m.act_symmetric = symmetric
    x = make_input(n, d) + (0.0 if symmetric else 0.7)
    plan = get_plan(m, x)
    outs = []
    for prefetch in (False, True):
        la = activation_launch(m, plan, x, store_a=True)
        gpb = 2  # two groups per program: the prefetch crosses a group inside a program and stops at its end
        args = la["args"][:-2] + [min(gpb, plan.groups), la["args"][-1]]
        for p in la["passes"]:
            act_quant_kernel[(triton.cdiv(n, 16), triton.cdiv(plan.groups, gpb))](
                *args, BT=16, PASS=p, **la["meta"], PREFETCH=prefetch, num_warps=4)
        outs.append(la["out"])
    for key in ("a", "codes", "scale", "ratio", "zero"):
        if outs[0][key] is not None:
            assert torch.equal(outs[0][key], outs[1][key]), key
    ref = quantize_activations(m, plan, x, store_a=True)
    assert torch.equal(outs[1]["codes"], ref["codes"])


def test_one_launch_is_not_used_with_a_dense_rotation():
    from dirotq.kernels import act_quant

    m = make_layer("dirotq", "int_ratio", d=96, o=40, r=16)
    plan = get_plan(m, make_input(3, 96))
    assert not act_quant.one_launch_enabled(plan, True)


TOKEN_MAJOR_CASES = [("dirotq-lr", 32, "exact", True), ("dirotq-lr", 32, "int_ratio", True),
                     ("svdquant", 16, "int_ratio", True), ("rtn", 0, "exact", True), ("dirotq-lr", 32, "int_ratio", False)]


@pytest.mark.parametrize("structure,r,fmt,symmetric", TOKEN_MAJOR_CASES)
def test_token_major_gemm_equals_the_swap_ab_gemm(structure, r, fmt, symmetric):
    """The token-major GEMM (weights as the MMA's shared-memory operand, n ≥ 128 tokens): int32 sums
    identical to the swap-AB kernel's and to codes · operandᵀ (minus the zero-point term when
    asymmetric), float output equal up to summation order; below 128 tokens it is not used."""
    from dirotq.kernels.w4a4_gemm import gemm_layout

    m = make_layer(structure, fmt, d=192, o=80, r=r)
    m.act_symmetric = symmetric
    x = make_input(150, 192) + (0.0 if symmetric else 0.7)
    plan = get_plan(m, x)
    act = quantize_activations(m, plan, x)
    swap = w4a4_gemm(m, plan, act, torch.float32, debug_int=True, layout="swap")
    token = w4a4_gemm(m, plan, act, torch.float32, debug_int=True, layout="token")
    assert torch.equal(token, swap)
    expected = act["codes"].long() @ _weight_operand(m).long().T
    if not symmetric:
        neg_hi, neg_lo = zero_point_sums(m, plan)
        expected += act["zero"].long() @ (128 * neg_hi.long() + neg_lo.long()).T
    assert torch.equal(token.long(), expected)
    y_swap = w4a4_gemm(m, plan, act, torch.float32, layout="swap")
    assert _rel(w4a4_gemm(m, plan, act, torch.float32, layout="token"), y_swap) < 1e-6
    assert gemm_layout(150, "token") == "token" and gemm_layout(100, "token") == "swap"
    assert gemm_layout(150, None) == "swap"  # the default: the token-major GEMM was slower on the H200
    # the Gluon GEMM has no interpreter: asked for on the CPU, the swap kernel answers
    assert gemm_layout(150, "gluon") == "gluon" and gemm_layout(100, "gluon") == "swap"
    assert torch.equal(w4a4_gemm(m, plan, act, torch.float32, layout="gluon"), y_swap)
    assert gemm_layout(150, "tma") == "tma" and gemm_layout(100, "tma") == "swap"
    assert torch.equal(w4a4_gemm(m, plan, act, torch.float32, layout="tma"), y_swap)
    assert gemm_layout(150, "ws") == "ws" and torch.equal(w4a4_gemm(m, plan, act, torch.float32, layout="ws"), y_swap)
    with pytest.raises(ValueError, match="swap, token, gluon, tma, ws"):
        gemm_layout(150, "tokens")


def test_autotuning_only_for_layers_worth_it(monkeypatch):
    """Real layers autotune their tiles; the embedded model's small ones take the fixed configs
    (tuning every shape made the explorer's first GPU image take minutes); DIROTQ_NO_AUTOTUNE=1 turns
    tuning off everywhere."""
    from dirotq.kernels.tuning import AUTOTUNE_MIN_WEIGHTS, autotune_enabled

    monkeypatch.delenv("DIROTQ_NO_AUTOTUNE", raising=False)
    x = make_input(4, 1152)
    assert autotune_enabled(get_plan(make_layer("dirotq-lr", "int_ratio", d=1152, o=1152, r=32), x))
    small = get_plan(make_layer("dirotq-lr", "int_ratio", d=256, o=1024, r=32), make_input(4, 256))
    assert small.o * small.d < AUTOTUNE_MIN_WEIGHTS and not autotune_enabled(small)
    monkeypatch.setenv("DIROTQ_NO_AUTOTUNE", "1")
    assert not autotune_enabled(get_plan(make_layer("dirotq-lr", "int_ratio", d=1152, o=1152, r=32), x))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("structure,r,split", [("dirotq-lr", 16, 2), ("svdquant", 8, 3), ("rtn", 0, 5)])
def test_gemm_split_k_matches_one_split(structure, r, split, fmt):
    """K splits (atomic fp32/int32 partials; branch and bias only in split 0) give the same int32
    sums byte for byte and the same output up to float summation order."""
    from dirotq.kernels.w4a4_gemm import split_k

    m = make_layer(structure, fmt, d=320, o=40, r=r)
    x = make_input(11, 320)
    plan = get_plan(m, x)
    act = quantize_activations(m, plan, x)
    acc1 = w4a4_gemm(m, plan, act, torch.float32, debug_int=True, split=1)
    accs = w4a4_gemm(m, plan, act, torch.float32, debug_int=True, split=split)
    assert torch.equal(acc1, accs)
    assert torch.equal(acc1.long(), act["codes"].long() @ _weight_operand(m).long().T)
    y1 = w4a4_gemm(m, plan, act, torch.float32, split=1)
    ys = w4a4_gemm(m, plan, act, torch.float32, split=split)
    assert ys.dtype == torch.float32 and _rel(ys, y1) < 1e-6
    assert w4a4_gemm(m, plan, act, torch.float16, split=split).dtype == torch.float16
    # the default: split only at few tokens, ≥ 2 groups per split
    assert split_k(16, 3072, 192) > 1 and split_k(4096, 3072, 192) == 1 and split_k(16, 40, 3) == 1
    assert 192 // split_k(16, 3072, 192) >= 2


EPILOGUE_ACTIVATIONS = [("gelu_tanh", 0, 80), ("gelu", 0, 80), ("gelu_tanh", 16, 48)]


@pytest.mark.parametrize("activation", EPILOGUE_ACTIVATIONS)
def test_gemm_epilogue_activation(activation):
    """GELU in the GEMM epilogue (swap-AB with one and with several K splits, token-major, W4A16) on
    the spec's columns only: the GEMM's output without it, then dirotq.activations' reference
    function, within float32 rounding; the module forward does the same on both paths."""
    from dirotq.activations import apply_activation
    from dirotq.kernels.w4a16 import w4a16_gemm

    m = make_layer("dirotq-lr", "int_ratio", d=192, o=80, r=32)
    x = make_input(150, 192)
    plan = get_plan(m, x)
    act = quantize_activations(m, plan, x)
    for kw in (dict(layout="swap", split=1), dict(layout="swap", split=3), dict(layout="token")):
        plain = w4a4_gemm(m, plan, act, torch.float32, **kw)
        fused = w4a4_gemm(m, plan, act, torch.float32, activation=activation, **kw)
        expected = apply_activation(plain, activation)
        assert torch.allclose(fused, expected, rtol=1e-5, atol=1e-5 * float(plain.abs().max())), kw
        kind, start, stop = activation
        assert torch.equal(fused[:, :start], plain[:, :start]) and torch.equal(fused[:, stop:], plain[:, stop:])
        assert not torch.allclose(fused[:, start:stop], plain[:, start:stop])  # the activation did something
    # the int32 sums are never activated
    assert torch.equal(w4a4_gemm(m, plan, act, torch.float32, debug_int=True, activation=activation),
                       w4a4_gemm(m, plan, act, torch.float32, debug_int=True))
    w16 = make_layer("rtn", "int_ratio", d=128, o=80, act_bits=None)
    x16 = make_input(5, 128)
    plan16 = get_plan(w16, x16)
    plain = w4a16_gemm(w16, plan16, x16, None, torch.float32)
    fused = w4a16_gemm(w16, plan16, x16, None, torch.float32, activation=activation)
    assert torch.allclose(fused, apply_activation(plain, activation), rtol=1e-5, atol=1e-5 * float(plain.abs().max()))
    # the module: kernels and reference path agree with the activation set
    m.epilogue_activation = activation
    y_kernel = kernels.kernel_forward(m, x)
    assert _rel(y_kernel, m.reference_forward(x)) < 2e-3
    assert "then " + activation[0] in repr(m)


def test_epilogue_activation_spec_is_checked():
    m = make_layer("rtn", "exact", d=128, o=48)
    with pytest.raises(ValueError, match="must be one of"):
        m.epilogue_activation = ("relu", 0, 48)
    with pytest.raises(ValueError, match=r"\[0, 49\) are not inside the layer's 48 outputs"):
        m.epilogue_activation = ("gelu", 0, 49)
    assert m.epilogue_activation is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_weight_operand_byte_exact(fmt):
    m = make_layer("rtn", fmt, d=192, o=20)
    wc = kernel_weight_codes(m)
    assert wc.dtype == torch.int8
    assert torch.equal(wc, _weight_operand(m))
    if fmt == "int_ratio":
        assert int(wc.abs().max()) <= 120


@pytest.mark.parametrize("fmt", FORMATS)
def test_module_forward_through_triton(fmt, monkeypatch):
    m = make_layer("dirotq-lr", fmt, r=16)
    x = make_input(11, 128).reshape(1, 11, 128)
    monkeypatch.setenv("DIROTQ_BACKEND", "triton")
    y = m(x)
    assert getattr(m, "_kernel_backend_used", None) == "triton"
    monkeypatch.setenv("DIROTQ_BACKEND", "reference")
    m._kernel_backend_used = None
    y_ref = m(x)
    assert m._kernel_backend_used is None  # the reference path never touched the kernels
    assert y.shape == y_ref.shape == (1, 11, 48)
    assert _rel(y, y_ref) < 2e-3
    letter = "A" if fmt == "exact" else "C"
    monkeypatch.setenv("DIROTQ_BACKEND", "triton")
    assert f"triton: 1× W4A4 format {letter}" in modules.backend_description(m)


@pytest.mark.parametrize("fmt", FORMATS)
def test_int8_weight_mode_matches_packed(fmt):
    m = make_layer("svdquant", fmt)
    x = make_input(9, 128)
    y_packed = kernels.kernel_forward(m, x)
    m.kernel_weights = "int8"
    plan = get_plan(m, x)
    assert plan.w_int8 is not None and torch.equal(plan.w_int8, _weight_operand(m))
    assert torch.equal(kernels.kernel_forward(m, x), y_packed)


def test_empty_and_single_token():
    m = make_layer("dirotq-lr", "int_ratio", r=16)
    assert kernels.kernel_forward(m, torch.zeros(0, 128)).shape == (0, 48)
    x = make_input(1, 128)
    assert _rel(kernels.kernel_forward(m, x), m.reference_forward(x)) < 2e-3


# --- W4A16 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_w4a16_matches_reference(fmt, monkeypatch):
    m = make_layer("rtn", fmt, d=100, o=40, act_bits=None)
    x = make_input(3, 100)
    plan = get_plan(m, x)
    assert plan.kind == "w4a16"
    y = kernels.kernel_forward(m, x)
    y64 = x.double() @ m.dequantized_weight().double().T + m.bias.double()
    assert _rel(y, y64) < 2e-6
    monkeypatch.setenv("DIROTQ_BACKEND", "triton")
    assert "triton: 1× W4A16 format" in modules.backend_description(m, device="cpu")
    monkeypatch.setenv("DIROTQ_BACKEND", "reference")
    assert modules.backend_description(m).startswith("reference: 1× W4A16")


@pytest.mark.parametrize("structure", ["svdquant", "dirotq-lr"])
def test_w4a16_with_branch(structure):
    """16-bit activations with a low-rank branch: SVDQuant's, and DiRotQ-LR's (project-out and
    Hadamard before the weight-only GEMM), the branch a rank plan gives a weight-only layer."""
    for fmt in FORMATS:
        m = make_layer(structure, fmt, act_bits=None)
        x = make_input(5, 128)
        assert get_plan(m, x).kind == "w4a16"
        assert _rel(kernels.kernel_forward(m, x), m.reference_forward(x)) < 1e-5


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [1, 5, 37])
def test_w8a16_matches_reference(fmt, n, monkeypatch):
    """8-bit weight-only layers (the ``w8a16`` kind of the conditioning linears) run the same kernel on
    their INT8 codes: the products q · step are the reference dequantization's, so only the float
    sum order differs."""
    gen = torch.Generator().manual_seed(3)
    d, o = 100, 40  # d not a multiple of the group: padded codes must add nothing
    w = torch.randn(o, d, generator=gen)
    w[:, 5] *= 30.0  # a heavy column: 8-bit codes well beyond INT4's range
    m = QuantLinear(d, o, method="rtn", weight=quantize_weight(w, 8, 64, fmt), act_bits=None, scale_format=fmt,
                    bias=torch.randn(o, generator=gen))
    assert m.weight_bits == 8 and int(m.weight_codes.abs().max()) > 100
    x = make_input(n, d)
    plan = get_plan(m, x)
    assert plan.kind == "w4a16" and plan.weight_bits == 8, plan.reason
    y = kernels.kernel_forward(m, x)
    assert m._kernel_backend_used == "triton"
    y64 = x.double() @ m.dequantized_weight().double().T + m.bias.double()
    assert _rel(y, y64) < 2e-6
    monkeypatch.setenv("DIROTQ_BACKEND", "triton")
    letter = "A" if fmt == "exact" else "C"
    assert f"triton: 1× W8A16 format {letter}" in modules.backend_description(m, device="cpu")


def _w8a16_layer(d: int, o: int, dtype=torch.float32) -> QuantLinear:
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(o, d, generator=gen)
    return QuantLinear(d, o, method="rtn", weight=quantize_weight(w, 8, 64, "int_ratio"), act_bits=None,
                       scale_format="int_ratio", bias=torch.randn(o, generator=gen), dtype=dtype)


def test_w8a16_half_activations_and_fused_gelu():
    # fp16, not bf16: the interpreter's bf16 tl.dot returns garbage (Triton 3.9 on CPU); bf16 is
    # covered by test_cuda_w8a16_bf16 on a GPU
    m = _w8a16_layer(128, 96, torch.float16)
    x = make_input(7, 128).half()
    y = kernels.kernel_forward(m, x)
    assert y.dtype == torch.float16
    assert _rel(y.float(), m.reference_forward(x).float()) < 2e-3
    m.epilogue_activation = ("gelu_tanh", 0, 48)
    y_act = kernels.kernel_forward(m, x).float()
    ref = torch.cat([torch.nn.functional.gelu(y.float()[:, :48], approximate="tanh"), y.float()[:, 48:]], 1)
    assert _rel(y_act, ref) < 2e-3


def test_8bit_weights_with_quantized_activations_fall_back():
    gen = torch.Generator().manual_seed(5)
    m = QuantLinear(128, 32, method="rtn", weight=quantize_weight(torch.randn(32, 128, generator=gen), 8, 64, "exact"),
                    act_bits=4)
    plan = get_plan(m, make_input(3, 128))
    assert plan.kind == "reference" and "8-bit weights with quantized activations" in plan.reason


# --- fallbacks ------------------------------------------------------------------------------------
ASYM_CASES = [("rtn", 100, 40, 0, 5), ("dirotq-lr", 128, 48, 64, 33), ("svdquant", 128, 48, 16, 17),
              ("dirotq", 96, 40, 16, 9)]


@pytest.mark.parametrize("structure,d,o,r,n", ASYM_CASES)
def test_asymmetric_format_c_activations_match_reference(structure, d, o, r, n):
    """Asymmetric format C: the kernel's codes k·(u − 8), multipliers, zero terms k·(z − 8) and row
    scales equal the reference quantizer's on the same input; the int32 sums, the correction and the
    output follow docs/KERNELS.md's integer form."""
    m = make_layer(structure, "int_ratio", d=d, o=o, r=r)
    m.act_symmetric = False
    x = make_input(n, d) + 0.7  # shifted: zero points matter
    plan = get_plan(m, x)
    assert plan.kind == "w4a4" and plan.asym, plan.reason
    act = quantize_activations(m, plan, x, store_a=True)
    g = m.group_size
    qt = quantize_acts(act["a"][:, : m.quant_in_features], g, False, "int_ratio")
    k = qt.ratio.to(torch.int32)
    assert torch.equal(act["codes"].int(), (qt.q.int() - 8) * k.repeat_interleave(g, -1))
    assert torch.equal(act["ratio"], qt.ratio) and torch.equal(act["scale"], qt.scale[:, 0])
    assert torch.equal(act["zero"].int(), (qt.zero.int() - 8) * k)
    assert int(act["codes"].abs().max()) <= 120 and int(act["zero"].abs().max()) <= 120
    wop = _weight_operand(m)
    # the epilogue's zero-point term: S from its stored int8 halves is the weight operand's group sums
    neg_hi, neg_lo = zero_point_sums(m, plan)
    assert int(neg_lo.max()) <= 0 and int(neg_hi.abs().max()) <= 60
    sums = -(128 * neg_hi.long() + neg_lo.long())
    assert torch.equal(sums, wop.long().view(m.out_features, -1, g).sum(-1))
    acc = w4a4_gemm(m, plan, act, torch.float32, debug_int=True)
    assert torch.equal(acc.long(), act["codes"].long() @ wop.long().T - act["zero"].long() @ sums.T)
    for split in (2, 3):  # the term once, in split 0, however K is split
        assert torch.equal(w4a4_gemm(m, plan, act, torch.float32, debug_int=True, split=split), acc)
    y = w4a4_gemm(m, plan, act, torch.float32)
    assert _rel(y, _exact_output(m, qt, act["c"] if r else None)) < 2e-6
    assert _rel(y, m.reference_forward(x)) < 2e-3
    assert _rel(kernels.kernel_forward(m, x), m.reference_forward(x)) < 2e-3


def test_asymmetric_activations_in_format_a_fall_back_with_warning():
    m = make_layer("rtn", "exact", d=64, o=16)
    m.act_symmetric = False
    x = make_input(4, 64)
    kernels._WARNED.clear()
    with pytest.warns(RuntimeWarning, match="asymmetric"):
        y = kernels.kernel_forward(m, x)
    assert torch.equal(y, m.reference_forward(x))
    backend, kind = modules.layer_backend(m, device="cuda")  # what a CUDA run would do
    assert backend == "reference" and ("asymmetric" in kind or "unavailable" in kind)


def test_original_basis_falls_back():
    m = make_layer("quarot-dense", "exact", d=64, o=16)
    m.weights_in_original_basis = True
    kernels._WARNED.clear()
    with pytest.warns(RuntimeWarning, match="original_basis"):
        kernels.kernel_forward(m, make_input(2, 64))


def test_kernels_import_lazily():
    import subprocess
    import sys

    code = "import sys, dirotq.kernels, dirotq.modules; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "False"


def test_simd_unpack_arithmetic():
    """The SIMD unpack's 32-bit arithmetic (w4a4_gemm._ASM_*), emulated on every byte value and every
    k: four lanes per word, no carry between lanes, equals the sign-extended nibble (× k)."""
    b = torch.arange(256, dtype=torch.int64)
    words = b | (b.roll(1) << 8) | (b.roll(2) << 16) | (b.roll(3) << 24)  # every byte in every lane
    m32 = 0xFFFFFFFF

    def lanes(w):
        return [((w >> (8 * i)) & 0xFF) for i in range(4)]

    def s8(v):
        return torch.where(v > 127, v - 256, v)

    for hi in (False, True):
        src = (words >> 4) if hi else words
        nib = [((lane >> 4) if hi else lane) & 0xF for lane in lanes(words)]
        q = [torch.where(n > 7, n - 16, n) for n in nib]
        t = ((src & 0x0F0F0F0F) ^ 0x08080808) & m32
        a = ((t + 0x78787878) & m32) ^ 0x80808080
        assert all(torch.equal(s8(x), y) for x, y in zip(lanes(a), q))
        for k in range(1, 16):
            c = ((t * k) & m32)
            c = (c + ((0x80808080 - ((k * 0x08080808) & m32)) & m32)) & m32
            c = c ^ 0x80808080
            assert all(torch.equal(s8(x), y * k) for x, y in zip(lanes(c), q))


# --- the Gluon GEMMs' host side, without a GPU ---------------------------------------------------
class _LaunchRecorder:
    """Stands in for a Gluon kernel object (which cannot launch on a CPU): records the grid and the
    arguments of one launch and keeps the real kernel's parameter list to check them against."""

    def __init__(self, kernel):
        self.params = kernel.params
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


@pytest.mark.parametrize("which,config,weights,int_out", [
    ("gluon", None, "packed", False), ("gluon", dict(BT=256, num_warps=8), "packed", True),
    ("tma", None, "packed", False), ("tma", dict(BT=256, num_warps=8, NS=6, NBU=2), "int8", True),
    ("ws", None, "packed", False), ("ws", dict(BT=256, num_warps=8, maxnreg=128), "packed", True)])
def test_gluon_launchers_pass_every_kernel_parameter(which, config, weights, int_out, monkeypatch):
    """The GPU-only Gluon GEMMs' launch wrappers, run on the CPU against a recorder of the launch:
    one positional argument per runtime parameter and one keyword per constexpr of the real kernel
    (plus launch options), tensors where the kernel takes pointers, TMA descriptors with the tile's
    box shapes, and the grid of token × output tiles. What a GPU session would otherwise find first."""
    from dirotq.kernels import gluon_gemm as gg

    kernel_name, launch = {"gluon": ("gluon_gemm_kernel", gg._launch), "tma": ("gluon_tma_gemm_kernel", gg._launch_tma),
                           "ws": ("gluon_ws_gemm_kernel", gg._launch_ws)}[which]
    rec = _LaunchRecorder(getattr(gg, kernel_name))
    monkeypatch.setattr(gg, kernel_name, rec)
    m = make_layer("dirotq-lr", "int_ratio", d=192, o=200, r=16)
    m.kernel_weights = weights
    x = make_input(130, 192)
    plan = get_plan(m, x)
    act = quantize_activations(m, plan, x)
    y = torch.empty((130, 200), dtype=torch.int32 if int_out else torch.float32)
    if which == "gluon":
        launch(m, plan, act, y, 2, int_out, config)
    else:
        launch(m, plan, act, y, int_out, config)
    (grid, args, kwargs), = rec.calls
    runtime = [p for p in rec.params if not p.is_constexpr]
    constexprs = {p.name for p in rec.params if p.is_constexpr}
    assert len(args) == len(runtime), [p.name for p in runtime]
    assert set(kwargs) - {"num_warps", "maxnreg"} == constexprs
    cfg = {"gluon": {"BT": gg.BT, "BO": gg.BO}, "tma": gg.TMA_CONFIG, "ws": gg.WS_CONFIG}[which] | (config or {})
    assert grid == (-(-130 // cfg["BT"]), -(-200 // cfg["BO"]))
    assert kwargs["INT_OUT"] == int_out and kwargs["HAS_LR"] == (not int_out) and kwargs["HAS_BIAS"] == (not int_out)
    for p, a in zip(runtime, args):
        if p.name.endswith("_ptr"):
            assert isinstance(a, torch.Tensor), p.name
        elif p.name.endswith("_desc"):
            box = cfg["BT"] if p.name == "x_desc" else cfg["BO"]
            assert list(a.block_shape) == [box, 32] and a.base.dtype in (torch.int8, torch.uint8), p.name
        else:
            assert isinstance(a, int), (p.name, a)
    named = dict(zip([p.name for p in runtime], args))
    assert named["y_ptr"] is y and named["n"] == 130 and named["o"] == 200 and named["G"] == plan.groups
    if which == "tma":
        assert kwargs["W_INT8"] == (weights == "int8")
        w_desc = named["w_desc"]
        assert w_desc.base is (plan.w_int8 if weights == "int8" else m.weight_packed)


# --- compiled for Hopper without a GPU ----------------------------------------------------------
def test_kernels_compile_for_sm90_without_spills():
    """Triton → PTX → ptxas for sm_90a on this (CPU) machine: every variant compiles, the GEMM runs on
    int8 wgmma with cp.async pipelining, no register spills, no libdevice calls."""
    import json
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "dirotq.kernels.aot_check"], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert rows, out.stderr[-2000:]
    probe = [r for r in rows if "probe" in r]
    rows = [r for r in rows if "probe" not in r]
    # what docs/KERNELS.md says of this Triton: a plain FP8 GEMM keeps one MMA in flight (wait 1), the
    # same GEMM in int8 waits for every MMA (wait 0 only); if a Triton upgrade changes that, the
    # kernels' design notes must change with it
    assert probe and probe[0]["wait_depths"] == {"int8": [0], "fp8e4m3": [0, 1]}, probe
    # the Gluon core says itself that MMAs stay in flight: 2 per group for the one before
    # (the whole GEMM's variants too, 2·(NBUF − 1) each); no operand comes from registers
    gluon = [r for r in rows if r["variant"].startswith("gluon ")]
    assert len(gluon) == 5 and all(r["ok"] for r in gluon), gluon
    for r in gluon:
        nbuf = 3 if "nbuf3" in r["variant"] else 2
        assert max(r["wgmma_wait_depths"]) == 2 * (nbuf - 1) and r["int8_wgmma_a_from_registers"] == 0, r
    # the TMA-fed one too (2·(NBU − 1) MMAs in flight), its operands brought by bulk tensor copies
    # completing on mbarriers, none by cp.async or plain loads into registers for the MMA
    tma = {r["variant"]: r for r in rows if r["variant"].startswith("gluon-tma")}
    assert len(tma) == 7 and all(r["ok"] for r in tma.values()), tma
    for name, r in tma.items():
        nbu = 3 if "nbu3" in name else 2
        assert max(r["wgmma_wait_depths"]) == 2 * (nbu - 1) and r["int8_wgmma_a_from_registers"] == 0, r
        assert r["tma_loads"] > 0 and r["mbarrier_waits"] > 0 and r["cp_async"] == 0, r
        assert r["simd_unpack_asm"] == ("int8-weights" not in name and "scalar" not in name), r
    # its warp-specialized form: a TMA warp, unpack warps and the MMA warps, registers handed between them
    ws = [r for r in rows if r["variant"].startswith("gluon-ws")]
    assert len(ws) == 3 and all(r["ok"] for r in ws), ws
    for r in ws:
        assert max(r["wgmma_wait_depths"]) == 2 and r["int8_wgmma_a_from_registers"] == 0, r
        assert r["tma_loads"] > 0 and r["mbarrier_waits"] >= 3 and r["setmaxnreg"] > 0 and r["simd_unpack_asm"], r
    # the SIMD unpack halves the K loop's instructions (per thread and group; docs/KERNELS.md quotes them)
    simd, scalar = (tma[f"gluon-tma C gemm+lr+bias 256x128 ns6 nbu2 w8{s}"]["loop_instructions"]
                    for s in ("", " scalar-unpack"))
    assert 0 < simd < 0.6 * scalar, (simd, scalar)
    for row in rows:
        assert row["ok"], row
        assert row["libdevice_calls"] == 0, row
        if row["variant"].startswith("act"):  # compiled without FMA contraction: the reference's rounding
            assert row["fma_f32"] == 0, row
            # format C's multiplier choice is float32 fixed point per value; float64 only compares the
            # two candidates once per row and group (172–294 float64 instructions before revision 4)
            assert row["f64_instructions"] <= 32, row
            # codes are written through the magic-number bits, not float → int conversions (34 per
            # BT = 128 tile before): what remains is the per-row multiplier and zero point
            assert row["f32_to_int"] <= 8, row
            if row.get("sass_loop_instructions") is not None:  # nvdisasm ships with Triton's CUDA backend
                assert row["sass_instructions_per_value"] > 0, row
    act = {r["variant"]: r for r in rows if r["variant"].startswith("act C lowrank+hadamard BT128 w8")}
    # format C's second pass at the H200's tile issues about 26 SASS instructions per value with
    # symmetric codes (47 before the magic-number codes, the no-op clamps and revision 5's choice of
    # k from the spread); capped at 128 registers it fits two programs per SM
    capped = act["act C lowrank+hadamard BT128 w8 maxnreg128"]
    assert capped["registers"] <= 128 and capped["programs_per_sm"] >= 2, capped
    if act["act C lowrank+hadamard BT128 w8"].get("sass_instructions_per_value") is not None:
        assert act["act C lowrank+hadamard BT128 w8"]["sass_instructions_per_value"] < 30, act
        if row.get("spill_bytes") is not None:
            # the register-capped activation tile (an autotuning candidate for two programs per SM)
            # may spill a few bytes to L1; nothing else spills
            assert row["spill_bytes"] <= (64 if "maxnreg" in row["variant"] else 0), row
        if row["variant"].startswith("gemm"):
            assert row["int8_wgmma"] > 0 and row["cp_async"] > 0, row
            assert row["simd_unpack_asm"] == ("simd" in row["variant"]), row
            # the unpacked weight is wgmma's register operand in the swap-AB kernel and a shared-memory
            # operand in the token-major one (cached int8 weights are loaded into shared memory in both)
            from_registers = row["variant"].startswith("gemm ") and "int8-weights" not in row["variant"]
            assert (row["int8_wgmma_a_from_registers"] > 0) == from_registers, row


# --- CUDA (real shapes) ---------------------------------------------------------------------------
cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("d,o,n", [(256, 3072, 2), (4096, 3072, 512), (3072, 18432, 2)])
def test_cuda_w8a16_bf16(d, o, n):
    """FLUX's conditioning linears as W8A16 (timestep embedder, context embedder, adaLN) on the GPU:
    the kernel against exact math on the same dequantized weights, bf16 output rounding."""
    m = _w8a16_layer(d, o, torch.bfloat16).cuda()
    x = make_input(n, d).cuda().bfloat16()
    assert get_plan(m, x).weight_bits == 8
    y = m(x)
    assert y.dtype == torch.bfloat16 and m._kernel_backend_used == "triton"
    y64 = x.double() @ m.dequantized_weight().double().T + m.bias.double()
    assert _rel(y.float(), y64) < 1e-2


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("symmetric", [True, False])
def test_cuda_format_c_codes_on_the_decision_edges(symmetric):
    """The edge rows of test_format_c_codes_on_the_decision_edges through the compiled kernel: the
    magic-number codes and the spread rule's comparison must survive the GPU's instruction
    selection (fused multiply-adds, fast reciprocals) bit for bit."""
    _check_format_c_edges(symmetric, "cuda")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("structure,d,o,r", [("dirotq-lr", 1152, 3456, 32), ("rtn", 3072, 3072, 0),
                                             ("svdquant", 4608, 1152, 32), ("dirotq", 1152, 1152, 64)])
@pytest.mark.parametrize("n", [16, 1000])
def test_cuda_real_shapes(structure, d, o, r, n, fmt):
    m = make_layer(structure, fmt, d=d, o=o, r=r).cuda()
    x = make_input(n, d).cuda()
    plan = get_plan(m, x)
    act = quantize_activations(m, plan, x, store_a=True)
    qt = quantize_acts(act["a"][:, : m.quant_in_features], 64, True, fmt)
    codes = qt.q if fmt == "exact" else qt.q * qt.ratio.repeat_interleave(64, -1)
    assert torch.equal(act["codes"], codes)
    acc = w4a4_gemm(m, plan, act, torch.float32, debug_int=True)  # SIMD unpack (the GPU default)
    assert torch.equal(acc.double(), act["codes"].double() @ _weight_operand(m).double().T)
    assert torch.equal(w4a4_gemm(m, plan, act, torch.float32, debug_int=True, simd=False), acc)
    from dirotq.kernels.w4a4_gemm import unpack_weights

    from dirotq.kernels.w4a4_gemm import _SIMD_OK

    assert _SIMD_OK.get(fmt == "int_ratio", True), "the SIMD unpack self-check failed on this GPU"
    assert torch.equal(unpack_weights(m, simd=True), _weight_operand(m))
    assert torch.equal(unpack_weights(m, simd=False), _weight_operand(m))
    # fp32: the kernel's output is exact math on its own codes; against the reference path (whose
    # transform sums in another order) codes may flip where a value sits on a rounding boundary and,
    # in format C, a group may take the other of its two multipliers (k₀ vs k₀ − 1 tie on squared
    # error: the H200 run of 2026-11-28 saw up to 1.4 % of the output's max from such groups), so the
    # reference is checked by flip rate, the output only loosely
    y = kernels.kernel_forward(m, x)
    assert _rel(y, _exact_output(m, qt, act["c"])) < 1e-4
    _, a_ref32 = m.transform_input(x)
    assert float((quantize_acts(a_ref32, 64, True, fmt).q != qt.q).float().mean()) <= 0.005
    assert _rel(y, m.reference_forward(x)) < 3e-2
    # the production dtype. bf16 inputs put many values exactly on rounding ties (about 0.3 % of a
    # no-rotation layer's inputs here), so compare codes byte for byte against the reference quantizer
    # on the kernel's own transformed input, the output against exact math on those codes, and the
    # reference path's own codes (its transform rounds differently in the last bit) by flip rate
    mb = make_layer(structure, fmt, d=d, o=o, r=r, dtype=torch.bfloat16).cuda()
    xb = x.bfloat16()
    yb = mb(xb)
    assert yb.dtype == torch.bfloat16
    actb = quantize_activations(mb, get_plan(mb, xb), xb, store_a=True)
    qtb = quantize_acts(actb["a"][:, : mb.quant_in_features], 64, True, fmt)
    assert torch.equal(actb["codes"], qtb.q if fmt == "exact" else qtb.q * qtb.ratio.repeat_interleave(64, -1))
    assert _rel(yb.float(), _exact_output(mb, qtb, actb["c"] if r else None)) < 1e-2  # bf16 output rounding
    _, a_ref = mb.transform_input(xb.float())
    assert float((quantize_acts(a_ref, 64, True, fmt).q != qtb.q).float().mean()) <= 0.01


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("d,o,n", [(3072, 3072, 1000), (1152, 4608, 300)])
def test_cuda_gluon_core_equals_the_triton_int32_sums(d, o, n):
    """The Gluon format C core (asynchronous int8 wgmma) gives the Triton GEMM's int32 sums exactly."""
    try:  # Gluon is experimental: older Tritons (the GPU image's) may lack its Hopper API
        from dirotq.kernels.gluon_gemm import gluon_core_int32
    except ImportError as exc:
        pytest.skip(f"this Triton's Gluon has no Hopper warpgroup MMA API: {exc}")

    m = make_layer("dirotq-lr", "int_ratio", d=d, o=o, r=32, dtype=torch.bfloat16).cuda()
    x = make_input(n, d).cuda().bfloat16()
    plan = get_plan(m, x)
    act = quantize_activations(m, plan, x)
    assert torch.equal(gluon_core_int32(m, plan, act), w4a4_gemm(m, plan, act, torch.float32, debug_int=True))


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("structure,d,o,r,n,config,nbuf", [
    ("dirotq-lr", 3072, 3072, 32, 1000, None, 2), ("dirotq-lr", 3072, 3072, 32, 1000, None, 3),
    ("dirotq-lr", 3072, 3072, 32, 1000, dict(BT=256, BO=128, num_warps=8), 2),
    ("dirotq-lr", 3072, 3072, 32, 1000, dict(BT=256, BO=128, num_warps=8, PREFETCH=True), 2),
    ("dirotq-lr", 1152, 3456, 48, 300, None, 2), ("svdquant", 4608, 1152, 32, 200, None, 2),
    ("rtn", 1152, 4608, 0, 130, None, 2)])
def test_cuda_gluon_gemm_matches_the_triton_gemm(structure, d, o, r, n, config, nbuf, monkeypatch):
    """The whole Gluon format C GEMM (scales, 16-bit branch as a wgmma, bias) on every tile config:
    the Triton GEMM's output within float rounding, every element written (NaN-poisoned output), and
    ``DIROTQ_GEMM_LAYOUT=gluon`` routes the layer's forward through it."""
    try:
        from dirotq.kernels.gluon_gemm import gluon_w4a4_gemm
    except ImportError as exc:
        pytest.skip(f"this Triton's Gluon has no Hopper warpgroup MMA API: {exc}")

    m = make_layer(structure, "int_ratio", d=d, o=o, r=r, dtype=torch.bfloat16).cuda()
    x = make_input(n, d).cuda().bfloat16()
    plan = get_plan(m, x)
    act = quantize_activations(m, plan, x)
    ref = w4a4_gemm(m, plan, act, torch.float32, layout="swap")
    y = gluon_w4a4_gemm(m, plan, act, torch.float32, nbuf=nbuf, config=config)
    assert not torch.isnan(y).any()
    assert _rel(y, ref) < 1e-4
    assert _rel(w4a4_gemm(m, plan, act, torch.bfloat16, layout="gluon").float(), ref) < 1e-2
    monkeypatch.setenv("DIROTQ_GEMM_LAYOUT", "gluon")
    assert torch.equal(kernels.kernel_forward(m, x), gluon_w4a4_gemm(m, plan, act, torch.bfloat16))


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("layout,structure,d,o,r,n,config,weights", [
    ("tma", "dirotq-lr", 3072, 3072, 32, 1000, None, "packed"),
    ("tma", "dirotq-lr", 3072, 3072, 32, 1000, dict(BT=256, BO=128, num_warps=8), "packed"),
    ("tma", "dirotq-lr", 3072, 3072, 32, 1000, dict(NS=8, NBU=3), "packed"),
    ("tma", "dirotq-lr", 3072, 3072, 32, 1000, None, "int8"),
    ("tma", "dirotq-lr", 1152, 3456, 48, 300, None, "packed"), ("tma", "svdquant", 4608, 1152, 32, 200, None, "packed"),
    ("tma", "rtn", 1152, 4608, 0, 130, None, "int8"),
    ("tma", "rtn", 192, 200, 0, 129, None, "packed"),  # fewer groups than stages; o and n past a tile edge
    ("ws", "dirotq-lr", 3072, 3072, 32, 1000, None, "packed"),
    ("ws", "dirotq-lr", 3072, 3072, 32, 1000, dict(BT=256, BO=128, num_warps=8, maxnreg=128), "packed"),
    ("ws", "dirotq-lr", 3072, 3072, 32, 1000, dict(SIMD=False), "packed"),
    ("ws", "dirotq-lr", 1152, 3456, 48, 300, None, "packed"), ("ws", "svdquant", 4608, 1152, 32, 200, None, "packed"),
    ("ws", "rtn", 192, 200, 0, 129, None, "packed")])
def test_cuda_tma_gemms_match_the_triton_gemm(layout, structure, d, o, r, n, config, weights, monkeypatch):
    """The TMA-fed Gluon GEMM ("tma") and its warp-specialized form ("ws": TMA warp, unpack warps, MMA
    warps handing stages on through mbarriers): the Triton kernel's int32 sums exactly, the output
    within float rounding on every tile config and weight mode, every element written, and
    ``DIROTQ_GEMM_LAYOUT`` routes the layer's forward through it."""
    try:
        from dirotq.kernels import gluon_gemm
    except ImportError as exc:
        pytest.skip(f"this Triton's Gluon has no Hopper TMA API: {exc}")
    core = getattr(gluon_gemm, f"gluon_{layout}_core_int32")
    gemm = getattr(gluon_gemm, f"gluon_{layout}_w4a4_gemm")

    m = make_layer(structure, "int_ratio", d=d, o=o, r=r, dtype=torch.bfloat16).cuda()
    m.kernel_weights = weights
    x = make_input(n, d).cuda().bfloat16()
    plan = get_plan(m, x)
    assert (plan.w_int8 is not None) == (weights == "int8")
    act = quantize_activations(m, plan, x)
    sums = w4a4_gemm(m, plan, act, torch.float32, debug_int=True, layout="swap")
    assert torch.equal(core(m, plan, act, config=config), sums)
    ref = w4a4_gemm(m, plan, act, torch.float32, layout="swap")
    y = gemm(m, plan, act, torch.float32, config=config)
    assert not torch.isnan(y).any()
    assert _rel(y, ref) < 1e-4
    # GELU on a column range in the epilogue, as the swap-AB kernel applies it
    gelu = ("gelu_tanh", 64, o - 64)
    assert _rel(gemm(m, plan, act, torch.float32, config=config, activation=gelu),
                w4a4_gemm(m, plan, act, torch.float32, layout="swap", activation=gelu)) < 1e-4
    monkeypatch.setenv("DIROTQ_GEMM_LAYOUT", layout)
    assert torch.equal(kernels.kernel_forward(m, x), gemm(m, plan, act, torch.bfloat16))


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("symmetric", [True, False])
def test_cuda_token_major_gemm(symmetric):
    """The token-major GEMM on the GPU: the same int32 sums as the swap-AB kernel (FLUX width, 1000
    tokens), the float output within rounding of it."""
    m = make_layer("dirotq-lr", "int_ratio", d=3072, o=3072, r=32, dtype=torch.bfloat16).cuda()
    m.act_symmetric = symmetric
    x = (make_input(1000, 3072) + (0.0 if symmetric else 0.7)).cuda().bfloat16()
    plan = get_plan(m, x)
    act = quantize_activations(m, plan, x)
    swap = w4a4_gemm(m, plan, act, torch.float32, debug_int=True, layout="swap")
    assert torch.equal(w4a4_gemm(m, plan, act, torch.float32, debug_int=True, layout="token"), swap)
    y = w4a4_gemm(m, plan, act, torch.float32, layout="swap")
    assert _rel(w4a4_gemm(m, plan, act, torch.float32, layout="token"), y) < 1e-5


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("n", [16, 1000])  # 16 tokens: K splits, the activation after the kernel
def test_cuda_gemm_epilogue_gelu(n):
    """PixArt-Σ's MLP up-projection (1152 → 4608) in bf16: the GEMM with GELU (tanh form) in its
    epilogue against the GEMM followed by torch's GELU, within one bf16 rounding."""
    import torch.nn.functional as F

    m = make_layer("dirotq-lr", "int_ratio", d=1152, o=4608, r=32, dtype=torch.bfloat16).cuda()
    x = make_input(n, 1152).cuda().bfloat16()
    plan = get_plan(m, x)
    act = quantize_activations(m, plan, x)
    plain = w4a4_gemm(m, plan, act, torch.bfloat16)
    fused = w4a4_gemm(m, plan, act, torch.bfloat16, activation=("gelu_tanh", 0, 4608))
    assert _rel(fused, F.gelu(plain, approximate="tanh")) < 1e-2


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("d,n", [(1152, 1000)])
def test_cuda_one_launch_activation_kernel(d, n, symmetric):
    """The one-launch activation path on the GPU (bf16, DiRotQ-LR r32, format C): codes are the
    reference quantizer's on its own transformed input, close to the launch grid's, and the layer's
    output is exact math on them."""
    m = make_layer("dirotq-lr", "int_ratio", d=d, o=1024, r=32, dtype=torch.bfloat16).cuda()
    m.act_symmetric = symmetric
    x = (make_input(n, d) + (0.0 if symmetric else 0.7)).cuda().bfloat16()
    plan = get_plan(m, x)
    one = quantize_activations(m, plan, x, store_a=True, one_launch=True)
    grid = quantize_activations(m, plan, x, store_a=True, one_launch=False)
    qt = quantize_acts(one["a"][:, : m.quant_in_features], 64, symmetric, "int_ratio")
    k = qt.ratio.to(torch.int32).repeat_interleave(64, -1)
    assert torch.equal(one["codes"].int(), (qt.q.int() - (0 if symmetric else 8)) * k)
    assert float((one["codes"] != grid["codes"]).float().mean()) <= 0.01
    y = w4a4_gemm(m, plan, one, torch.float32)
    assert _rel(y, _exact_output(m, qt, one["c"])) < 1e-2  # bf16 c and output rounding


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("structure,d,o,r", [("dirotq-lr", 1152, 3456, 32), ("svdquant", 4608, 1152, 32)])
@pytest.mark.parametrize("n", [16, 1000])
def test_cuda_asymmetric_format_c(structure, d, o, r, n):
    """Asymmetric format C on the GPU: codes, zero terms and output as on the CPU interpreter."""
    m = make_layer(structure, "int_ratio", d=d, o=o, r=r).cuda()
    m.act_symmetric = False
    x = (make_input(n, d) + 0.7).cuda()
    plan = get_plan(m, x)
    assert plan.kind == "w4a4" and plan.asym
    act = quantize_activations(m, plan, x, store_a=True)
    qt = quantize_acts(act["a"][:, : m.quant_in_features], 64, False, "int_ratio")
    k = qt.ratio.to(torch.int32)
    assert torch.equal(act["codes"].int(), (qt.q.int() - 8) * k.repeat_interleave(64, -1))
    assert torch.equal(act["zero"].int(), (qt.zero.int() - 8) * k)
    assert _rel(kernels.kernel_forward(m, x), m.reference_forward(x)) < 5e-3


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_tiny_generation_psnr(fmt):
    tiny = pytest.importorskip("tiny_pipelines")
    import dirotq

    pipe = tiny.build_tiny_pixart_pipeline().to("cuda")
    stats = dirotq.calibrate(pipe, ["a red circle", "two blue squares"], num_inference_steps=4)
    dirotq.quantize_(pipe.transformer, dirotq.DiRotQLRConfig(rank=16, basis="pca", scale_format=fmt), stats)
    images = {}
    for backend in ("reference", "triton"):
        os.environ["DIROTQ_BACKEND"] = backend
        try:
            g = torch.Generator("cuda").manual_seed(0)
            out = pipe("a red circle", num_inference_steps=4, generator=g, output_type="pt",
                       max_sequence_length=16, use_resolution_binning=False)
            images[backend] = out.images.float()
        finally:
            os.environ.pop("DIROTQ_BACKEND", None)
    mse = float((images["triton"] - images["reference"]).pow(2).mean())
    psnr = 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12)))
    assert psnr >= (40.0 if fmt == "exact" else 30.0)


def test_host_integer_helpers_equal_triton_s():
    """The plain-Python cdiv / next_power_of_2 the launchers use (Triton's are constexpr functions,
    slow from host code) give Triton's integers."""
    from dirotq.kernels.host_ints import cdiv, next_power_of_2

    for n in [*range(1, 1100), 2**20 - 1, 2**20, 2**20 + 1, 4096 * 4608]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 3, 16, 64, 128, 1000):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)
    assert cdiv(0, 16) == 0


def test_activation_tiles_pruned_by_token_bucket():
    """Large token buckets try only the H200's competitive tiles (BT 64–128), small ones the tiles
    that fit their rows; every bucket keeps at least one config."""
    from dirotq.kernels.act_quant import _tuned_act_kernel, prune_act_configs

    configs = _tuned_act_kernel().configs
    for n in (16, 32, 64, 128, 512, 1024, 4096, 65536):
        kept = prune_act_configs(configs, {"N_KEY": n})
        tiles = {c.kwargs["BT"] for c in kept}
        assert kept and all(c in configs for c in kept)
        assert tiles == ({64, 128} if n >= 1024 else {bt for bt in (16, 32, 64) if bt <= max(16, n)})
    assert len(prune_act_configs(configs, {"N_KEY": 4096})) < len(configs)
