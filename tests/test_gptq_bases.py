"""Claims about GPTQ, PCA bases, rotations and rank policies."""

import pytest
import torch

from dirotq.bases import (
    allocate_ranks, explained_variance, full_rotation, haar_orthogonal, hadamard, hsvd_lowrank,
    paper_rank, pca_basis, pca_top_basis, per_head_basis, random_hadamard, random_signs, rank_for_energy,
    rank_for_error_budget, weight_svd,
)
from dirotq.gptq import gptq_quantize, gptq_quantize_batch
from dirotq.methods import common
from dirotq.quantizers import quantize


def correlated_inputs(n=3000, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    return torch.randn(n, d, generator=g) @ mix * 2 + 0.3 * torch.randn(n, d, generator=g)


def output_error(x, w, w_hat):
    return float(((x @ (w - w_hat).T) ** 2).sum() / ((x @ w.T) ** 2).sum())


def test_gptq_beats_rtn_on_correlated_inputs():
    x = correlated_inputs()
    w = torch.randn(96, 128)
    h = x.T @ x
    e_rtn = output_error(x, w, quantize(w).dequantize())
    e_gptq = output_error(x, w, gptq_quantize(w, h).dequantize())
    e_act = output_error(x, w, gptq_quantize(w, h, act_order=True).dequantize())
    assert e_gptq < 0.7 * e_rtn
    assert e_act < 0.7 * e_rtn


def test_gptq_with_identity_hessian_is_rtn():
    w = torch.randn(40, 192)
    for fmt in ("exact", "int_ratio"):
        g = gptq_quantize(w, torch.eye(192), scale_format=fmt)
        r = quantize(w, scale_format=fmt, row_search=fmt == "int_ratio")  # what RTN weights use
        assert torch.equal(g.q, r.q)
        assert torch.allclose(g.dequantize(), r.dequantize(), rtol=1e-5, atol=1e-7)


def _gptq_float64_rederivation(w, h, damping=0.01, g=64):
    """Textbook GPTQ, one column at a time with the explicit inverse Hessian update (no Cholesky,
    no blocks): after quantizing column i, W[:, j>i] -= err · Hinv[i, j] / Hinv[i, i], then Hinv is
    reduced by Gaussian elimination of row/column i."""
    w = w.double().clone()
    d = w.shape[1]
    h = h.double() + damping * h.diagonal().double().mean() * torch.eye(d, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    q_all = torch.zeros_like(w)
    step = None
    for i in range(d):
        if i % g == 0:
            step = (w[:, i:i + g].abs().amax(1) / 7).clamp(min=1e-12)
        q = torch.clamp(torch.round(w[:, i] / step), -8, 7)
        q_all[:, i] = q
        err = (w[:, i] - q * step) / hinv[i, i]
        w[:, i + 1:] -= err.unsqueeze(1) * hinv[i, i + 1:].unsqueeze(0)
        hinv = hinv - torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return q_all


def test_gptq_matches_an_independent_float64_rederivation():
    x = correlated_inputs(n=500, d=128, seed=4)
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(5))
    h = x.T @ x
    ref = _gptq_float64_rederivation(w, h)
    got = gptq_quantize(w, h, block_size=64).q.double()
    # rounding ties can flip in float arithmetic; demand near-total agreement
    assert (ref != got).float().mean() < 0.01


def test_pca_basis_is_sorted_and_reconstructs():
    x = correlated_inputs(d=64)
    c = x.T.double() @ x.double()
    ev, v = pca_basis(c)
    assert (ev[:-1] >= ev[1:] - 1e-9).all()
    assert torch.allclose(v @ torch.diag(ev) @ v.T, c, atol=1e-6 * c.abs().max())
    curve = explained_variance(ev)
    assert curve[0] == 0 and abs(float(curve[-1]) - 1) < 1e-12
    assert rank_for_energy(ev, 1.0) <= 64 and rank_for_energy(ev, 0.0) == 0
    r = rank_for_energy(ev, 0.9)
    assert curve[r] >= 0.9 and curve[r - 1] < 0.9


def test_rotations_are_orthogonal():
    eye = lambda n: torch.eye(n, dtype=torch.float64)
    h = hadamard(64)
    assert torch.allclose(h @ h.T, eye(64), atol=1e-12)
    assert set(torch.unique(h.abs() * 8).tolist()) == {1.0}
    for d in (128, 1152):
        rh = random_hadamard(d, seed=3)
        assert torch.allclose(rh @ rh.T, eye(d), atol=1e-10)
    q = haar_orthogonal(50, seed=42)
    assert torch.allclose(q @ q.T, eye(50), atol=1e-10)
    assert torch.equal(q, haar_orthogonal(50, seed=42))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(96)


def test_full_rotation_keeps_the_top_directions_and_is_orthogonal():
    x = correlated_inputs(d=64)
    _, v = pca_basis(x.T @ x)
    t = full_rotation(v, 8, "haar", 42)
    assert torch.allclose(t.T @ t, torch.eye(64, dtype=torch.float64), atol=1e-10)
    assert torch.equal(t[:, :8], v[:, :8])
    assert torch.allclose(full_rotation(v, 64), v)


def test_per_head_basis_is_block_diagonal():
    x = correlated_inputs(d=64)
    ev, v = per_head_basis(x.T @ x, 16)
    assert v[:16, 16:].abs().max() == 0 and v.shape == (64, 64)
    assert torch.allclose(v.T @ v, torch.eye(64, dtype=torch.float64), atol=1e-10)


def test_hsvd_beats_plain_svd_on_the_activation_weighted_error():
    x = correlated_inputs(d=96, seed=7)
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(8))
    h = x.T @ x
    down, up = hsvd_lowrank(w, h, 8, damping=1e-6)
    d2, u2 = weight_svd(w, 8)
    e_h = output_error(x, w, (up @ down.T).float())
    e_w = output_error(x, w, (u2 @ d2.T).float())
    assert e_h < e_w
    # huge damping recovers the plain SVD
    down_big, up_big = hsvd_lowrank(w, h, 8, damping=1e8)
    assert torch.allclose(up_big @ down_big.T, u2 @ d2.T, atol=1e-3)


def test_rank_policies():
    assert paper_rank(1152) == 192 and paper_rank(3072) == 384 and paper_rank(2240) == 320
    errors = {0: 1.0, 8: 0.5, 16: 0.2, 32: 0.1}
    assert rank_for_error_budget(errors.__getitem__, 0.25, errors) == 16
    assert rank_for_error_budget(errors.__getitem__, 0.01, errors) == 32
    plan = allocate_ranks({"a": {0: 1.0, 8: 0.1}, "b": {0: 1.0, 8: 0.9}}, {"a": 1.0, "b": 1.0}, budget=8)
    assert plan == {"a": 8, "b": 0}


def _same(a, b):
    return (torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)
            and (a.ratio is None) == (b.ratio is None) and (a.ratio is None or torch.equal(a.ratio, b.ratio)))


@pytest.mark.parametrize("fmt", ["exact", "int_ratio"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_batch_equals_one_layer_at_a_time_exactly(fmt, act_order):
    """Layers of one width, different output sizes (q/k/v and an MLP of one group): one shared
    Hessian (rows concatenated) and distinct Hessians (a batch dimension; the same object twice is
    factorised once) give the codes, scales and multipliers of gptq_quantize bit for bit."""
    g = torch.Generator().manual_seed(11)
    d = 192
    h1 = correlated_inputs(n=600, d=d, seed=1)
    h1 = h1.T @ h1
    h1[7, :] = 0  # a dead input channel
    h1[:, 7] = 0
    h2 = correlated_inputs(n=600, d=d, seed=2)
    h2 = h2.T @ h2
    ws = [torch.randn(o, d, generator=g) for o in (48, 48, 20, 96)]
    kw = dict(scale_format=fmt, act_order=act_order)
    shared = gptq_quantize_batch(ws, h1, **kw)
    assert all(_same(b, gptq_quantize(w, h1, **kw)) for w, b in zip(ws, shared))
    hs = [h1, h2, h1, h2]
    distinct = gptq_quantize_batch(ws, hs, **kw)
    assert all(_same(b, gptq_quantize(w, h, **kw)) for w, h, b in zip(ws, hs, distinct))
    stacked = gptq_quantize_batch(ws, torch.stack(hs), **kw)
    assert all(_same(a, b) for a, b in zip(distinct, stacked))
    with pytest.raises(ValueError, match="one width"):
        gptq_quantize_batch([ws[0], torch.randn(4, 64)], h1)
    with pytest.raises(ValueError, match="4 weights"):
        gptq_quantize_batch(ws, [h1, h2])


def test_gptq_in_float32_stays_close_to_float64():
    x = correlated_inputs(n=800, d=128, seed=3)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    h = x.T @ x
    e64 = output_error(x, w, gptq_quantize(w, h).dequantize())
    e32 = output_error(x, w, gptq_quantize(w, h, dtype=torch.float32).dequantize())
    assert abs(e32 - e64) < 0.05 * e64


def test_top_basis_spans_the_top_eigenvectors():
    """Subspace iteration (used when only V_r is needed, at FLUX widths) finds eigh's top-r
    subspace and eigenvalues; small widths go to eigh itself."""
    g = torch.Generator().manual_seed(5)
    d, r = 640, 24
    q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    ev = torch.logspace(4, -2, d, dtype=torch.float64)  # a decaying spectrum, as activations have
    c = (q * ev) @ q.T
    vals, v = pca_top_basis(c, r)
    ref_vals, ref_v = pca_basis(c)
    assert v.shape == (d, r) and torch.allclose(vals, ref_vals[:r], rtol=1e-8)
    assert (v @ v.T - ref_v[:, :r] @ ref_v[:, :r].T).norm() < 1e-4
    energy = lambda basis: float(torch.trace(basis.T @ c @ basis))  # noqa: E731  what the 16-bit branch keeps
    assert abs(energy(v) / float(ref_vals[:r].sum()) - 1) < 1e-10
    v32 = pca_top_basis(c.float(), r, dtype=torch.float32)[1].double()
    assert (v32 @ v32.T - ref_v[:, :r] @ ref_v[:, :r].T).norm() < 1e-2
    assert abs(energy(v32) / float(ref_vals[:r].sum()) - 1) < 1e-5
    small_vals, small_v = pca_top_basis(c[:256, :256], 8)
    assert torch.allclose(small_v.abs(), pca_basis(c[:256, :256])[1][:, :8].abs())


def test_structured_hessian_transforms_equal_the_dense_products(monkeypatch):
    """P H P and Mᵀ H M (block Hadamard) without d×d factors equal transform_hessian with the dense
    matrices; the chunked float64 Hessian and the tiled symmetrisation equal the one-shot formulas
    bit for bit."""
    from dirotq.calibration import LayerStats

    x = correlated_inputs(n=500, d=256, seed=6).double()
    h = x.T @ x
    v = torch.linalg.qr(torch.randn(256, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(7))).Q
    p = torch.eye(256, dtype=torch.float64) - v @ v.T
    tol = dict(rtol=0, atol=1e-12 * float(h.abs().max()))
    torch.testing.assert_close(common.project_out_hessian(h, v), common.transform_hessian(h, p), **tol)
    signs = random_signs(256, 3)
    m = common.block_hadamard_matrix(signs, 64)
    torch.testing.assert_close(common.block_hadamard_hessian(h, signs, 64), common.transform_hessian(h, m), **tol)
    a = torch.randn(300, 300, dtype=torch.float64)
    assert torch.equal(common.symmetrize_(a.clone(), block=64), 0.5 * (a + a.T))
    st = LayerStats.empty(256)
    st.update(x.float())
    monkeypatch.setattr(common, "_CHUNK_ELEMENTS", 256 * 5)  # 5 rows per chunk
    c = st.second_moment / st.count
    assert torch.equal(common.hessian(st), 0.5 * (c + c.T))
