"""Claims about GPTQ, PCA bases, rotations and rank policies."""

import pytest
import torch

from dirotq.bases import (
    allocate_ranks, explained_variance, full_rotation, haar_orthogonal, hadamard, hsvd_lowrank,
    paper_rank, pca_basis, per_head_basis, random_hadamard, rank_for_energy, rank_for_error_budget,
    weight_svd,
)
from dirotq.gptq import gptq_quantize
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
        r = quantize(w, scale_format=fmt)
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
